"""The inference core in this process, over the shipped model files (fp32), for tests and benchmarks."""

from __future__ import annotations

from core.runtime import CUDA, choose_providers
from core.store import shipped_file
from service.inference.core import Inference
from service.inference.loading import host_for
from service.inference.model import ModelFile, ModelSource
from service.inference.repository import ModelRepository
from service.settings import Settings


def shipped_sources(names: tuple[str, ...] = ("resnet18", "lenet")) -> list[ModelSource]:
    return [ModelSource(name, "shipped", ModelFile(f"cifar10-{name}:shipped", shipped_file(name))) for name in names]


def in_process(
    settings: Settings | None = None,
    names: tuple[str, ...] = ("resnet18", "lenet"),
    sources: list[ModelSource] | None = None,
) -> Inference:
    """The shipped models (or `sources`) loaded as one worker outside a server loads them, with `settings`."""
    settings = settings or Settings()
    host = host_for(settings, on_cpu=CUDA not in choose_providers(settings.providers))
    return Inference(ModelRepository.of(sources or shipped_sources(names), settings, host), settings)
