"""A shadow: a candidate version computed on a sample of a model's live requests, off the critical path, and
compared with the live answers before it answers anyone.

A sampled request's images go to the shadow once its live answer is ready, in a task of their own: the live answer
never waits for them and never sees their errors. The shadow gives way to the live model: a request is skipped
while the live model has a queue, and a shadow call about to run while the live model has one is dropped (both
counted as skipped images).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import numpy as np
from prometheus_client import Counter

from service.inference.batcher import Batcher
from service.inference.model import Ranked

SHADOW_IMAGES = Counter(
    "cifar10_shadow_images_total",
    "Images of live requests computed by a shadow version (outcome=computed) or skipped while the host was busy",
    ["model", "version", "outcome"],
)
SHADOW_AGREEMENTS = Counter(
    "cifar10_shadow_agreements_total",
    "Shadowed images whose top-1 class equals the live answer's",
    ["model", "version"],
)
SHADOW_TOP1 = Counter(
    "cifar10_shadow_top1_probability_sum",
    "Sum of the top-1 probabilities of shadowed images, by the copy that gave them (live or shadow)",
    ["model", "version", "copy"],
)
SHADOW_FLAGGED = Counter(
    "cifar10_shadow_out_of_distribution_images_total",
    "Shadowed images flagged out of distribution, by the copy that flagged them (live or shadow)",
    ["model", "version", "copy"],
)


@dataclass
class Tally:
    """What a shadow has seen, in this worker: images computed and skipped, top-1 agreements with the live answers,
    and each copy's summed top-1 probability and flagged images."""

    images: int = 0
    skipped: int = 0
    agreements: int = 0
    live_top1: float = 0.0
    shadow_top1: float = 0.0
    live_flagged: int = 0
    shadow_flagged: int = 0

    def describe(self) -> dict:
        share = (lambda count: count / self.images) if self.images else (lambda count: None)
        return {
            "images": self.images,
            "skipped_images": self.skipped,
            "top1_agreement": share(self.agreements),
            "mean_top1_probability": {"live": share(self.live_top1), "shadow": share(self.shadow_top1)},
            "flagged_share": {"live": share(self.live_flagged), "shadow": share(self.shadow_flagged)},
        }


class Shadow:
    """A shadow version (its batcher: `batcher`) of model `name`, on a `sample` share of live requests."""

    def __init__(self, name: str, version: str, batcher: Batcher, threshold: float | None, sample: float) -> None:
        self.name, self.version, self.batcher, self.threshold, self.sample = name, version, batcher, threshold, sample
        self.tally = Tally()
        self.tasks: set[asyncio.Task] = set()
        labels = {"model": name, "version": version}
        self.computed = SHADOW_IMAGES.labels(**labels, outcome="computed")
        self.skipped = SHADOW_IMAGES.labels(**labels, outcome="skipped")
        self.agreed = SHADOW_AGREEMENTS.labels(**labels)
        self.top1 = {copy: SHADOW_TOP1.labels(**labels, copy=copy) for copy in ("live", "shadow")}
        self.flagged = {copy: SHADOW_FLAGGED.labels(**labels, copy=copy) for copy in ("live", "shadow")}

    def offer(self, inputs: np.ndarray, live: Ranked, live_batcher: Batcher, live_threshold: float | None) -> None:
        """A live request's inputs and answers: computed by the shadow in a task of its own, if sampled and the live
        model has no queue. In the event loop."""
        if self.sample < 1 and random.random() >= self.sample:
            return
        if live_batcher.queued_images or live_batcher.passing:
            self._skip(len(inputs))
            return
        task = asyncio.get_running_loop().create_task(self._compare(inputs, live, live_threshold))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _compare(self, inputs: np.ndarray, live: Ranked, live_threshold: float | None) -> None:
        try:
            ranked, _ = await self.batcher.call(inputs)
        except Exception:  # Deferred, Overloaded, or a failing call: the shadow's loss, never the live answer's
            self._skip(len(inputs))
            return
        count = len(inputs)
        agreements = int((ranked.classes[:, 0, 0] == live.classes[:, 0, 0]).sum())
        live_top1, shadow_top1 = float(live.classes[:, 0, 1].sum()), float(ranked.classes[:, 0, 1].sum())
        live_flagged = _flagged(live, live_threshold)
        shadow_flagged = _flagged(ranked, self.threshold)
        tally = self.tally
        tally.images += count
        tally.agreements += agreements
        tally.live_top1 += live_top1
        tally.shadow_top1 += shadow_top1
        tally.live_flagged += live_flagged
        tally.shadow_flagged += shadow_flagged
        self.computed.inc(count)
        self.agreed.inc(agreements)
        self.top1["live"].inc(live_top1)
        self.top1["shadow"].inc(shadow_top1)
        self.flagged["live"].inc(live_flagged)
        self.flagged["shadow"].inc(shadow_flagged)

    def _skip(self, images: int) -> None:
        self.tally.skipped += images
        self.skipped.inc(images)

    def describe(self) -> dict:
        return {"version": self.version, "sample": self.sample, **self.tally.describe()}


def _flagged(ranked: Ranked, threshold: float | None) -> int:
    if ranked.ood_scores is None or threshold is None:
        return 0
    return int((ranked.ood_scores > threshold).sum())
