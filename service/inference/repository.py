"""The worker's model repository, after Triton's: the served models by name, each with the loaded version that
answers for it, the earlier versions kept warm for a one-call rollback, and a shadow version on a sample of its
requests (service/inference/shadow.py); each version with the batcher in front of it.

A worker builds it when it starts. Every request asks it for the version that answers for a name (or the loaded
version the route names), /models for what it serves, and the model-control routes change it through `load` and
`serve` (service/inference/control.py): a change is a new plan for a name, applied by one swap of its entry, so a
request in flight is answered wholly by the version it started with.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import partial

from core.errors import UserError
from service.errors import BadRequest, LoadFailed, NotFound
from service.inference.batcher import Batcher
from service.inference.loading import Host, ModelNotFound, find, load
from service.inference.metrics import EXPECTED_CLASS_SHARE, INT8_FALLBACK, WORKERS_SERVING
from service.inference.model import CallMeters, ModelSource, ServedModel
from service.inference.shadow import Shadow
from service.settings import Settings

INLINE_S = 0.0002  # a model under this many seconds an image on a CPU runs its calls in the event loop


@dataclass(frozen=True)
class Serving:
    """A loaded version and the batcher that queues its calls."""

    model: ServedModel
    batcher: Batcher


@dataclass(frozen=True)
class NamePlan:
    """What a name serves: the `version` that answers (a version of the store's cifar10-NAME), the versions kept
    warm, and the shadow version with its sample (0: none)."""

    version: str
    warm: tuple[str, ...] = ()
    shadow: str = ""
    sample: float = 0.0

    @property
    def versions(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.version, *self.warm, *((self.shadow,) if self.shadow else ()))))

    def as_dict(self) -> dict:
        return {"version": self.version, "warm": list(self.warm), "shadow": self.shadow, "sample": self.sample}

    @classmethod
    def from_dict(cls, data: dict) -> NamePlan:
        return cls(data["version"], tuple(data.get("warm", ())), data.get("shadow", ""), data.get("sample", 0.0))


@dataclass
class Entry:
    """A served name: the versions loaded for it (by store version) and its plan."""

    plan: NamePlan
    loaded: dict[str, Serving]
    shadow: Shadow | None = None

    @property
    def answering(self) -> Serving:
        return self.loaded[self.plan.version]


@dataclass
class ModelRepository:
    """The models a worker serves, loaded; the first is the default for requests that name none."""

    settings: Settings
    host: Host
    entries: dict[str, Entry] = field(default_factory=dict)
    device_lock: threading.Lock = field(default_factory=threading.Lock)  # the models share the device

    def __post_init__(self) -> None:
        buckets, settings = self.host.bucket_sizes, self.settings
        if buckets and (
            list(buckets) != sorted(set(buckets)) or buckets[0] < 1 or buckets[-1] < settings.max_batch_size
        ):
            raise ValueError(
                f"bucket_sizes must rise from 1 or more up to max_batch_size {settings.max_batch_size}, got {buckets}"
            )

    @classmethod
    def of(cls, sources: list[ModelSource], settings: Settings, host: Host) -> ModelRepository:
        """A repository serving each source's version, loaded on `host`."""
        repository = cls(settings, host)
        for source in sources:
            repository.serve(source.name, NamePlan(source.version), {source.version: repository.load_source(source)})
        return repository

    @property
    def default(self) -> str:
        return next(iter(self.entries))

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def answering(self, name: str, version: str | None = None, in_path: bool = False) -> Serving:
        """The version that answers for `name`; with `version` (a route that names one), that loaded version or
        NotFound. An unknown name is a BadRequest, or NotFound where the route names the model in its path."""
        entry = self.entries.get(name)
        if entry is None and in_path:
            raise NotFound(f"no model {name!r}; this server serves {', '.join(self.entries)}")
        if entry is None:
            raise BadRequest(f"unknown model {name!r}; choose one of: {', '.join(self.entries)}")
        if version is None:
            return entry.answering
        for serving in entry.loaded.values():
            if version in serving.model.versions:
                return serving
        others = [v for v in entry.loaded if v != entry.plan.version]
        also = f"; also loaded: {', '.join(others)}" if others else ""
        raise NotFound(f"model {name} has no version {version!r} here; {entry.answering.model.answers_as()}{also}")

    def shadow_of(self, name: str) -> Shadow | None:
        entry = self.entries.get(name)
        return entry.shadow if entry is not None else None

    def load(self, name: str, version: str) -> Serving:
        """Version `version` of `name` from the store, checked, warmed and self-checked, with its batcher; not yet
        serving. Blocking (seconds). Raises NotFound for a version the store lacks, LoadFailed for one that cannot
        serve here."""
        try:
            source = find(name, version, self.settings.precision, self.host.on_cpu)
        except ModelNotFound:
            raise NotFound(f"the model store has no {name} version {version!r}") from None
        except UserError as exc:
            raise LoadFailed(str(exc)) from None
        serving = self.load_source(source)
        check = serving.model.choice.check
        if check is not None and not check.passed and self.settings.precision == "auto":
            # At start a failed check falls back to fp32; live, the old version still answers, and a change that
            # silently costs the int8 speed is one the caller should decide on.
            serving.batcher.close()
            raise LoadFailed(
                f"{name}:{version}: its int8 copy failed its self-check ({check.summary()}); quantize it again "
                "(`cifar10 quantize`), or serve fp32 with CIFAR10_PRECISION=fp32"
            )
        return serving

    def load_source(self, source: ModelSource) -> Serving:
        """`load`, for a version already found in the store (the server's start finds CIFAR10_MODELS' versions)."""
        name, version = source.name, source.version
        try:
            model = load(source, self.settings, self.host)
        except MemoryError:
            raise LoadFailed(f"{name}:{version}: out of memory while loading it on this host", 507) from None
        except Exception as exc:
            raise LoadFailed(_load_problem(name, version, exc), _load_status(exc)) from None
        return self._serving(model)

    def loaded(self, name: str, version: str) -> Serving | None:
        entry = self.entries.get(name)
        return entry.loaded.get(version) if entry is not None else None

    def serve(self, name: str, plan: NamePlan | None, extra: dict[str, Serving]) -> list[Batcher]:
        """Make `plan` what `name` serves (None: stop serving it), from the versions loaded for it and `extra`
        (loaded for this plan); returns the batchers it no longer needs, for the caller to close."""
        entry = self.entries.get(name)
        pool = {**(entry.loaded if entry else {}), **extra}
        loaded = {version: pool[version] for version in plan.versions} if plan else {}
        old_shadow = entry.shadow if entry else None
        shadow = None
        if plan and plan.shadow:
            same = old_shadow is not None and old_shadow.version == plan.shadow and entry.plan.version == plan.version
            shadow = old_shadow if same else self._shadow(name, loaded[plan.shadow], plan, loaded[plan.version])
            shadow.sample = plan.sample
        if plan is None:
            self.entries = {n: e for n, e in self.entries.items() if n != name}
        else:
            self.entries = {**self.entries, name: Entry(plan, loaded, shadow)}  # one swap: requests see old or new
        _publish(name, entry.answering.model if entry else None, loaded[plan.version].model if plan else None)
        unused = [serving.batcher for version, serving in pool.items() if version not in loaded]
        return unused + ([old_shadow.batcher] if old_shadow is not None and old_shadow is not shadow else [])

    def plans(self) -> dict[str, NamePlan]:
        return {name: entry.plan for name, entry in self.entries.items()}

    def describe(self) -> dict[str, dict]:
        described = {}
        for name, entry in self.entries.items():
            described[name] = {
                **entry.answering.model.describe(),
                "warm_versions": list(entry.plan.warm),
                "shadow": entry.shadow.describe() if entry.shadow else None,
            }
        return described

    def close(self) -> None:
        """Stop every batcher's thread (what is queued is answered first)."""
        for entry in self.entries.values():
            for serving in entry.loaded.values():
                serving.batcher.close()

    def _shadow(self, name: str, serving: Serving, plan: NamePlan, live: Serving) -> Shadow:
        settings = self.settings
        batcher = Batcher(
            f"{name}-shadow",
            partial(serving.model.run, meters=CallMeters.of(f"{name}-shadow")),
            settings.max_batch_size,
            settings.max_latency_ms / 1000,
            self.device_lock,
            gives_way=lambda: bool(live.batcher.queued_images or live.batcher.passing),
        )
        ood = serving.model.ood
        return Shadow(name, plan.shadow, batcher, ood.threshold if ood else None, plan.sample)

    def _serving(self, model: ServedModel) -> Serving:
        # On a CPU, a model this cheap runs its calls in the event loop (inference/batcher.py): the thread hand-off
        # would cost more than the call. Judged from a timed call of 16 images (the largest bucket, with buckets).
        probe = self.host.bucket_sizes[-1] if self.host.bucket_sizes else 16
        inline = self.host.on_cpu and model.seconds_per_image(probe) < INLINE_S
        settings = self.settings
        batcher = Batcher(
            model.name, model, settings.max_batch_size, settings.max_latency_ms / 1000, self.device_lock, inline
        )
        return Serving(model, batcher)


def _publish(name: str, old: ServedModel | None, new: ServedModel | None) -> None:
    """The gauges of what this worker serves for `name`, from `old` to `new` (None: nothing)."""
    if old is not None:
        WORKERS_SERVING.labels(model=name, precision=old.info.precision).set(0)
    if new is None:
        INT8_FALLBACK.labels(model=name).set(0)
        return
    WORKERS_SERVING.labels(model=name, precision=new.info.precision).set(1)
    check = new.choice.check
    INT8_FALLBACK.labels(model=name).set(int(check is not None and not check.passed and new.info.precision == "fp32"))
    shares = ((new.info.calibration or {}).get("validation") or {}).get("after", {}).get("predicted_shares")
    for label, share in zip(new.class_names, shares or [], strict=False):  # files calibrated before 2026-12 lack it
        EXPECTED_CLASS_SHARE.labels(model=name, **{"class": label}).set(share)


def _load_problem(name: str, version: str, exc: Exception) -> str:
    text = str(exc)
    if _load_status(exc) == 507:
        return f"{name}:{version}: out of memory while loading it on this host ({text[:200]})"
    return text if text.startswith(("cifar10-", name)) else f"{name}:{version}: {text}"


def _load_status(exc: Exception) -> int:
    """507 for a failed allocation (ONNX Runtime says so in words), 422 for a file that cannot serve, 500 else."""
    text = str(exc).lower()
    if "failed to allocate" in text or "bad_alloc" in text or "bad allocation" in text:
        return 507
    return 422 if isinstance(exc, UserError) else 500
