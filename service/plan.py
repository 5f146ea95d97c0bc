"""What a server serves, decided once from its environment: the settings, whether a GPU serves, how many workers,
and each model's files in the store, checked.

BentoML takes the worker count and the models a bento packs from the service class's declarations, made when the
service module is imported; so the module builds the plan then (it only reads), and the server process stops with
one line when a setting, the API keys file or a model is unusable, before any worker starts. Each worker builds what
it runs from the plan when it starts (service/worker.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError
from core.host import gpu_count, usable_cores
from core.runtime import CUDA, OnnxModel, choose_providers
from core.store import below_shipped, measured
from service.bentoml_internals import protocol_problem
from service.http.keys import ApiKeys
from service.inference.loading import find
from service.inference.model import ModelSource
from service.settings import SettingError, Settings


def worker_count(on_gpu: bool) -> int:
    """A worker's HTTP handling needs a core of its own. On a CPU host the model needs the cores too: one worker per
    core. On a GPU the HTTP layer is the limit, and each worker holds a CUDA context (~1 GB): up to 8 per GPU, at
    most one per two cores (BENCHMARKS.md, GPU)."""
    return min(8 * gpu_count(), max(1, usable_cores() // 2)) if on_gpu else usable_cores()


@dataclass(frozen=True)
class Plan:
    settings: Settings
    on_gpu: bool
    workers: int
    sources: tuple[ModelSource, ...]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Plan:
        """Raises UserError, in one line, for the first thing that cannot be served."""
        settings = Settings.from_env(environ)
        try:
            on_gpu = CUDA in choose_providers(settings.providers)
        except UserError as exc:
            raise SettingError(f"CIFAR10_PROVIDERS={settings.providers}: {exc}") from None
        problem = protocol_problem()
        if problem:
            raise UserError(problem)
        if settings.api_keys_file:
            ApiKeys(Path(settings.api_keys_file))  # readable, and holding a key
        sources = tuple(find(name, version, settings.precision, not on_gpu) for name, version in settings.models)
        return cls(settings, on_gpu, settings.workers or worker_count(on_gpu), sources)


def describe(plan: Plan) -> list[str]:
    """What a server, or a bento built now, serves: each model's store versions, their test accuracy, a warning
    where a version is less accurate than the shipped one on the same test images, and the CIFAR10_MODELS line
    that pins these versions."""
    lines = []
    for source in plan.sources:
        for file in (source.fp32, source.int8):
            if file is not None:
                info = OnnxModel(file.path, providers="cpu", threads=1, optimized=False).info
                lines.append(f"{source.name}: {file.store_tag} ({measured(vars(info))})")
                warning = below_shipped(source.name, info)
                if warning:
                    lines.append(f"  warning: {warning}")
    pinned = ",".join(f"{source.name}:{source.version}" for source in plan.sources)
    lines.append(f"to serve these versions wherever this runs: CIFAR10_MODELS={pinned}")
    return lines


if __name__ == "__main__":
    for line in describe(Plan.from_env()):
        print(line)
