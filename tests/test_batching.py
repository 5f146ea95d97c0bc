"""The dynamic batcher, driven with the shipped LeNet in ONNX Runtime."""

import asyncio
import threading

import numpy as np
import pytest

from core.runtime import OnnxModel
from core.store import shipped_file
from service.batching import Batcher
from service.errors import Overloaded


@pytest.fixture(scope="module")
def lenet() -> OnnxModel:
    return OnnxModel(shipped_file("lenet"), providers="cpu")


class Recorded:
    """A model call that records the batch sizes it was given; optionally slow, or failing on a marker."""

    def __init__(self, model: OnnxModel, delay_s: float = 0.0) -> None:
        self.model, self.delay_s, self.sizes = model, delay_s, []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.sizes.append(len(batch))
        threading.Event().wait(self.delay_s)
        if np.isnan(batch).any():
            raise ValueError("NaN input")
        return self.model.logits(batch)


def inputs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


def test_concurrent_requests_share_calls_and_get_their_own_rows(lenet) -> None:
    run = Recorded(lenet, delay_s=0.05)
    batcher = Batcher("lenet", run, max_batch_size=64, max_latency_s=5, device_lock=threading.Lock())
    requests = [inputs(1 + i % 3, seed=i) for i in range(24)]

    async def main() -> list[np.ndarray]:
        return await asyncio.gather(*(batcher(x) for x in requests))

    results = asyncio.run(main())
    for x, rows in zip(requests, results, strict=True):
        assert np.allclose(rows, lenet.logits(x), atol=1e-5)
    assert sum(run.sizes) == sum(len(x) for x in requests)
    assert len(run.sizes) < len(requests) and max(run.sizes) <= 64


def test_a_failing_call_fails_its_own_requests_only(lenet) -> None:
    batcher = Batcher("lenet", Recorded(lenet), max_batch_size=1, max_latency_s=5, device_lock=threading.Lock())
    bad = inputs(1, seed=0)
    bad[0, 0, 0, 0] = np.nan

    async def main() -> list:
        return await asyncio.gather(batcher(inputs(1, 1)), batcher(bad), batcher(inputs(1, 2)),
                                    return_exceptions=True)

    good1, failed, good2 = asyncio.run(main())
    assert isinstance(failed, ValueError)
    assert good1.shape == good2.shape == (1, 10)


def test_work_that_cannot_be_served_in_time_is_shed(lenet) -> None:
    run = Recorded(lenet, delay_s=0.05)
    batcher = Batcher("lenet", run, max_batch_size=1, max_latency_s=0.08, device_lock=threading.Lock())

    async def main() -> list:
        return await asyncio.gather(*(batcher(inputs(1, i)) for i in range(8)), return_exceptions=True)

    results = asyncio.run(main())
    shed = [r for r in results if isinstance(r, Overloaded)]
    assert 0 < len(shed) < 8 and sum(len(r) for r in results if isinstance(r, np.ndarray)) == 8 - len(shed)


def test_a_model_slower_than_max_latency_still_serves_a_lone_request(lenet) -> None:
    """Shedding looks at the wait before a call, so an empty queue always admits (no starvation)."""
    batcher = Batcher("lenet", Recorded(lenet, delay_s=0.05), max_batch_size=1, max_latency_s=0.02,
                      device_lock=threading.Lock())

    async def main() -> list[np.ndarray]:
        return [await batcher(inputs(1, i)) for i in range(3)]

    assert [r.shape for r in asyncio.run(main())] == [(1, 10)] * 3
    assert batcher.seconds_per_image > batcher.max_latency_s
