"""`cifar10 predict --ray`: the rows local `predict` writes, computed by Ray Data actors on a Ray cluster.

The driver resolves the model and hands its files to the actors through Ray's object store, so the nodes need
no model store; each actor loads them once and runs the int8 self-check on its own CPU. An actor reads, decodes
and labels its batches in one stage: actors holding every CPU then leave no task stage waiting for one.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import ray.data

from cli.file_decoding import decode_bytes, decode_files
from cli.predict import Progress, Row, Writer, expand_inputs, label, plural
from core.errors import UserError
from core.files import refuse_existing
from core.store import ModelFiles, model_files

SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("label", pa.string()),
        ("probability", pa.float64()),
        ("top_labels", pa.list_(pa.string())),
        ("top_probabilities", pa.list_(pa.float64())),
        ("in_distribution", pa.bool_()),
        ("ood_score", pa.float64()),
        ("error", pa.string()),
    ]
)
NO_INPUTS = "no input files: pass image files, folders, globs, *.parquet, URIs or - for paths on stdin"
# Reads ask for no CPU of their own: the actors may come to hold every CPU, and a read waiting for one stalls all.
READ_CPUS = 0


class Labeller:
    """A Ray Data actor: the model loaded once, then batches of {path[, bytes]} to output rows."""

    def __init__(self, files: ModelFiles, blobs: dict, precision: str, top_k: int, threads: int) -> None:
        """`blobs["ref"]`: the model files' bytes by name, in the object store (fetched once per node)."""
        folder = Path(tempfile.mkdtemp(prefix="cifar10-model-"))
        for name, data in ray.get(blobs["ref"]).items():
            (folder / name).write_bytes(data)
        local = replace(files, main=folder / files.main.name, int8=files.int8 and folder / files.int8.name)
        choice = local.load(precision, threads=threads, spin=False)
        for line in choice.warnings():
            print(f"cifar10 predict: {files.spec}: {line}", file=sys.stderr)
        self.model, self.top_k = choice.model, top_k

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        paths = [str(p) for p in batch["path"]]
        decoded = [decode_bytes(b) for b in batch["bytes"]] if "bytes" in batch else decode_files(paths)
        rows = label(self.model, paths, decoded, self.top_k)
        return pa.Table.from_pylist([row.fields() for row in rows], schema=SCHEMA)


def parquet_input(path: str, image_column: str, id_column: str) -> ray.data.Dataset:
    """A Parquet file or folder of them: its image bytes and the column naming each row."""
    dataset = ray.data.read_parquet(path, num_cpus=READ_CPUS)
    names = dataset.schema().names
    for column, option in ((image_column, "--image-column"), (id_column, "--id-column")):
        if column not in names:
            raise UserError(f"{path} has no column {column!r} (it has {', '.join(names)}); name it with {option}")
    return dataset.select_columns([image_column, id_column]).rename_columns({image_column: "bytes", id_column: "path"})


def inputs_dataset(inputs: list[str], recursive: bool, image_column: str, id_column: str) -> ray.data.Dataset:
    """Inputs in the order given: Parquet files (*.parquet), URIs (scheme://, read on the workers through pyarrow's
    file systems) and local files, folders and globs (listed here; every node must see the same paths)."""
    parts: list[ray.data.Dataset] = []
    local: list[str] = []

    def flush() -> None:
        if local:
            paths = list(expand_inputs(local, recursive))
            if paths:
                parts.append(ray.data.from_items([{"path": p} for p in paths]))
            local.clear()

    for item in inputs:
        if item.endswith(".parquet") or "://" in item:
            flush()
            if item.endswith(".parquet"):
                parts.append(parquet_input(item, image_column, id_column))
            else:
                parts.append(ray.data.read_binary_files(item, include_paths=True, num_cpus=READ_CPUS))
        else:
            local.append(item)
    flush()
    if not parts:
        raise UserError(NO_INPUTS)
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def connect(address: str | None, quiet: bool) -> None:
    """Join the cluster at `address` (`auto`: the one this node belongs to; None: RAY_ADDRESS, else a new local one)."""
    try:
        ray.init(address=address, logging_level=logging.ERROR, include_dashboard=False)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot join the Ray cluster at {address or 'RAY_ADDRESS'}: {first}") from None
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # not a line per dataset started and finished
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # rows in input order, as local predict writes them
    context.enable_progress_bars = not quiet and sys.stderr.isatty()


def actor_shape(actors: int | None, cpus: float, gpus: float | None) -> tuple[int, float]:
    """(actors, GPUs per actor): a GPU each where the cluster has GPUs, else an actor per `cpus` CPUs."""
    resources = ray.cluster_resources()
    if gpus is None:
        gpus = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
    if actors is None:
        actors = max(1, int(resources.get("GPU", 0) / gpus if gpus else resources.get("CPU", 1) / cpus))
    return actors, gpus


def predict_on_ray(
    inputs: list[str],
    address: str | None,
    model: str = "resnet18",
    precision: str = "auto",
    top_k: int = 3,
    batch_size: int = 64,
    out: str = "-",
    fmt: str | None = None,
    recursive: bool = False,
    force: bool = False,
    quiet: bool = False,
    actors: int | None = None,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float | None = None,
    image_column: str = "image",
    id_column: str = "path",
) -> int:
    """Run the whole command on Ray; returns the exit status like local `predict`."""
    files = model_files(model, with_int8=precision != "fp32")  # a bad --model fails before Ray starts
    dataset_out = fmt == "parquet" or out.endswith(".parquet")
    if dataset_out:
        refuse_existing(Path(out), force)
        writer = None
    else:
        writer = Writer(out, force, fmt)
    progress = Progress(quiet=True)
    complete = False
    try:
        connect(address, quiet)
        count, gpus = actor_shape(actors, cpus_per_actor, gpus_per_actor)
        blobs = {path.name: path.read_bytes() for path in (files.main, files.int8) if path is not None}
        rows = inputs_dataset(inputs, recursive, image_column, id_column).map_batches(
            Labeller,
            fn_constructor_kwargs={
                "files": files,
                "blobs": {"ref": ray.put(blobs)},  # in a dict: Ray passes the reference, not a copy per actor
                "precision": precision,
                "top_k": top_k,
                "threads": max(1, int(cpus_per_actor)),
            },
            batch_size=batch_size,
            # grown from one actor: a pool of every CPU at once left the first Parquet read waiting for ever
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=count),
            num_cpus=cpus_per_actor,
            num_gpus=gpus,
            # Ray Data's default (restart for ever) makes Ray log an error on every run, because a restarted
            # actor could not count on its object-store constructor arguments; a dead actor fails the run instead.
            max_restarts=0,
        )
        if writer is None:
            rows.write_parquet(out, mode="overwrite" if force else "append")
            progress.images, progress.errors = written_counts(out)
        else:
            for row in output_rows(rows):
                writer.write(row)
                progress.update(row)
        if progress.images == 0:
            raise UserError(NO_INPUTS)
        complete = True
    finally:
        if writer is not None:
            writer.close(complete)
        wall = time.perf_counter() - progress.started
        ray.shutdown()  # before the summary: Ray's own lines about stopping its actors must not come after it
    print(f"{progress.summary(out)} (Ray: up to {plural(count, 'actor')}, {wall:.1f} s)", file=sys.stderr)
    return 1 if progress.errors == progress.images else 0


def output_rows(rows: ray.data.Dataset) -> Iterator[Row]:
    for table in rows.iter_batches(batch_format="pyarrow", batch_size=None):
        for fields in table.to_pylist():
            yield Row.from_fields(fields)


def written_counts(out: str) -> tuple[int, int]:
    """(rows, error rows) of the Parquet dataset just written, from its error column alone."""
    images = errors = 0
    errors_column = ray.data.read_parquet(out, columns=["error"], num_cpus=READ_CPUS)
    for table in errors_column.iter_batches(batch_format="pyarrow", batch_size=None):
        images += table.num_rows
        errors += table.num_rows - table["error"].null_count
    return images, errors
