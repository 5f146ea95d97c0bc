"""The inference core in-process, with settings of the test's choosing: list in, list out, typed errors."""

from __future__ import annotations

import asyncio
import io
import threading

import numpy as np
import pytest
from PIL import Image

from core.errors import ImageError, UnsupportedImage
from harness.inference import in_process
from harness.samples import REAL_IMAGES
from service.errors import BadRequest
from service.inference import core as core_module
from service.inference.core import Asked, Classified, Inference, Prediction
from service.settings import Settings


@pytest.fixture(scope="module")
def inference() -> Inference:
    return in_process(Settings(max_batch_images=4))


def classify(inference: Inference, images: list[bytes], model: str, top_k: int) -> list:
    return asyncio.run(inference.classify(Asked(model, top_k, images=images))).items


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 140, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def test_one_result_per_image_in_order_and_a_bad_image_fails_alone(inference: Inference, samples) -> None:
    (label, first), (_, second) = samples[0], samples[-1]
    results = classify(inference, [first, b"%PDF-1.7", second, b""], "resnet18", 3)
    assert [type(r) for r in results] == [Classified, UnsupportedImage, Classified, ImageError]
    assert all(isinstance(x, Prediction) for x in results[0].predictions) and len(results[0].predictions) == 3
    assert results[0].ood_score is not None and isinstance(results[0].in_distribution, bool)
    if REAL_IMAGES:
        assert results[0].predictions[0].label == label


def test_bad_options_and_the_settings_limit_raise_bad_request(inference: Inference, samples) -> None:
    one = [samples[0][1]]
    with pytest.raises(BadRequest, match="unknown model 'vgg'"):
        classify(inference, one, "vgg", 3)
    with pytest.raises(BadRequest, match="top_k must be between 1 and 10, got 11"):
        classify(inference, one, "lenet", 11)
    with pytest.raises(BadRequest, match="5 images in one request; the limit is 4"):  # Settings(max_batch_images=4)
        classify(inference, one * 5, "lenet", 3)


def test_large_images_are_decoded_off_the_event_loop(inference: Inference, monkeypatch) -> None:
    """Judged by the header's pixel count, not the upload's size: this 6000x6000 PNG is a few KB."""
    threads = []

    def recording(image: Image.Image) -> np.ndarray:
        threads.append(threading.current_thread() is threading.main_thread())
        return to_pixels(image)

    to_pixels = core_module.to_pixels
    monkeypatch.setattr(core_module, "to_pixels", recording)
    huge, small = png(6000, 6000), png(64, 64)
    assert len(huge) < 200_000
    results = classify(inference, [huge, small], "lenet", 1)
    assert all(isinstance(r, Classified) for r in results)
    assert threads == [False, True]  # the huge one in a worker thread, the small one inline
