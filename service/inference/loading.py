"""From a served name and version to a loaded ServedModel.

`find` reads the model store: the fp32 file of `cifar10-NAME` at that version and the newest int8 copy made from
it (`cifar10-NAME-int8` whose metadata names the fp32 file's sha256), each checked against the sha256 recorded at
registration, this service's input contract, and its own metadata (the out-of-distribution statistics included).
The server process runs it for every model before a worker starts, so a missing or changed file stops the server
with one line. `load` is a worker's: the copy that answers on this host (core/selfcheck.py), its sessions, and every
batch shape run once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import UserError
from core.files import sha256_of
from core.host import gpu_count, usable_cores
from core.runtime import OnnxModel
from core.selfcheck import choose
from core.store import INT8, MODEL_FILE, checked_name, int8_copy, served_names, store_name, verify_stored
from service.inference.cores import SharedCores
from service.inference.model import ModelFile, ModelSource, ServedModel, bucket_sizes
from service.log import say
from service.settings import Settings


class ModelNotFound(UserError):
    """A name or version the model store lacks."""


@dataclass(frozen=True)
class Host:
    """How a worker runs its models: on the CPU or a GPU (`device`); with `threads` ONNX Runtime threads, spinning
    only where no other worker shares the cores; and, beside other workers' calls, a second session of
    `shared_threads` (`shared`: where the workers mark their calls); at the batch sizes `bucket_sizes` (empty: any).
    `worker`: this process's 1-based index among the server's workers (0 outside a server)."""

    on_cpu: bool
    threads: int
    spin: bool = True
    shared_threads: int = 0
    shared: SharedCores | None = None
    bucket_sizes: tuple[int, ...] = ()
    workers: int = 1
    worker: int = 0
    device: int = 0


def host_for(settings: Settings, on_cpu: bool, workers: int = 1, worker: int = 0, cores: Path | None = None) -> Host:
    """How worker `worker` (1-based; 0 outside a server) of `workers` runs its models: all cores alone, its share of
    them beside the others' calls (marked in the file `cores`, where given), its GPU, and the batch sizes (powers of
    two on a GPU, where every new shape costs cuDNN a search)."""
    usable = usable_cores()
    alone = settings.ort_threads or usable
    share = settings.ort_threads or max(1, usable // workers)
    shared = SharedCores(cores, workers, worker - 1) if share < alone and worker and on_cpu and cores else None
    buckets = settings.batch_buckets == "on" or (settings.batch_buckets == "auto" and not on_cpu)
    return Host(
        on_cpu=on_cpu,
        threads=alone,
        spin=workers == 1,
        shared_threads=share,
        shared=shared,
        bucket_sizes=bucket_sizes(settings.max_batch_size) if buckets else (),
        workers=workers,
        worker=worker,
        device=(worker - 1) % gpu_count() if worker and gpu_count() > 1 else 0,
    )


def checked(model: Any) -> ModelFile:
    """A BentoML store model's file, checked; a UserError names the model and what is wrong."""
    path = Path(model.path_of(MODEL_FILE))
    verify_stored(path, model.info.metadata, str(model.tag))
    try:
        info = OnnxModel(path, providers="cpu", threads=1, optimized=False).info
    except UserError as exc:
        raise UserError(f"{model.tag}: {exc}") from None
    try:
        checked_name(model.tag.name, info)
    except UserError:
        raise UserError(
            f"{model.tag} holds a {info.precision} {info.arch}, which its name does not say; register the file "
            "again under its own name (`cifar10 register` names it)"
        ) from None
    return ModelFile(str(model.tag), path)


def find(name: str, version: str, precision: str, on_cpu: bool) -> ModelSource:
    """The checked files that may answer for `name` at `version` ('latest': the newest): fp32 unless int8 is pinned,
    and on a CPU host (or pinned) the newest int8 copy made from that fp32 file."""
    import bentoml
    from bentoml.exceptions import NotFound

    tag = f"{store_name(name)}:{version}"
    try:
        stored = bentoml.models.get(tag)
    except NotFound:
        known = ", ".join(served_names()) or "none"
        raise ModelNotFound(
            f"CIFAR10_MODELS names {name if version == 'latest' else tag}, which the model store lacks (it has: "
            f"{known}); register the shipped ones with `.venv/bin/python -m core.store` (make serve does), or yours "
            "with `cifar10 register`"
        ) from None
    fp32 = checked(stored)
    sha256 = stored.info.metadata.get("sha256") or sha256_of(fp32.path)
    wants_int8 = precision == "int8" or (precision == "auto" and on_cpu)
    # Through BentoML's API: a bento's container serves from the bento's own store, which the layout reader misses.
    try:
        copies = bentoml.models.list(store_name(name) + INT8) if wants_int8 else []
    except NotFound:  # no int8 copy of this model at all
        copies = []
    copies.sort(key=lambda m: m.info.creation_time, reverse=True)
    found = int8_copy(name, sha256, [(str(m.tag), m.info.metadata) for m in copies], shipped=False)
    if precision == "int8" and found is None:
        raise UserError(
            f"CIFAR10_PRECISION=int8: the model store has no int8 copy of {fp32.store_tag} ({store_name(name)}{INT8} "
            "made from it); quantize one with `cifar10 quantize`, or set CIFAR10_PRECISION=auto"
        )
    int8 = checked(bentoml.models.get(found)) if found else None
    return ModelSource(name, fp32.version, None if precision == "int8" else fp32, int8, fp32.store_tag)


def load(source: ModelSource, settings: Settings, host: Host) -> ServedModel:
    """The copy of `source` that answers on this host (int8 only where its self-check passes), with its sessions,
    every batch shape it will see run once."""

    def loader(file: ModelFile | None):
        if file is None:
            return None
        return lambda: OnnxModel(file.path, settings.providers, host.threads, host.spin, host.device)

    choice = choose(
        source.name,
        loader(source.fp32),
        loader(source.int8),
        settings.precision,
        host.on_cpu,
        settings.int8_min_agreement,
    )
    if host.worker <= 1:  # one line per server, not one per worker
        if choice.check:
            say(f"cifar10: {source.name} answers in {choice.model.info.precision}: {choice.reason}")
        if choice.model.fallback:
            say(f"cifar10: {source.name}: {choice.model.fallback}")
    shared = None
    if host.shared is not None:
        shared = OnnxModel(choice.model.path, settings.providers, host.shared_threads, spin=False)
    model = ServedModel(source, choice, shared, host.shared, host.bucket_sizes)
    model.warm()
    return model
