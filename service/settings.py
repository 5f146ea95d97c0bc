"""Serving settings: parsed and checked once, at start-up, from CIFAR10_* environment variables.

Every setting is documented in the README; a bad value is one line naming the variable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from core.contract import PRECISIONS
from core.errors import UserError
from core.runtime import PROVIDER_CHOICES
from core.selfcheck import MIN_AGREEMENT
from core.store import SHIPPED

MODEL = re.compile(r"([a-z0-9][a-z0-9_.-]*?)(?::([a-z0-9]+))?")  # NAME[:VERSION]: a served name, a store version


class SettingError(UserError):
    """A CIFAR10_* variable with a value the service cannot use."""


def _whole(low: int, high: int, meaning: str = "") -> dict:
    return {"low": low, "high": high, "meaning": meaning}


def _fraction(meaning: str) -> dict:
    return {"low": 0.0, "high": 1.0, "meaning": meaning, "real": True}


@dataclass(frozen=True)
class Settings:
    """Serving limits and tuning; each field is read from CIFAR10_<FIELD NAME IN CAPITALS>."""

    max_batch_size: int = field(default=64, metadata=_whole(1, 4096))  # images per model call
    max_latency_ms: int = field(default=5000, metadata=_whole(1, 600_000))  # queueing budget before 503
    max_body_bytes: int = field(default=10 * 1024 * 1024, metadata=_whole(1024, 1 << 31))
    max_pixels: int = field(default=40_000_000, metadata=_whole(1024, 1_000_000_000))
    max_batch_images: int = field(default=64, metadata=_whole(1, 1000))  # per /classify_batch request
    max_concurrency: int = field(default=256, metadata=_whole(1, 100_000))  # POSTs in flight per worker before 429
    timeout_s: int = field(default=60, metadata=_whole(1, 3600))  # then 504
    workers: int = field(
        default=0,
        metadata=_whole(0, 256, "0: one per core on a CPU host; with GPUs up to 8 per GPU, one per two cores"),
    )
    ort_threads: int = field(default=0, metadata=_whole(0, 1024, "0: all cores alone, a share beside other workers"))
    providers: str = field(default="auto", metadata={"choices": PROVIDER_CHOICES})
    # Batch sizes a model sees: auto = powers of two up to max_batch_size on a GPU (each new shape costs
    # cuDNN a search), any size on a CPU (padding only costs there: BENCHMARKS.md); on/off force either.
    batch_buckets: str = field(default="auto", metadata={"choices": ("auto", "on", "off")})
    # On SIGTERM: how long requests in flight may take to finish (Kubernetes waits 30 s by default).
    drain_s: int = field(default=20, metadata=_whole(0, 3600))
    header_timeout_s: int = field(default=10, metadata=_whole(1, 600))  # request line and headers, then 408
    body_timeout_s: int = field(default=30, metadata=_whole(1, 3600))  # the whole body, then 408
    # The Open Inference Protocol over gRPC (service/grpc/), in every worker on this port; 0: none.
    grpc_port: int = field(default=3001, metadata=_whole(0, 65535, "0: no gRPC"))
    # The models served, as (name, store version or "latest"): the store's cifar10-NAME; the first is the default.
    models: tuple[tuple[str, str], ...] = field(
        default=tuple((name, "latest") for name in SHIPPED), metadata={"models": True}
    )
    # Which copy answers: auto = a model's int8 copy on a CPU host where it passes its self-check, else fp32.
    precision: str = field(default="auto", metadata={"choices": PRECISIONS})
    int8_min_agreement: float = field(default=MIN_AGREEMENT, metadata=_fraction("e.g. 0.99 for 99%"))
    # One line per request on stderr (service/http/access.py); successful ones can be sampled, 1 in N.
    access_log: str = field(default="json", metadata={"choices": ("json", "text", "off")})
    access_log_sample: int = field(default=1, metadata=_whole(1, 1_000_000, "1: every request"))
    # A file of API keys, one per line (service/http/keys.py); empty: no key needed.
    api_keys_file: str = field(default="", metadata={"text": True})
    # The model-control routes (/v2/repository/...): auto = on with a keys file, for its admin keys only; on =
    # on without keys too (anyone who reaches the port may change the models); off.
    model_control: str = field(default="auto", metadata={"choices": ("auto", "on", "off")})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """Read and check every CIFAR10_* setting; raises SettingError naming the first bad one."""
        values = {}
        for spec in fields(cls):
            variable = f"CIFAR10_{spec.name.upper()}"
            raw = environ.get(variable, "").strip()
            if raw:
                values[spec.name] = _parse(variable, raw, spec.metadata)
        return cls(**values)


def _parse(variable: str, raw: str, rules: Mapping) -> int | float | str | tuple:
    if "models" in rules:
        return _models(variable, raw)
    if "text" in rules:
        return raw
    if "choices" in rules:
        if raw.lower() not in rules["choices"]:
            raise SettingError(f"{variable}={raw!r}: use one of {', '.join(rules['choices'])}")
        return raw.lower()
    kind = "number" if rules.get("real") else "whole number"
    allowed = f"a {kind} from {rules['low']:g} to {rules['high']:g}"
    if rules["meaning"]:
        allowed += f" ({rules['meaning']})"
    try:
        value = float(raw) if rules.get("real") else int(raw)
    except ValueError:
        raise SettingError(f"{variable}={raw!r} is not a {kind}; use {allowed}") from None
    if not rules["low"] <= value <= rules["high"]:
        raise SettingError(f"{variable}={raw!r} is out of range; use {allowed}")
    return value


def _models(variable: str, raw: str) -> tuple[tuple[str, str], ...]:
    """`resnet18,lenet,vgg11:abc123` -> (("resnet18", "latest"), ("lenet", "latest"), ("vgg11", "abc123"))."""
    models = []
    for item in (part.strip().lower() for part in raw.split(",")):
        match = MODEL.fullmatch(item)
        if not match:
            raise SettingError(
                f"{variable}={raw!r}: {item!r} is not NAME or NAME:VERSION; e.g. resnet18,lenet:VERSION "
                "(`bentoml models list` shows the store's)"
            )
        name, version = match[1].removeprefix("cifar10-"), match[2] or "latest"
        if name.endswith("-int8"):
            raise SettingError(
                f"{variable}={raw!r}: list {name.removesuffix('-int8')}, not {name}; its int8 copy "
                "answers for it on a CPU host (CIFAR10_PRECISION)"
            )
        if name in (m for m, _ in models):
            raise SettingError(f"{variable}={raw!r}: {name} is listed twice")
        models.append((name, version))
    return tuple(models)
