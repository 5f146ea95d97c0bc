"""What one worker process builds from the server's plan and owns: its HTTP stack, when BentoML asks the service
for its app; its models and inference core, when the service starts in the worker's event loop (before /readyz
turns 200); and their shutdown.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI
from starlette.types import ASGIApp

from core.bentoml_internals import bentoml_home
from service import tracing
from service.bentoml_internals import install_protocol, own_metrics_folder
from service.grpc.calls import Calls
from service.grpc.server import GrpcServer
from service.http.stack import SERVER_NAME, HttpStack
from service.inference.control import ModelControl
from service.inference.core import Inference
from service.inference.loading import Host, host_for
from service.inference.metrics import WORKERS_EXPECTED
from service.inference.repository import ModelRepository, NamePlan
from service.log import say
from service.plan import Plan


class Worker:
    """A worker process's parts; `index` is its 1-based place among the server's workers (0: not under a server)."""

    def __init__(self, plan: Plan, docs: FastAPI, index: int) -> None:
        self.plan, self.docs, self.index = plan, docs, index
        self.stack: HttpStack | None = None
        self.inference: Inference | None = None
        self.control: ModelControl | None = None
        self.grpc: GrpcServer | None = None
        self.host: Host | None = None
        self.metrics_folder = Path()

    def app(self, bentoml_app: ASGIApp, cors: dict | None) -> ASGIApp:
        """The worker's ASGI app around BentoML's, made before uvicorn starts: this server's own metrics folder and
        uvicorn's protocol with the head timeout and the hang-up probe come first."""
        self.metrics_folder = own_metrics_folder()
        install_protocol(self.plan.settings.header_timeout_s)
        self.stack = HttpStack(
            self.plan.settings, bentoml_app, lambda: self.inference, self._control, self.docs.openapi, cors
        )
        return self.stack

    def start(self) -> None:
        """In the worker's event loop, once uvicorn runs: tracing (BentoML has loaded its configuration by now), the
        models, and the drain's signal handlers (after uvicorn's own, which it calls when the drain ends)."""
        tracing.configure()
        self.host = self._host()
        plan = self.plan
        repository = ModelRepository(plan.settings, self.host)
        # The server's folder for live model changes, in BentoML's home like its metrics; its parent is the server.
        folder = bentoml_home() / "cifar10-repository" / str(os.getppid())
        sources = {(source.name, source.version): source for source in plan.sources}
        self.control = ModelControl(repository, folder, max(self.index, 1), plan.workers, sources)
        self.control.start({source.name: NamePlan(source.version) for source in plan.sources})
        self.control.watch()
        self.inference = Inference(repository, plan.settings)
        WORKERS_EXPECTED.labels(server=self.metrics_folder.name).set(plan.workers)
        self.stack.drain.install()
        if plan.settings.grpc_port:
            self._serve_grpc()

    def _serve_grpc(self) -> None:
        """The gRPC server on the worker's event loop, beside uvicorn, under the HTTP stack's keys, drain and access
        log; the drain tells it, then stops it before uvicorn."""
        stack = self.stack
        calls = Calls(self.plan.settings, stack.keys, stack.drain, stack.access_log)
        self.grpc = GrpcServer(self.plan.settings, calls, lambda: self.inference, self._control, SERVER_NAME)
        stack.drain.on_start.append(self.grpc.draining)
        stack.drain.before_stop.append(self.grpc.stop)
        self.grpc.start()

    def _control(self) -> ModelControl | None:
        return self.control if self.inference is not None else None

    def describe(self) -> dict:
        """/models: what this worker serves (its inference core's view), and what each worker serves."""
        return {**self.inference.describe(), "serving_by_worker": self.control.workers_serving()}

    @property
    def ready(self) -> bool:
        """/readyz: the models are loaded and the worker is not draining."""
        return self.inference is not None and not self.stack.drain.draining

    def close(self) -> None:
        """Once uvicorn has answered every request (not when the grace period ran out)."""
        if self.control is not None:
            self.control.stop()
        if self.inference is not None:
            self.inference.repository.close()
        if self.host is not None and self.host.shared is not None:
            self.host.shared.close()
        if self.stack.drain.draining:
            say(self.stack.drain.summary())

    def _host(self) -> Host:
        # The workers' shared-cores file sits in BentoML's home, like their metrics; their parent is the server.
        cores = bentoml_home() / f"cifar10-cores-{os.getppid()}"
        return host_for(self.plan.settings, not self.plan.on_gpu, self.plan.workers, self.index, cores)
