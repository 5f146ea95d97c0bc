"""Dynamic batching: concurrent requests for one model share a model call.

Greedy, like Triton's dynamic batcher: whenever the model is free, everything queued (up to
`max_batch_size` images) goes into the next call. A lone request runs at once. A request whose client
has gone is left out: its future is done (cancelled), or its hang-up probe says so (the socket knows
before the busy event loop reads it). The batcher only queues: it hands the call the requests' arrays as
they are, and each request gets its own rows of what the call returns.

Two ways to run the calls. A model whose calls cost little (`inline`: LeNet on a CPU)
runs them in the event loop itself: the requests that reach the batcher in one pass of the loop share
one call, made before the loop moves on, with no thread hand-off (which cost more than LeNet's call).
grpc.aio takes in one call per pass, so while calls hold more than one request (under load) a gRPC
request's call first waits GATHER_S, and the requests of the loop's next passes join it (of a lone
client's calls, one at a time, only the first after a burst waits).
Any other model has its own thread that loops over the queue, so under load the next batch starts the
moment the last one ends instead of when the busy event loop gets round to it; there a call whose
queued work is estimated below GATHER_S first waits GATHER_S (2 ms) for more. BENCHMARKS.md has the
measurements behind both.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol, TypeAlias

import numpy as np

from service.errors import ClientGone, Overloaded
from service.inference.metrics import ABANDONED_IMAGES

logger = logging.getLogger("cifar10.batching")
# Under load, a model call whose queued work is estimated below this waits this long for more (inline: gRPC's requests).
GATHER_S = 0.002
SWEEP_S = 0.005  # when about to refuse for a long queue or too many requests: how often to look for hung-up ones
HangUpProbe: TypeAlias = Callable[[], bool]  # whether a request's client has closed its connection


class Deferred(Exception):
    """A call dropped because the batcher gives way to another (a shadow to its live model) that has work queued."""


class Rows(Protocol):
    """What a model call returns: one row per input image, sliced per request."""

    def __len__(self) -> int: ...

    def __getitem__(self, rows: slice) -> Rows: ...


ModelCall: TypeAlias = Callable[[list[np.ndarray]], Rows]  # the requests' arrays -> their rows, in order


@dataclass
class _Pending:
    inputs: np.ndarray
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    hung_up: HangUpProbe | None = None
    queued_at: float = field(default_factory=time.monotonic)
    queued: bool = False  # its images are counted in the batcher's queued_images


def _settle(results: list[tuple[asyncio.Future, tuple | BaseException]], model: str = "") -> None:
    for future, result in results:
        if future.done():  # cancelled: the request timed out or its client went away; dropped without a word
            if model and not isinstance(result, BaseException):
                ABANDONED_IMAGES.labels(model=model, outcome="discarded").inc(len(result[0]))
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)


def _hand_back(results: list[tuple[_Pending, tuple | BaseException]], model: str = "") -> None:
    """Pass results to their event loops from the model thread: one wake-up per loop, not per request."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for pending, result in results:
        by_loop.setdefault(pending.loop, []).append((pending.future, result))
    for loop, settled in by_loop.items():
        loop.call_soon_threadsafe(_settle, settled, model)


class Batcher:
    """Queue and model thread for one model; `await batcher.call(inputs)` returns that request's rows of the output."""

    def __init__(
        self,
        name: str,
        run: ModelCall,
        max_batch_size: int,
        max_latency_s: float,
        device_lock: threading.Lock,
        inline: bool = False,
        gives_way: Callable[[], bool] | None = None,
    ) -> None:
        """`run` is the blocking model call, given the arrays of the requests in a batch; `device_lock` is shared by
        the models that share the cores. `inline`: run the calls in the event loop (for a cheap model), not in a
        thread of its own. `gives_way()`: when true as a call is about to run, its requests get Deferred instead."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_latency_s <= 0:
            raise ValueError(f"max_latency_s must be positive, got {max_latency_s}")
        self.name = name
        self.run = run
        self.max_batch_size = max_batch_size
        self.max_latency_s = max_latency_s
        self.device_lock = device_lock
        self.queue: deque[_Pending] = deque()
        self.queued_images = 0
        self.seconds_per_image = 0.0  # running estimate, to shed at once what could not be served in time
        self.last_batch = 0  # requests in the last call: more than one means requests are overlapping
        self.inline = inline
        self.gives_way = gives_way
        self.passing: list[_Pending] = []  # inline: the requests of this pass of the event loop
        self.last_sweep = 0.0
        self.ready = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._serve, name=f"batcher-{name}", daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop the model thread once the queue is empty (requests still queued are answered first)."""
        with self.ready:
            self.closed = True
            self.ready.notify()
        self.thread.join()

    async def call(
        self, inputs: np.ndarray, hung_up: HangUpProbe | None = None, one_per_pass: bool = False
    ) -> tuple[Rows, int]:
        """This request's rows of the output, and how many images the model call that made them held. Raises
        ClientGone where `hung_up()` turns true before its images go into a call. `one_per_pass`: requests like
        this one reach the batcher one per pass of the event loop (gRPC's)."""
        loop = asyncio.get_running_loop()
        pending = _Pending(inputs, loop.create_future(), loop, hung_up)
        if self.inline:
            if not self.passing and one_per_pass and self.last_batch > 1:  # under load: gather the next passes'
                loop.call_later(GATHER_S, self._run_passing)
            elif not self.passing:
                loop.call_soon(self._run_passing)  # after the requests already scheduled in this pass
            self.passing.append(pending)
            return await pending.future
        self._enqueue([pending])
        return await pending.future

    def _enqueue(self, pendings: list[_Pending]) -> None:
        with self.ready:
            if self.queued_images * self.seconds_per_image > self.max_latency_s:  # its wait, not its own call
                self._sweep()
            if self.queued_images * self.seconds_per_image > self.max_latency_s:
                raise self._overloaded()
            self.queue.extend(pendings)
            self.queued_images += sum(len(p.inputs) for p in pendings)
            for pending in pendings:
                pending.queued = True
                pending.future.add_done_callback(lambda _, pending=pending: self._unqueue(pending))
            self.ready.notify()

    def _unqueue(self, pending: _Pending) -> None:
        """Stop counting a request that has gone while queued: the work ahead of new requests is what is left."""
        with self.ready:
            if pending.queued:
                pending.queued = False
                self.queued_images -= len(pending.inputs)

    def _sweep(self) -> None:
        """Drop the queued requests whose clients have hung up, so that they shed no live one; at most once per
        SWEEP_S (the queue is long here). In the event loop."""
        now = time.monotonic()
        if now - self.last_sweep < SWEEP_S:
            return
        self.last_sweep = now
        live, gone = self._parted(self.queue)
        self.queue = deque(live)
        for pending in gone:
            self._unqueue(pending)
        _settle([(p.future, ClientGone()) for p in gone])

    def _run_passing(self) -> None:
        """Inline: the model calls for this pass's requests, in the event loop; to the thread if a call of another
        model holds the device."""
        (passing, gone), self.passing = self._parted(self.passing), []
        _settle([(p.future, ClientGone()) for p in gone])
        while passing:
            batch, images = [], 0
            while passing and (not batch or images + len(passing[0].inputs) <= self.max_batch_size):
                batch.append(passing.pop(0))
                images += len(batch[-1].inputs)
            if not self.device_lock.acquire(blocking=False):
                try:
                    self._enqueue(batch + passing)
                except Overloaded as exc:
                    _settle([(p.future, exc) for p in batch + passing])
                return
            try:
                _settle(self._outputs(batch), self.name)
            finally:
                self.device_lock.release()

    def _serve(self) -> None:
        while not (self.closed and not self.queue):
            try:
                self._serve_next()
            except Exception:  # never let the thread die: every later request would time out
                logger.exception("batcher failed; continuing")

    def _serve_next(self) -> None:
        """Wait for work, then run one batch."""
        with self.ready:
            self.ready.wait_for(lambda: self.queue or self.closed)
            cheap = self.queued_images * self.seconds_per_image < GATHER_S
            busy = len(self.queue) > 1 or self.last_batch > 1
            gather = cheap and busy and self.queued_images < self.max_batch_size
        if gather:  # a call this cheap costs less than the thread hand-offs around it: let more arrive
            time.sleep(GATHER_S)
        with self.ready:
            batch = self._take()
        if batch and self.gives_way is not None and self.gives_way():
            _hand_back([(pending, Deferred()) for pending in batch])
        elif batch:
            self._call(batch)

    def _take(self) -> list[_Pending]:
        """Pop queued requests up to max_batch_size images; shed those that waited too long."""
        batch: list[_Pending] = []
        left: list[tuple[_Pending, BaseException]] = []
        images = 0
        now = time.monotonic()
        while self.queue and (not batch or images + len(self.queue[0].inputs) <= self.max_batch_size):
            pending = self.queue.popleft()
            self._unqueue(pending)  # the condition's lock is re-entrant
            if self._abandoned(pending):
                left.append((pending, ClientGone()))  # told only if its request still waits (hung up, not cancelled)
            elif now - pending.queued_at > self.max_latency_s:
                left.append((pending, self._overloaded()))
            else:
                batch.append(pending)
                images += len(pending.inputs)
        _hand_back(left)
        return batch

    def _parted(self, pendings: Iterable[_Pending]) -> tuple[list[_Pending], list[_Pending]]:
        """(the live requests, the abandoned ones)."""
        live: list[_Pending] = []
        gone: list[_Pending] = []
        for pending in pendings:
            (gone if self._abandoned(pending) else live).append(pending)
        return live, gone

    def _abandoned(self, pending: _Pending) -> bool:
        """Whether the request has gone (timed out, or its client disconnected, as its future or its hang-up probe
        says): its images are skipped."""
        if pending.future.done() or (pending.hung_up is not None and pending.hung_up()):
            ABANDONED_IMAGES.labels(model=self.name, outcome="skipped").inc(len(pending.inputs))
            return True
        return False

    def _overloaded(self) -> Overloaded:
        return Overloaded(
            f"the server is overloaded (requests would wait over {self.max_latency_s * 1000:g} ms); retry shortly"
        )

    def _call(self, batch: list[_Pending]) -> None:
        with self.device_lock:
            results = self._outputs(batch)
        _hand_back([(pending, result) for pending, (_, result) in zip(batch, results, strict=True)], self.name)

    def _outputs(self, batch: list[_Pending]) -> list[tuple[asyncio.Future, tuple | BaseException]]:
        """One model call for `batch` (the device held): each request's rows of the output, or the call's error."""
        self.last_batch = len(batch)
        images = sum(len(p.inputs) for p in batch)
        try:
            started = time.perf_counter()
            outputs = self.run([p.inputs for p in batch])
            per_image = (time.perf_counter() - started) / images
        except Exception as exc:  # a failed call fails its own requests, never the thread
            logger.exception("model call failed")
            return [(pending.future, exc) for pending in batch]
        self.seconds_per_image = 0.8 * (self.seconds_per_image or per_image) + 0.2 * per_image
        ends = np.cumsum([len(p.inputs) for p in batch])
        return [(p.future, (outputs[end - len(p.inputs) : end], images)) for p, end in zip(batch, ends, strict=True)]
