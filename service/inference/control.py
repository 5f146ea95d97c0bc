"""Live model changes across a server's workers, behind the model-control routes (service/http/repository.py).

The workers share nothing but files, in their server's folder in BentoML's home (cifar10-repository/<server pid>/),
as they share the keys file:
- `state.json`: what every worker serves, per name (a NamePlan), and its generation. A worker that starts, or is
  restarted, serves what it holds; the first one writes it from CIFAR10_MODELS. A new server starts from
  CIFAR10_MODELS again: the deployment's settings stay the truth, and a live change is an operation, not config.
- `change-NAME.json`: a change of NAME under way: its id and the new plan.
- `worker-N.json`: what worker N serves (its generation and /models' view), and its answer to each prepare.
- `NAME.lock`: held (flock) by the worker that runs a change of NAME, so a second one is refused (409).

A change, run by the worker the call reached: every worker loads the versions of the new plan it lacks (each warmed
and self-checked) beside what it serves, and answers. If all succeed, state.json gets the plan at the next generation
and each worker swaps to it (one assignment) within WATCH_S; if one fails, every worker drops what it loaded and the
caller gets that worker's reason. So a failed load anywhere leaves every worker on the old version.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio

from service.errors import Conflict, LoadFailed, NotFound
from service.inference.model import ModelSource
from service.inference.repository import ModelRepository, NamePlan, Serving
from service.log import say

logger = logging.getLogger("cifar10.control")
WATCH_S = 0.1  # how often a worker looks for a change
PREPARE_S = 300.0  # how long a change waits for every worker to load its versions
SWAP_S = 5.0  # how long a change waits for every worker to serve it, once prepared
REPORT_S = 1.0  # how often a worker rewrites its worker-N.json for its shadows' figures


@dataclass
class Prepared:
    """What a worker loaded for a change under way, by version."""

    name: str
    loaded: dict[str, Serving]


def write_json(path: Path, data: dict) -> None:
    """Atomically: a reader sees the old file or the new one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(json.dumps(data))
    os.replace(temporary, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class ModelControl:
    """A worker's part in live changes: it applies what the folder says, and runs the changes called on it."""

    def __init__(
        self,
        repository: ModelRepository,
        folder: Path,
        worker: int,
        workers: int,
        sources: dict[tuple[str, str], ModelSource],
    ) -> None:
        """`worker`: this worker's 1-based index among `workers`; `sources`: the versions the server resolved
        from CIFAR10_MODELS, loaded without a second look at the store."""
        self.repository, self.folder, self.worker, self.workers, self.sources = (
            repository,
            folder,
            worker,
            workers,
            sources,
        )
        self.generation = -1
        self.prepared: dict[str, Prepared] = {}  # by change id
        self.answers: dict[str, dict] = {}  # by change id: this worker's answer to its prepare
        self.reported = 0.0
        self.task: asyncio.Task | None = None

    # The worker's side: apply the folder.

    def start(self, initial: dict[str, NamePlan]) -> None:
        """Serve what state.json says (writing it from `initial` if this is the server's first worker). Blocking."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._state_lock():
            state = read_json(self.folder / "state.json")
            if state is None:
                state = {"generation": 0, "models": {name: plan.as_dict() for name, plan in initial.items()}}
                write_json(self.folder / "state.json", state)
                _remove_ended_servers(self.folder.parent)
        for name, plan in state["models"].items():
            plan = NamePlan.from_dict(plan)
            loaded = {version: self._load(name, version) for version in plan.versions}
            self.repository.serve(name, plan, loaded)
        self.generation = state["generation"]
        self._report()

    def watch(self) -> None:
        """Start looking at the folder every WATCH_S, in the worker's event loop."""
        self.task = asyncio.get_running_loop().create_task(self._watch())

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def _watch(self) -> None:
        while True:
            try:
                await self._look()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bad file or a failed load must not end the watch: the next look tries again
                logger.exception("cifar10: the model-control watch failed; looking again")
            await asyncio.sleep(WATCH_S)

    async def _look(self) -> None:
        changes = {}
        for path in self.folder.glob("change-*.json"):
            change = read_json(path)
            if change is not None:
                changes[change["id"]] = change
        for change_id, change in changes.items():
            if change_id not in self.answers:
                self.answers[change_id] = await self._prepare(change_id, change)
                self._report()
        state = read_json(self.folder / "state.json")
        if state is not None and state["generation"] > self.generation:
            await self._apply(state)
            self._report()
        for change_id in [c for c in self.answers if c not in changes]:  # ended: committed, or failed somewhere
            del self.answers[change_id]
            left = self.prepared.pop(change_id, None)
            if left is not None:
                await self._close([s.batcher for s in left.loaded.values()])
        if time.monotonic() - self.reported > REPORT_S and any(e.shadow for e in self.repository.entries.values()):
            self._report()

    async def _prepare(self, change_id: str, change: dict) -> dict:
        """Load the versions the change's plan needs that this worker lacks; this worker's answer."""
        name = change["name"]
        plan = NamePlan.from_dict(change["plan"]) if change["plan"] else None
        loaded: dict[str, Serving] = {}
        try:
            for version in plan.versions if plan else ():
                if self.repository.loaded(name, version) is None:
                    loaded[version] = await anyio.to_thread.run_sync(self._load, name, version)
        except (NotFound, LoadFailed) as exc:
            await self._close([s.batcher for s in loaded.values()])
            status = 404 if isinstance(exc, NotFound) else exc.status
            return {"ok": False, "status": status, "error": str(exc)}
        self.prepared[change_id] = Prepared(name, loaded)
        return {"ok": True}

    async def _apply(self, state: dict) -> None:
        """Serve the plans of `state` that differ from what this worker serves, with what it prepared for them."""
        plans = {name: NamePlan.from_dict(plan) for name, plan in state["models"].items()}
        for name in [*self.repository.entries, *(n for n in plans if n not in self.repository.entries)]:
            plan = plans.get(name)
            if plan == self.repository.plans().get(name):
                continue
            extra = {}
            for change_id, prepared in list(self.prepared.items()):
                if prepared.name == name:
                    extra |= self.prepared.pop(change_id).loaded
            for version in plan.versions if plan else ():
                if self.repository.loaded(name, version) is None and version not in extra:  # a worker that missed
                    extra[version] = await anyio.to_thread.run_sync(self._load, name, version)
            unused = self.repository.serve(name, plan, extra)
            await self._close(unused)
        self.generation = state["generation"]

    def _load(self, name: str, version: str) -> Serving:
        source = self.sources.get((name, version))
        return self.repository.load_source(source) if source else self.repository.load(name, version)

    @staticmethod
    async def _close(batchers: list) -> None:
        for batcher in batchers:  # each answers what it has queued first
            await anyio.to_thread.run_sync(batcher.close)

    def _report(self) -> None:
        self.reported = time.monotonic()
        write_json(
            self.folder / f"worker-{self.worker}.json",
            {
                "worker": self.worker,
                "pid": os.getpid(),
                "generation": self.generation,
                "answers": self.answers,
                "serving": {
                    name: {
                        "version": entry.answering.model.version,
                        "store_version": entry.plan.version,
                        "warm_versions": list(entry.plan.warm),
                        "shadow": entry.shadow.describe() if entry.shadow else None,
                    }
                    for name, entry in self.repository.entries.items()
                },
            },
        )

    # The coordinator's side: a change called on this worker.

    async def change(self, name: str, planned: Callable[[NamePlan | None], NamePlan | None]) -> dict:
        """Run a change of `name` on every worker: `planned(current plan)` gives the new plan (None: unload), or
        raises the caller's mistake. Returns what every worker serves after it."""
        lock = self._name_lock(name)
        try:
            state = read_json(self.folder / "state.json") or {"models": {}}
            current = state["models"].get(name)
            plan = planned(NamePlan.from_dict(current) if current else None)
            change_id = uuid.uuid4().hex
            change_file = self.folder / f"change-{name}.json"
            change = {"id": change_id, "name": name, "plan": plan.as_dict() if plan else None}
            write_json(change_file, change)
            try:
                answers = await self._answers(lambda report: report["answers"].get(change_id), PREPARE_S)
                failed = next((a for a in answers.values() if a is not None and not a["ok"]), None)
                if failed is not None or None in answers.values():  # a worker's reason before another's silence
                    raise _failure(failed, answers)
                generation = self._commit(name, plan)
                await self._answers(lambda report: report["generation"] >= generation or None, SWAP_S)
            finally:
                change_file.unlink(missing_ok=True)  # every worker drops what it loaded and did not serve
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            os.close(lock)
        say(f"cifar10: {name}: {_said(plan)} on every worker (generation {generation})")
        return {"generation": generation, "workers": self.workers_serving()}

    def _commit(self, name: str, plan: NamePlan | None) -> int:
        with self._state_lock():
            state = read_json(self.folder / "state.json")
            if plan is None:
                state["models"].pop(name, None)
            else:
                state["models"][name] = plan.as_dict()
            state["generation"] += 1
            write_json(self.folder / "state.json", state)
            return state["generation"]

    async def _answers(self, answer: Callable[[dict], object], within_s: float) -> dict[int, object]:
        """Each worker's answer (None where it has given none within `within_s`), as soon as all have answered or
        one has failed."""
        deadline = time.monotonic() + within_s
        while True:
            answers = {}
            for worker in range(1, self.workers + 1):
                report = read_json(self.folder / f"worker-{worker}.json")
                answers[worker] = answer(report) if report else None
            given = [a for a in answers.values() if a is not None]
            failed = any(isinstance(a, dict) and not a["ok"] for a in given)
            if len(given) == len(answers) or failed or time.monotonic() > deadline:
                return answers
            await asyncio.sleep(WATCH_S / 2)

    def workers_serving(self) -> dict[str, dict]:
        """What each worker serves, from its report."""
        reports = {}
        for worker in range(1, self.workers + 1):
            report = read_json(self.folder / f"worker-{worker}.json")
            if report is not None:
                reports[str(worker)] = {"pid": report["pid"], "generation": report["generation"], **report["serving"]}
        return reports

    def loading(self) -> set[tuple[str, str]]:
        """The (name, version) pairs that the changes under way load."""
        loading = set()
        for path in self.folder.glob("change-*.json"):
            change = read_json(path)
            if change and change["plan"]:
                name = change["name"]
                loading |= {(name, v) for v in NamePlan.from_dict(change["plan"]).versions}
        return loading

    def _name_lock(self, name: str) -> int:
        lock = os.open(self.folder / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            raise Conflict(f"a change of {name} is under way; try again when it has ended") from None
        return lock

    @contextlib.contextmanager
    def _state_lock(self):
        with open(self.folder / "state.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield


def _remove_ended_servers(parent: Path) -> None:
    """The folders of servers that have ended (named by their process IDs)."""
    for folder in parent.iterdir():
        if folder.name.isdigit() and not _running(int(folder.name)):
            shutil.rmtree(folder, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _failure(answer: dict | None, answers: dict) -> Exception:
    if answer is None:
        missing = [str(w) for w, a in answers.items() if a is None]
        return LoadFailed(f"worker {', '.join(missing)} did not load it within {PREPARE_S:g} s; nothing changed", 503)
    if answer["status"] == 404:
        return NotFound(answer["error"])
    return LoadFailed(f"{answer['error']}; nothing changed", answer["status"])


def _said(plan: NamePlan | None) -> str:
    if plan is None:
        return "unloaded"
    shadow = f", shadow {plan.shadow} on {plan.sample:.0%} of requests" if plan.shadow else ""
    warm = f", warm {', '.join(plan.warm)}" if plan.warm else ""
    return f"version {plan.version} answers{warm}{shadow}"
