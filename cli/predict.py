"""`cifar10 predict`: label a stream of image files, locally in ONNX Runtime or through a running server.

Paths stream through a bounded pipeline (batches decoded in worker processes, a few
ahead of inference), so memory stays flat however many inputs there are, and rows are
written in input order as they are ready.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import sys
import time
import urllib.parse
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from multiprocessing import get_context
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

from cli.file_decoding import decode_files
from core.errors import UserError
from core.files import refuse_existing
from core.host import usable_cores
from core.preprocess import normalize
from core.runtime import top_classes

if TYPE_CHECKING:
    import httpx
    import tenacity

    from core.runtime import OnnxModel

RETRY_STATUSES = (429, 503)
API_KEY_VARIABLE = "CIFAR10_API_KEY"  # the key for --server, from the environment (a flag would show in ps)
MAX_RETRIES = 5
COLUMNS = ("path", "label", "probability", "top_labels", "top_probabilities", "in_distribution", "ood_score", "error")


@dataclass
class Row:
    """One output line: a label with its probability and the top-k (and, for a model with an out-of-distribution
    score, the score and whether the image looks like one of the classes), or an error."""

    path: str
    top: list[tuple[str, float]] = field(default_factory=list)
    error: str = ""
    in_distribution: bool | None = None
    ood_score: float | None = None

    def fields(self) -> dict:
        """The output's columns, as JSONL and Parquet hold them (no label or probability for an error row)."""
        return {
            "path": self.path,
            "label": self.top[0][0] if self.top else None,
            "probability": self.top[0][1] if self.top else None,
            "top_labels": [n for n, _ in self.top],
            "top_probabilities": [p for _, p in self.top],
            "in_distribution": self.in_distribution,
            "ood_score": self.ood_score,
            "error": self.error or None,
        }

    @classmethod
    def from_fields(cls, fields: dict) -> Row:
        top = list(zip(fields["top_labels"], fields["top_probabilities"], strict=True))
        return cls(fields["path"], top, fields["error"] or "", fields["in_distribution"], fields["ood_score"])


def files_in(folder: str, recursive: bool) -> Iterator[str]:
    """A folder's files sorted by name, each sub-folder's in its place when recursive (symlinked folders skipped).

    One directory listing at a time, so the first batch starts before a large tree is listed.
    """
    try:
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
    except OSError as exc:
        raise UserError(f"cannot list folder {folder}: {exc.strerror or exc}") from None
    skipped = 0
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            if recursive:
                yield from files_in(entry.path, recursive)
            else:
                skipped += 1
        elif entry.is_file():
            yield entry.path
    if skipped:
        print(
            f"cifar10 predict: skipped {plural(skipped, 'sub-folder')} of {folder}; add --recursive to include them",
            file=sys.stderr,
        )


def plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def expand_inputs(inputs: list[str], recursive: bool, stdin: IO[str] = sys.stdin) -> Iterator[str]:
    """Files, folders, globs and `-` (paths on stdin), in the order given; folders sorted."""
    for item in inputs:
        if item == "-":
            yield from (line.strip() for line in stdin if line.strip())
        elif Path(item).is_dir():
            yield from files_in(str(Path(item)), recursive)
        elif glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=recursive))
            if not matches:
                raise UserError(f"no files match {item!r}")
            yield from (m for m in matches if Path(m).is_file())
        else:
            yield item  # a missing file becomes an error row, not a crash


def batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


class LocalPredictor:
    """In-process ONNX Runtime; batches are decoded in worker processes, ahead of inference, in order.

    Processes, not threads: Pillow's per-image Python overhead holds the GIL, so threads
    decoded 32x32 JPEGs no faster than one core.
    """

    def __init__(self, model: str, precision: str, top_k: int, workers: int, chunks: Iterable[list[str]]) -> None:
        """Start decoding the first batches, then load the model while they decode."""
        from core.store import load

        self.top_k, self.chunks = top_k, iter(chunks)
        # Forked on Linux (started by the first submit, before ONNX Runtime has threads to lose):
        # spawned processes would first spend 0.3 s each importing.
        self.pool = ProcessPoolExecutor(workers, mp_context=get_context("fork" if sys.platform == "linux" else "spawn"))
        self.pending: deque[tuple[list[str], Future]] = deque()
        try:
            for chunk in islice(self.chunks, workers + 1):
                self.pending.append((chunk, self.pool.submit(decode_files, chunk)))
            # no spinning: the decoding processes need the cores between model calls
            choice = load(model, precision, spin=False)
            self.model = choice.model
            for line in choice.warnings():
                print(f"cifar10 predict: {model}: {line}", file=sys.stderr)
        except BaseException:
            self.pool.shutdown(cancel_futures=True)
            raise

    def __iter__(self) -> Iterator[Row]:
        with self.pool:
            for chunk in self.chunks:
                self.pending.append((chunk, self.pool.submit(decode_files, chunk)))
                yield from self._infer(*self.pending.popleft())
            while self.pending:
                yield from self._infer(*self.pending.popleft())

    def _infer(self, paths: list[str], future: Future) -> Iterator[Row]:
        yield from label(self.model, paths, future.result(), self.top_k)


def label(model: OnnxModel, paths: list[str], decoded: list[np.ndarray | str], top_k: int) -> list[Row]:
    """One model call for a batch's decoded images; a row for each path, an error row where decoding failed."""
    good = [i for i, d in enumerate(decoded) if isinstance(d, np.ndarray)]
    best = {}
    if good:
        logits, scores = model.logits_and_scores(normalize(np.stack([decoded[i] for i in good]), model.table))
        ranked = top_classes(logits, top_k, model.temperature)
        scores = [None] * len(good) if scores is None else scores.tolist()
        best = dict(zip(good, zip(*ranked, scores, strict=True), strict=True))
    names = model.info.class_names
    rows = []
    for i, path in enumerate(paths):
        if i in best:
            indices, probabilities, score = best[i]
            top = [(names[j], p) for j, p in zip(indices, probabilities, strict=True)]
            within = None if score is None else score <= model.ood.threshold
            rows.append(Row(path, top, in_distribution=within, ood_score=score))
        else:
            rows.append(Row(path, error=decoded[i]))
    return rows


def _retry_after_doubled(state: tenacity.RetryCallState) -> float:
    """The server's Retry-After, doubled on every further attempt."""
    return float(state.outcome.result().headers.get("retry-after", 0.5)) * 2 ** (state.attempt_number - 1)


def check_server_url(url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        example = url if "://" in url else f"http://{url}"
        raise UserError(f"--server {url!r} is not an http:// or https:// URL with a host; e.g. {example}")


class ServerPredictor:
    """POST /classify_batch to a running service with bounded concurrency and retries on 429/503."""

    def __init__(self, url: str, model: str, top_k: int, workers: int, chunks: Iterable[list[str]]) -> None:
        import httpx
        import tenacity

        self.url, self.model, self.top_k, self.workers = url.rstrip("/"), model, top_k, workers
        self.chunks = chunks
        key = os.environ.get(API_KEY_VARIABLE, "").strip()
        headers = {"authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(timeout=120, limits=httpx.Limits(max_connections=workers), headers=headers)
        self.retrying = tenacity.Retrying(
            retry=tenacity.retry_if_result(lambda response: response.status_code in RETRY_STATUSES),
            wait=_retry_after_doubled,
            stop=tenacity.stop_after_attempt(MAX_RETRIES + 1),
            retry_error_callback=lambda state: state.outcome.result(),
        )
        try:
            self.client.get(f"{self.url}/readyz").raise_for_status()
            described = self.client.get(f"{self.url}/models")
        except httpx.HTTPError as exc:
            raise UserError(f"cannot reach the server at {self.url} ({exc}); start it with `make serve`") from None
        if described.status_code == 401:
            what = "refused the key in" if key else "wants an API key: set"
            raise UserError(f"the server at {self.url} {what} {API_KEY_VARIABLE}")
        served = described.json()["models"]
        if model not in served:
            raise UserError(
                f"the server at {self.url} serves {', '.join(served)}, not {model!r}; choose one with --model"
            )

    def __iter__(self) -> Iterator[Row]:
        with ThreadPoolExecutor(self.workers) as pool:
            pending: deque[Future] = deque()
            for chunk in self.chunks:
                pending.append(pool.submit(self._post, chunk))
                if len(pending) >= self.workers:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()

    def _send(self, body: list, fields: dict) -> httpx.Response:
        """POST one batch, retried on 429 and 503 (the last answer is returned as it is)."""
        return self.retrying.copy()(self._send_once, body, fields)

    def _send_once(self, body: list, fields: dict) -> httpx.Response:
        import httpx

        try:
            return self.client.post(f"{self.url}/classify_batch", files=body, data=fields)
        except httpx.HTTPError as exc:
            raise UserError(f"lost the server at {self.url} ({exc})") from None

    def _post(self, paths: list[str]) -> list[Row]:
        rows: list[Row | None] = [None] * len(paths)
        files = []
        for i, path in enumerate(paths):
            try:
                files.append((i, Path(path).read_bytes()))
            except OSError as exc:
                rows[i] = Row(path, error=f"cannot read file: {exc.strerror or exc}")
        if files:
            body = [("images", (Path(paths[i]).name, data)) for i, data in files]
            response = self._send(body, {"model": self.model, "top_k": str(self.top_k)})
            if response.status_code != 200:
                raise UserError(f"the server answered {response.status_code}: {response.text[:200]}")
            for (i, _), result in zip(files, response.json()["results"], strict=True):
                top = [(p["label"], p["probability"]) for p in result.get("predictions", [])]
                rows[i] = Row(
                    paths[i], top, result.get("error", ""), result.get("in_distribution"), result.get("ood_score")
                )
        return rows  # type: ignore[return-value]


class Writer:
    """CSV or JSONL rows to a file (written under a temporary name, renamed when complete) or stdout."""

    def __init__(self, out: str, force: bool, fmt: str | None) -> None:
        self.out = out
        self.fmt = fmt or ("jsonl" if out.endswith((".jsonl", ".json")) else "csv")
        if out == "-":
            self.stream, self.partial = sys.stdout, None
        else:
            target = Path(out)
            refuse_existing(target, force)
            if not target.parent.is_dir():
                raise UserError(f"--out {out}: no folder {target.parent}; create it first")
            self.partial = target.with_name(target.name + ".partial")
            self.stream = self.partial.open("w", newline="")
        self.rows = 0
        self.csv = csv.writer(self.stream, lineterminator="\n") if self.fmt == "csv" else None

    def write(self, row: Row) -> None:
        if self.csv and not self.rows:  # with the first row: a run that fails before any writes nothing
            self.csv.writerow(COLUMNS)
        self.rows += 1
        fields = row.fields()
        if self.csv:
            probability, score, within = fields["probability"], fields["ood_score"], fields["in_distribution"]
            fields.update(
                label=fields["label"] or "",
                probability="" if probability is None else f"{probability:.6f}",
                top_labels=";".join(fields["top_labels"]),
                top_probabilities=";".join(f"{p:.6f}" for p in fields["top_probabilities"]),
                in_distribution="" if within is None else str(within).lower(),
                ood_score="" if score is None else f"{score:.4f}",
                error=row.error,
            )
            self.csv.writerow(fields.values())
        else:
            self.stream.write(json.dumps(fields) + "\n")

    def close(self, complete: bool) -> None:
        if self.partial is None:
            self.stream.flush()
            return
        self.stream.close()
        if complete:
            os.replace(self.partial, self.out)
        elif not self.rows:  # failed before the first row: an empty partial file helps nobody
            self.partial.unlink()


class Progress:
    """Counts images and errors; a progress bar (tqdm) on stderr when it is a terminal."""

    def __init__(self, quiet: bool) -> None:
        self.started = time.perf_counter()
        self.images = self.errors = 0
        self.bar = None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(unit=" images", file=sys.stderr, leave=False, dynamic_ncols=True)

    def update(self, row: Row) -> None:
        self.images += 1
        self.errors += bool(row.error)
        if self.bar is not None:
            self.bar.update()
            if row.error:
                self.bar.set_postfix(errors=self.errors, refresh=False)

    def summary(self, out: str) -> str:
        if self.bar is not None:
            self.bar.close()
        rate = self.images / max(time.perf_counter() - self.started, 1e-9)
        where = "" if out == "-" else f" -> {out}"
        return f"{plural(self.images, 'image')}, {plural(self.errors, 'error')}, {rate:,.0f} images/s{where}"


def predict(
    inputs: list[str],
    model: str = "resnet18",
    top_k: int = 3,
    batch_size: int = 64,
    out: str = "-",
    fmt: str | None = None,
    workers: int | None = None,
    server: str | None = None,
    recursive: bool = False,
    force: bool = False,
    quiet: bool = False,
    precision: str = "auto",
) -> int:
    """Run the whole command; returns the exit status. The options' ranges are checked by cli/main.py."""
    if server:
        check_server_url(server)
        if precision != "auto":
            raise UserError(
                f"--precision {precision} chooses a local model's copy; a server answers with the copy "
                f"it chose (GET {server.rstrip('/')}/models shows it): drop --precision or --server"
            )
    workers = workers or (4 if server else usable_cores())
    writer = Writer(out, force, fmt)  # refuses an existing --out before any work starts
    progress = Progress(quiet)
    complete = False
    try:
        if server:
            chunks = batches(expand_inputs(inputs, recursive), min(batch_size, 64))  # the server's limit
            predictor: Iterable[Row] = ServerPredictor(server, model, top_k, workers, chunks)
        else:
            chunks = batches(expand_inputs(inputs, recursive), batch_size)
            predictor = LocalPredictor(model, precision, top_k, workers, chunks)
        for row in predictor:
            writer.write(row)
            progress.update(row)
        if progress.images == 0:  # fails like any other run that did nothing: no --out file is left behind
            raise UserError("no input files: pass image files, folders, globs or - for paths on stdin")
        complete = True
    finally:
        writer.close(complete)
    print(progress.summary(out), file=sys.stderr)
    return 1 if progress.errors == progress.images else 0
