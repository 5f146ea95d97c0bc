"""The BentoML service: CIFAR-10 classification over HTTP with adaptive batching.

This module is BentoML's entry point (`bentoml serve service.service:Classifier`) and only
wires the parts together at start-up: the settings (service/settings.py), the models from
the store, the Predictor (service/predictor.py) and the HTTP routes (service/http.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import bentoml
from bentoml.exceptions import NotFound

from core.bentoml_internals import (
    bentoml_home,
    limit_request_head_time,
    restart_dead_workers_within,
    service_class,
    slim_image,
)
from core.errors import UserError
from core.runtime import CUDA, choose_providers, gpu_count, usable_cores
from core.store import MODEL_FILE, STORE_NAMES, pick_variant, verify_stored, version_setting
from service.drain import say
from service.http import HttpApi
from service.predictor import ModelFile, Predictor
from service.settings import Settings

try:
    SETTINGS = Settings.from_env()
except UserError as exc:  # one line, before BentoML sees any setting
    sys.exit(f"error: {exc}")
# A worker's HTTP handling needs a core of its own (LeNet: ~1,000 req/s per worker). On a CPU host the
# model needs the cores too: one worker per core. On a GPU the HTTP layer is the limit (one worker
# served 13,000 images/s of /classify_batch on an H100, four 39,500, eight 42,600; each holds a CUDA
# context of ~1 GB): up to 8 per GPU, at most one per two cores. Not yet re-measured with the batch
# buckets (issue 12).
ON_GPU = CUDA in choose_providers(SETTINGS.providers)
WORKERS = SETTINGS.workers or (min(8 * gpu_count(), max(1, usable_cores() // 2)) if ON_GPU else usable_cores())
HTTP = HttpApi(SETTINGS)
limit_request_head_time(SETTINGS.header_timeout_s)
restart_dead_workers_within(1.0)


def pinned_tag(name: str) -> str:
    """`name`'s store tag: the latest version, or the one its CIFAR10_<NAME>_VERSION pins."""
    return f"{STORE_NAMES[name]}:{getattr(SETTINGS, version_setting(name).lower())}"


def answering_resnet18() -> str:
    """Which ResNet-18 answers: int8 on a CPU host when the store has it (`auto`), or the precision pinned."""
    name = pick_variant("resnet18", SETTINGS.resnet18_precision, on_cpu=not ON_GPU)
    if name != "resnet18" and SETTINGS.resnet18_precision == "auto":
        try:
            bentoml.models.get(pinned_tag(name))
        except NotFound:  # e.g. a bento built for GPUs, which holds fp32 only
            return "resnet18"
    return name


def served_model(arch: str) -> bentoml.models.BentoModel:
    """The model to serve for `arch`: the store's latest, or the version its CIFAR10_<ARCH>_VERSION pins; checked
    against its recorded sha256 and this service's input contract before anything is served."""
    version = getattr(SETTINGS, version_setting(arch).lower())
    tag = pinned_tag(arch)
    try:
        stored = bentoml.models.get(tag)
        verify_stored(Path(stored.path_of(MODEL_FILE)), stored.info.metadata, str(stored.tag))
    except NotFound:
        if version == "latest":
            sys.exit(f"error: the model store has no {STORE_NAMES[arch]}; register the shipped models with "
                     "`.venv/bin/python -m core.store` (make serve does)")
        sys.exit(f"error: CIFAR10_{version_setting(arch)}={version}: the model store has no {tag}; "
                 f"`.venv/bin/bentoml models list {STORE_NAMES[arch]}` lists its versions")
    except UserError as exc:
        sys.exit(f"error: {exc}")
    return bentoml.models.BentoModel(tag)


@bentoml.service(
    name="cifar10-classifier",
    image=slim_image("3.11"),  # the Python packages come from bentofile.yaml
    workers=WORKERS,
    traffic={"timeout": SETTINGS.timeout_s},
    service_class=service_class(HTTP.direct),
)
@bentoml.asgi_app(HTTP.app, path="/")
class Classifier:
    """ResNet-18 (int8 on a CPU host, fp32 with a GPU) and LeNet-5 CIFAR-10 classifiers in ONNX Runtime."""

    # Only the models that answer: they are what a bento built from this service holds.
    resnet18_model = served_model(answering_resnet18())
    lenet_model = served_model("lenet")

    def __init__(self) -> None:
        """Load the models that answer (ResNet-18 in the precision chosen, LeNet) and run every batch shape they
        will see once; BentoML's /readyz turns 200 only after this. It runs in the worker's event loop."""
        stored = {"resnet18": self.resnet18_model, "lenet": self.lenet_model}
        files = {arch: ModelFile(str(ref.tag), Path(ref.path_of(MODEL_FILE))) for arch, ref in stored.items()}
        # The workers' shared-cores file sits in BentoML's home, like their metrics files; their parent is the server.
        cores_file = bentoml_home() / f"cifar10-cores-{os.getppid()}"
        self.predictor = Predictor(files, SETTINGS, WORKERS, bentoml.server_context.worker_index or 0, cores_file)
        HTTP.attach(self.predictor)
        HTTP.drain.install()  # after uvicorn's own signal handlers, which it calls when the drain ends

    def __is_ready__(self) -> bool:
        """BentoML's /readyz answers 503 while this worker drains."""
        return not HTTP.drain.draining

    @bentoml.on_shutdown
    def close(self) -> None:
        """Runs once uvicorn has answered every request (not when the grace period ran out)."""
        self.predictor.close()
        if HTTP.drain.draining:
            say(HTTP.drain.summary())
