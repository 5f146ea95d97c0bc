"""The dynamic batcher, driven with the shipped LeNet in ONNX Runtime, and its batch-size buckets."""

import asyncio
import threading

import numpy as np
import pytest

from core.runtime import OnnxModel, rank
from core.store import shipped_file
from harness.inference import in_process, shipped_sources
from service.errors import Overloaded
from service.inference import batcher as batcher_module
from service.inference import model as model_module
from service.inference.batcher import Batcher
from service.inference.loading import Host, load
from service.inference.model import Ranked, ServedModel, bucket_sizes
from service.inference.repository import ModelRepository
from service.settings import Settings


@pytest.fixture(scope="module")
def lenet() -> OnnxModel:
    return OnnxModel(shipped_file("lenet"), providers="cpu")


class Recorded:
    """A model call that records the batch sizes it was given; optionally slow, or failing on a marker."""

    def __init__(self, model: OnnxModel, delay_s: float = 0.0) -> None:
        self.model, self.delay_s, self.sizes = model, delay_s, []

    def __call__(self, parts: list[np.ndarray]) -> np.ndarray:
        batch = np.concatenate(parts)
        self.sizes.append(len(batch))
        threading.Event().wait(self.delay_s)
        if np.isnan(batch).any():
            raise ValueError("NaN input")
        return self.model.logits(batch)


async def rows(batcher: Batcher, x: np.ndarray) -> np.ndarray:
    """A request's own rows of the call's output."""
    return (await batcher.call(x))[0]


def inputs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


def each_gets_its_own_rows(batcher: Batcher, lenet: OnnxModel) -> list[np.ndarray]:
    """24 concurrent requests of 1-3 images each: every one gets LeNet's rows for its own inputs. The requests."""
    requests = [inputs(1 + i % 3, seed=i) for i in range(24)]

    async def main() -> list[np.ndarray]:
        return await asyncio.gather(*(rows(batcher, x) for x in requests))

    for x, answered in zip(requests, asyncio.run(main()), strict=True):
        assert np.allclose(answered, lenet.logits(x), atol=1e-5)
    return requests


def test_concurrent_requests_share_calls_and_get_their_own_rows(lenet) -> None:
    run = Recorded(lenet, delay_s=0.05)
    batcher = Batcher("lenet", run, max_batch_size=64, max_latency_s=5, device_lock=threading.Lock())
    requests = each_gets_its_own_rows(batcher, lenet)
    assert sum(run.sizes) == sum(len(x) for x in requests)
    assert len(run.sizes) < len(requests) and max(run.sizes) <= 64


def test_a_failing_call_fails_its_own_requests_only(lenet) -> None:
    batcher = Batcher("lenet", Recorded(lenet), max_batch_size=1, max_latency_s=5, device_lock=threading.Lock())
    bad = inputs(1, seed=0)
    bad[0, 0, 0, 0] = np.nan

    async def main() -> list:
        return await asyncio.gather(
            rows(batcher, inputs(1, 1)), rows(batcher, bad), rows(batcher, inputs(1, 2)), return_exceptions=True
        )

    good1, failed, good2 = asyncio.run(main())
    assert isinstance(failed, ValueError)
    assert good1.shape == good2.shape == (1, 10)


def test_work_that_cannot_be_served_in_time_is_shed(lenet) -> None:
    run = Recorded(lenet, delay_s=0.05)
    batcher = Batcher("lenet", run, max_batch_size=1, max_latency_s=0.08, device_lock=threading.Lock())

    async def main() -> list:
        return await asyncio.gather(*(rows(batcher, inputs(1, i)) for i in range(8)), return_exceptions=True)

    results = asyncio.run(main())
    shed = [r for r in results if isinstance(r, Overloaded)]
    assert 0 < len(shed) < 8 and sum(len(r) for r in results if isinstance(r, np.ndarray)) == 8 - len(shed)


def test_a_model_slower_than_max_latency_still_serves_a_lone_request(lenet) -> None:
    """Shedding looks at the wait before a call, so an empty queue always admits (no starvation)."""
    batcher = Batcher(
        "lenet", Recorded(lenet, delay_s=0.05), max_batch_size=1, max_latency_s=0.02, device_lock=threading.Lock()
    )

    async def main() -> list[np.ndarray]:
        return [await rows(batcher, inputs(1, i)) for i in range(3)]

    assert [r.shape for r in asyncio.run(main())] == [(1, 10)] * 3
    assert batcher.seconds_per_image > batcher.max_latency_s


def served_lenet(buckets: tuple[int, ...] = ()) -> ServedModel:
    """The shipped LeNet as a worker serves it, at batch sizes `buckets` (empty: any)."""
    [source] = shipped_sources(("lenet",))
    return load(source, Settings(), Host(on_cpu=True, threads=2, bucket_sizes=buckets))


def test_bucket_sizes_are_powers_of_two_up_to_the_largest_batch() -> None:
    assert bucket_sizes(64) == (1, 2, 4, 8, 16, 32, 64)
    assert bucket_sizes(100) == (1, 2, 4, 8, 16, 32, 64, 100) and bucket_sizes(1) == (1,)
    with pytest.raises(ValueError, match="bucket_sizes must rise"):
        ModelRepository(Settings(), Host(on_cpu=True, threads=1, bucket_sizes=(1, 2, 32)))


def test_with_buckets_every_model_call_sees_a_bucket_size_and_padding_changes_no_answer(lenet, monkeypatch) -> None:
    buckets = bucket_sizes(16)
    model = served_lenet(buckets)
    sizes = []
    real = model.all_cores.logits_and_scores
    monkeypatch.setattr(model.all_cores, "logits_and_scores", lambda batch: sizes.append(len(batch)) or real(batch))

    def slowed(parts: list[np.ndarray]) -> Ranked:  # long enough for concurrent requests to share calls
        threading.Event().wait(0.02)
        return model(parts)

    batcher = Batcher("lenet", slowed, max_batch_size=16, max_latency_s=5, device_lock=threading.Lock())
    requests = [inputs(1 + i % 5, seed=i) for i in range(30)]  # 1-5 images each: odd totals per call

    async def main() -> list[Ranked]:
        together = await asyncio.gather(*(rows(batcher, x) for x in requests))
        alone = [await rows(batcher, x) for x in requests[2:5]]  # 3, 4 and 5 images on their own: 4, 4, 8
        return [*together, *alone]

    results = asyncio.run(main())
    requests += requests[2:5]
    assert set(sizes) <= set(buckets) and sizes[-3:] == [4, 4, 8]
    for x, ranked in zip(requests, results, strict=True):
        assert len(ranked) == len(x) and np.allclose(ranked.classes, rank(lenet.logits(x), lenet.temperature))


def test_start_up_runs_every_bucket_of_every_session_before_serving(monkeypatch) -> None:
    seen: list[int] = []
    real = OnnxModel.logits
    monkeypatch.setattr(OnnxModel, "logits", lambda self, batch: seen.append(len(batch)) or real(self, batch))
    inference = in_process(Settings(batch_buckets="on", max_batch_size=32))
    buckets = inference.repository.host.bucket_sizes
    assert buckets == (1, 2, 4, 8, 16, 32)
    assert seen[:6] == [*buckets] and seen[8:14] == [*buckets]  # both models, each shape once, before serving
    assert set(seen) <= set(buckets)  # and no other shape, ever
    assert inference.describe()["batching"]["bucket_sizes"] == [1, 2, 4, 8, 16, 32]
    cpu = in_process(Settings(providers="cpu"))  # auto: no buckets on the CPU
    assert cpu.repository.host.bucket_sizes == ()


def test_inline_the_requests_of_one_pass_share_one_call_in_the_event_loop(lenet) -> None:
    """An inline batcher makes its calls in the event loop: the 24 requests gathered in one pass are one call
    (chunked by max_batch_size), on the loop's own thread, each answered with its own rows."""
    run = Recorded(lenet)
    threads = []
    recorded = run.__call__

    def on_which_thread(batch: np.ndarray) -> np.ndarray:
        threads.append(threading.current_thread())
        return recorded(batch)

    batcher = Batcher(
        "lenet", on_which_thread, max_batch_size=32, max_latency_s=5, device_lock=threading.Lock(), inline=True
    )
    each_gets_its_own_rows(batcher, lenet)
    assert sum(run.sizes) == 48 and len(run.sizes) == 2 and max(run.sizes) <= 32  # one pass, two calls
    assert set(threads) == {threading.main_thread()}


def test_inline_under_load_grpc_requests_of_the_next_passes_join_the_call(lenet, monkeypatch) -> None:
    """Once a call has held more than one request, a gRPC request's call (they arrive one per pass of the loop)
    waits GATHER_S, and requests arriving in the next passes join it; a lone client's calls, and REST's (which
    arrive together), run at once."""
    monkeypatch.setattr(batcher_module, "GATHER_S", 0.5)  # far longer than the passes below take on any host
    run = Recorded(lenet)
    batcher = Batcher("lenet", run, max_batch_size=64, max_latency_s=60, device_lock=threading.Lock(), inline=True)

    async def after(passes: int, one_per_pass: bool = True) -> np.ndarray:
        for _ in range(passes):
            await asyncio.sleep(0)
        return (await batcher.call(inputs(1, seed=passes), one_per_pass=one_per_pass))[0]

    async def main() -> None:
        for _ in range(3):  # one client, one call at a time
            await after(0)
        await asyncio.gather(after(0), after(0))  # one pass, one call
        answered = await asyncio.gather(*(after(passes) for passes in range(4)))
        for passes, answer in enumerate(answered):
            assert np.allclose(answer, lenet.logits(inputs(1, seed=passes)), atol=1e-5)
        await asyncio.gather(*(after(passes, one_per_pass=False) for passes in range(2)))
        await after(0)

    asyncio.run(main())
    assert run.sizes == [1, 1, 1, 2, 4, 1, 1, 1]


def test_inline_calls_go_to_the_thread_while_another_model_holds_the_device(lenet) -> None:
    device = threading.Lock()
    run = Recorded(lenet)
    batcher = Batcher("lenet", run, max_batch_size=64, max_latency_s=5, device_lock=device, inline=True)

    async def main() -> np.ndarray:
        device.acquire()  # another model's call, in its own thread, for 0.1 s
        threading.Timer(0.1, device.release).start()
        return await rows(batcher, inputs(2, seed=0))

    assert np.allclose(asyncio.run(main()), lenet.logits(inputs(2, seed=0)), atol=1e-5) and run.sizes == [2]


def test_uint8_pixels_are_prepared_once_per_call_and_float_inputs_pass_as_they_are(lenet, monkeypatch) -> None:
    prepared = []
    real = model_module.normalize

    def recording(pixels: np.ndarray, table: np.ndarray) -> np.ndarray:
        prepared.append(len(pixels))
        return real(pixels, table)

    monkeypatch.setattr(model_module, "normalize", recording)
    batcher = Batcher("lenet", served_lenet(), 64, 5, threading.Lock(), inline=True)
    pixels = [np.random.default_rng(i).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8) for i in range(3)]

    async def main() -> list[Ranked]:
        return await asyncio.gather(*(rows(batcher, x) for x in pixels), rows(batcher, inputs(1, seed=9)))

    *from_pixels, from_floats = asyncio.run(main())
    for x, ranked in zip(pixels, from_pixels, strict=True):
        expected = rank(lenet.logits(real(x, lenet.table)), lenet.temperature)
        assert np.allclose(ranked.classes, expected, atol=1e-5)
    expected = rank(lenet.logits(inputs(1, seed=9)), lenet.temperature)
    assert np.allclose(from_floats.classes, expected, atol=1e-5) and prepared == [2, 2, 2]
