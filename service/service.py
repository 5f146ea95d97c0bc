"""The BentoML service (`bentoml serve service.service:Classifier`): declarations only.

BentoML reads a service's configuration (its worker count, the models a bento packs) from the class and its
decorators when it imports this module, so the server's plan is made here (service/plan.py: it reads the settings
and the store, and in the server process a bad one stops it with one line). Everything a worker runs, it builds
when it starts (service/worker.py).
"""

from __future__ import annotations

import re
import sys

import bentoml

from core.errors import UserError
from service.bentoml_internals import before_serving, restart_dead_workers_within, service_class, slim_image
from service.grpc.server import check_port
from service.http.docs import mounted_app
from service.plan import Plan
from service.worker import Worker


def server_plan() -> Plan:
    """The plan, or one line and a non-zero exit. In the server process, its process manager is also told to
    restart a dead worker within a second, and the gRPC port is checked before the workers start."""
    try:
        plan = Plan.from_env()
    except UserError as exc:
        sys.exit(f"error: {exc}")
    if bentoml.server_context.worker_index is None:
        restart_dead_workers_within(1.0)
        before_serving(lambda: check_port(plan.settings.grpc_port))
    return plan


def declare_models(plan: Plan):
    """Name every copy that may answer as a class attribute: BentoML packs those into a bento built from this."""

    def declared(cls: type) -> type:
        for source in plan.sources:
            for precision in ("fp32", "int8"):
                file = getattr(source, precision)
                if file is not None:
                    attribute = re.sub(r"\W", "_", f"{source.name}_{precision}_model")
                    setattr(cls, attribute, bentoml.models.BentoModel(file.store_tag))
        return cls

    return declared


def with_worker(service: type, app, cors: dict | None):
    """BentoML's app in a worker, wrapped in that worker's stack; the service class gets the worker."""
    service.worker = Worker(PLAN, DOCS, bentoml.server_context.worker_index or 0)
    return service.worker.app(app, cors)


PLAN = server_plan()
# The routes, declared for the API's description, /models (this worker's, once it runs) and the page's files.
DOCS = mounted_app(PLAN.settings, lambda: Classifier.inner.worker.describe())


@bentoml.service(
    name="cifar10-classifier",
    image=slim_image("3.11"),  # the Python packages come from bentofile.yaml
    workers=PLAN.workers,
    traffic={"timeout": PLAN.settings.timeout_s},
    logging={"access": {"enabled": False}},  # the request context writes one access line per request, every route's
    service_class=service_class(with_worker),
)
@bentoml.asgi_app(DOCS, path="/")
@declare_models(PLAN)
class Classifier:
    """The CIFAR-10 classifiers CIFAR10_MODELS names, in ONNX Runtime (each model's int8 copy on a CPU host where it
    passes its self-check, else fp32)."""

    worker: Worker  # this worker process's parts, set when BentoML asks the service for its app

    def __init__(self) -> None:
        """Load the models and start serving; BentoML's /readyz turns 200 only after this. In the worker's loop."""
        self.worker.start()

    def __is_ready__(self) -> bool:
        """BentoML's /readyz answers 503 while this worker drains."""
        return self.worker.ready

    @bentoml.on_shutdown
    def close(self) -> None:
        self.worker.close()
