"""HTTP behaviour of a real `bentoml serve` process with the shipped models."""

from __future__ import annotations

import asyncio
import io
import json
import os
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from core.contract import CLASS_NAMES
from core.runtime import choose_providers
from harness.samples import REAL_IMAGES, ROOT, TEST_ZIP
from harness.server import serving

pytestmark = pytest.mark.server


def as_format(jpeg: bytes, fmt: str, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).convert(mode).save(buffer, fmt)
    return buffer.getvalue()


def classify(
    server: str, data: bytes, name: str = "x", content_type: str = "application/octet-stream", **fields
) -> httpx.Response:
    return httpx.post(
        f"{server}/classify",
        files={"image": (name, data, content_type)},
        data={k: str(v) for k, v in fields.items()},
        timeout=60,
    )


def check_schema(body: dict, model: str, top_k: int) -> None:
    assert body["model"] == model and body["model_version"]
    predictions = body["predictions"]
    assert len(predictions) == top_k
    probabilities = [p["probability"] for p in predictions]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < probabilities[0] <= 1
    for p in predictions:
        assert CLASS_NAMES[p["index"]] == p["label"]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_one_image_of_each_class_round_trips(server: str, samples, fmt: str) -> None:
    firsts = {label: data for label, data in reversed(samples)}
    correct = 0
    for label, jpeg in firsts.items():
        data = jpeg if fmt == "JPEG" else as_format(jpeg, fmt)
        response = classify(server, data, f"{label}.{fmt.lower()}", top_k=3)
        assert response.status_code == 200, response.text
        check_schema(response.json(), "resnet18", 3)
        correct += response.json()["predictions"][0]["label"] == label
    if REAL_IMAGES:
        assert correct >= 8  # a 91% model on ten real images


@pytest.mark.parametrize("model", ["resnet18", "lenet"])
def test_both_models_answer(server: str, samples, model: str) -> None:
    response = classify(server, samples[0][1], model=model, top_k=10)
    assert response.status_code == 200
    check_schema(response.json(), model, 10)
    assert sum(p["probability"] for p in response.json()["predictions"]) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_grayscale_palette_and_transparent_inputs(server: str, samples, mode: str) -> None:
    response = classify(server, as_format(samples[0][1], "PNG", mode))
    assert response.status_code == 200, response.text


def test_photo_sized_image(server: str) -> None:
    photo = np.random.default_rng(0).integers(0, 256, (800, 1000, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, "JPEG")
    assert classify(server, buffer.getvalue()).status_code == 200


def test_png_sent_as_jpeg_is_judged_by_its_bytes(server: str, samples) -> None:
    response = classify(server, as_format(samples[0][1], "PNG"), "x.jpg", "image/jpeg")
    assert response.status_code == 200


def test_batch_keeps_order_and_isolates_bad_items(server: str, samples) -> None:
    good = [data for _, data in samples[:4]]
    files = [
        ("images", ("a.jpg", good[0])),
        ("images", ("b.txt", b"plain text")),
        ("images", ("c.png", as_format(good[1], "PNG"))),
        ("images", ("d.jpg", good[2][:200])),
        ("images", ("e.jpg", good[3])),
    ]
    response = httpx.post(f"{server}/classify_batch", files=files, data={"model": "lenet", "top_k": "2"}, timeout=60)
    assert response.status_code == 200
    results = response.json()["results"]
    assert [("predictions" in r, r.get("status")) for r in results] == [
        (True, None),
        (False, 415),
        (True, None),
        (False, 400),
        (True, None),
    ]
    single = classify(server, good[0], model="lenet", top_k=2).json()["predictions"]
    assert [p["probability"] for p in results[0]["predictions"]] == pytest.approx([p["probability"] for p in single])


def test_batch_limit(server: str, samples) -> None:
    files = [("images", (f"{i}.jpg", samples[0][1])) for i in range(100)]
    response = httpx.post(f"{server}/classify_batch", files=files, timeout=60)
    assert response.status_code == 400 and "100 images in one request; the limit is 64" in response.json()["error"]


@pytest.mark.parametrize(
    ("files", "fields", "status", "words"),
    [
        ({"image": ("a.txt", b"just some text")}, {}, 415, "not a supported image type"),
        ({"image": ("a.jpg", b"")}, {}, 400, "empty"),
        ({"image": ("a.jpg", bytes(range(128, 256)))}, {}, 400, "not an image"),
        ({"image": ("a.svg", b'<svg xmlns="http://www.w3.org/2000/svg"/>')}, {}, 415, "SVG"),
        ({"image": ("a.pdf", b"%PDF-1.7\n")}, {}, 415, "PDF"),
        ({"image": ("a.jpg", "SAMPLE")}, {"model": "vgg"}, 400, "unknown model"),
        ({"image": ("a.jpg", "SAMPLE")}, {"top_k": "0"}, 400, "top_k"),
        ({"image": ("a.jpg", "SAMPLE")}, {"top_k": "11"}, 400, "top_k"),
        ({"image": ("a.jpg", "SAMPLE")}, {"top_k": "three"}, 400, "whole number"),
        ({}, {"model": "lenet"}, 400, "image: missing"),
        ({}, {"image": "http://127.0.0.1:9/cat.jpg"}, 400, "a text field"),  # never fetched as a URL
    ],
)
def test_bad_requests_get_a_4xx_json_error(server: str, samples, files, fields, status, words) -> None:
    files = {k: (name, samples[0][1] if data == "SAMPLE" else data) for k, (name, data) in files.items()}
    response = httpx.post(f"{server}/classify", files=files or None, data=fields, timeout=60)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]


def test_a_broken_multipart_form_is_a_400(server: str, samples) -> None:
    broken = httpx.post(f"{server}/classify", content=b"--x\r\n", headers={"content-type": "multipart/form-data"})
    assert broken.status_code == 400 and "no valid boundary" in broken.json()["error"]
    cut = httpx.post(
        f"{server}/classify",
        content=b"--x\r\nContent-Disposition: form-data; name=image\r\n\r\nab",
        headers={"content-type": "multipart/form-data; boundary=x"},
    )
    assert cut.status_code == 400 and "ends before its closing boundary" in cut.json()["error"]
    empty = httpx.post(f"{server}/classify_batch", data={"model": "lenet"})
    assert empty.status_code == 400 and "images: missing" in empty.json()["error"]
    raw = httpx.post(f"{server}/classify_batch", content=samples[0][1], headers={"content-type": "image/jpeg"})
    assert raw.status_code == 400 and "multipart form with repeated file fields named images" in raw.json()["error"]


@pytest.mark.parametrize(
    "content_type", ["image/jpeg", "application/octet-stream", "application/x-www-form-urlencoded"]
)
def test_the_image_as_the_whole_body_is_answered_like_the_form(server: str, samples, content_type: str) -> None:
    """`curl --data-binary @cat.jpg` (which says x-www-form-urlencoded), or with its own Content-Type; options in
    the query string. The same answer as the multipart form's; PUT too (`curl -T cat.jpg`)."""
    form = classify(server, samples[0][1], model="lenet", top_k=5).json()
    raw = httpx.post(
        f"{server}/classify?model=lenet&top_k=5", content=samples[0][1], headers={"content-type": content_type}
    )
    assert raw.status_code == 200, raw.text
    for answer in (raw, httpx.put(f"{server}/classify?model=lenet&top_k=5", content=samples[0][1])):
        assert answer.status_code == 200 and answer.json()["model"] == "lenet"
        assert [p["label"] for p in answer.json()["predictions"]] == [p["label"] for p in form["predictions"]]
        got, expected = ([p["probability"] for p in a["predictions"]] for a in (answer.json(), form))
        assert got == pytest.approx(expected)


@pytest.mark.parametrize(
    ("body", "query", "status", "words"),
    [
        (b"%PDF-1.7\n", "", 415, "PDF is not a supported image type"),
        (b"", "", 400, "empty file"),
        (b"\xff" * (11 * 1024 * 1024), "", 413, "10 MB"),
        (b"SAMPLE", "?top_k=zero", 400, "top_k must be a whole number"),
        (b"SAMPLE", "?model=vgg", 400, "unknown model 'vgg'"),
    ],
)
def test_a_bad_raw_body_gets_the_same_errors(server: str, samples, body, query, status, words) -> None:
    body = samples[0][1] if body == b"SAMPLE" else body
    answer = httpx.post(f"{server}/classify{query}", content=body, headers={"content-type": "image/jpeg"}, timeout=60)
    assert answer.status_code == status and words in answer.json()["error"], answer.text


@pytest.mark.parametrize("content_type", ["application/octet-stream", "application/x-www-form-urlencoded"])
def test_a_raw_svg_gets_the_same_answer_whatever_content_type_curl_sends(server: str, content_type: str) -> None:
    """`curl --data-binary @fake.svg` says x-www-form-urlencoded; SVG text with = in it is not a form."""
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="32" height="32"><rect width="32" height="32"/></svg>'
    answer = httpx.post(f"{server}/classify", content=svg, headers={"content-type": content_type})
    assert answer.status_code == 415 and answer.json()["error"].startswith("SVG is not a supported image type")


def test_json_on_classify_says_where_json_goes(server: str) -> None:
    answer = httpx.post(f"{server}/classify", json={"image": "abc"})
    assert answer.status_code == 415
    assert answer.json()["error"] == (
        "/classify does not take JSON; send the image as a multipart file field (curl -F image=@cat.jpg), as the "
        "raw body (curl --data-binary @cat.jpg), or as base64 in JSON to /v2/models/NAME/infer"
    )


def test_an_option_in_both_the_query_string_and_the_form_is_refused(server: str, samples) -> None:
    answer = httpx.post(
        f"{server}/classify?top_k=3", files={"image": ("x.jpg", samples[0][1])}, data={"top_k": "5"}, timeout=60
    )
    assert answer.status_code == 400
    assert answer.json()["error"] == "top_k is given twice, in the query string and in the form; send it once"


def test_truncated_image_is_a_400(server: str) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG")
    response = classify(server, buffer.getvalue()[:1500])
    assert response.status_code == 400 and "truncated" in response.json()["error"]


def test_body_and_pixel_limits_are_413(server: str) -> None:
    response = classify(server, b"\xff" * (11 * 1024 * 1024))
    assert response.status_code == 413 and "10 MB" in response.json()["error"]
    buffer = io.BytesIO()
    Image.new("L", (8000, 6000)).save(buffer, "PNG")
    response = classify(server, buffer.getvalue())
    assert response.status_code == 413 and "pixels" in response.json()["error"]


def test_a_bad_image_among_concurrent_good_ones_fails_alone(server: str, samples) -> None:
    """32 concurrent requests share batches; the 5 bad ones must not take a good neighbour down."""

    async def main() -> list[int]:
        async with httpx.AsyncClient(base_url=server, timeout=60) as client:

            async def one(i: int) -> int:
                data = b"not an image at all \xff\xfe" if i % 7 == 3 else samples[i % len(samples)][1]
                response = await client.post("/classify", files={"image": ("x", data)}, data={"model": "lenet"})
                return response.status_code

            return await asyncio.gather(*(one(i) for i in range(32)))

    statuses = asyncio.run(main())
    assert sorted(set(statuses)) == [200, 400]
    assert statuses.count(400) == sum(1 for i in range(32) if i % 7 == 3)


README_TOLERANCE = 0.02  # the README's probabilities hold within this on every CPU kind and precision


def test_the_readmes_classify_example_is_what_the_service_answers(server: str) -> None:
    """The top class, and each listed probability within README_TOLERANCE (looked up by label: the lesser classes'
    order can differ between hosts where their probabilities are close)."""
    if not REAL_IMAGES:
        pytest.skip(f"the README's example is test/cat/0000.jpg of {TEST_ZIP}, which is not here")
    readme = (ROOT / "README.md").read_text().split("## HTTP API", 1)[1]
    example = json.loads(readme.split("```json", 1)[1].split("```", 1)[0])
    with zipfile.ZipFile(TEST_ZIP) as archive:
        answer = classify(server, archive.read("test/cat/0000.jpg"), "cat.jpg", top_k=10).json()
    assert answer["model"] == example["model"]
    assert answer["predictions"][0]["label"] == example["predictions"][0]["label"]
    answered = {p["label"]: p["probability"] for p in answer["predictions"]}
    for p in example["predictions"]:
        assert answered[p["label"]] == pytest.approx(p["probability"], abs=README_TOLERANCE), p


def test_models_endpoint_describes_the_served_models(server: str) -> None:
    body = httpx.get(f"{server}/models").json()
    assert set(body["models"]) == {"resnet18", "lenet"}
    resnet = body["models"]["resnet18"]
    assert resnet["class_names"] == list(CLASS_NAMES) and resnet["mean"] == [0.485, 0.456, 0.406]
    assert resnet["provider"] == choose_providers("auto")[0] and resnet["test_accuracy"] > 0.9  # CUDA on a GPU host
    assert body["batching"]["max_batch_size"] >= 1


def test_builtin_endpoints_still_work(server: str, samples) -> None:
    classify(server, samples[0][1], model="lenet")
    assert httpx.get(f"{server}/livez").status_code == 200
    assert httpx.get(f"{server}/readyz").status_code == 200
    assert "swagger" in httpx.get(f"{server}/docs").text.lower()  # moved from / for the page
    assert "<title>CIFAR-10 classifier</title>" in httpx.get(f"{server}/").text
    assert "/classify" in httpx.get(f"{server}/docs.json").json()["paths"]
    metrics = httpx.get(f"{server}/metrics").text
    for name in (
        "cifar10_inference_images_total",
        "cifar10_inference_batch_size_bucket",
        "cifar10_inference_seconds_bucket",
        'model="lenet"',
        "cifar10_http_request_seconds_bucket",
        'cifar10_http_requests_total{endpoint="/classify",status="200"}',
    ):
        assert name in metrics


@contextmanager
def own_server(home: Path, **env: str) -> Iterator[str]:
    """A second server with extra environment and its own BENTOML_HOME (a server start resets the
    Prometheus files of any other server sharing one); yields its URL."""
    with serving({**os.environ, "BENTOML_HOME": str(home), **env}) as (_, url, _):
        yield url


def test_overload_is_answered_with_retry_after_and_the_server_recovers(samples, tmp_path) -> None:
    """A second server (one worker, tight limits) sheds load with 429/503 + Retry-After, never a 500, and recovers."""
    with own_server(
        tmp_path / "home", CIFAR10_WORKERS="1", CIFAR10_MAX_CONCURRENCY="8", CIFAR10_MAX_LATENCY_MS="20"
    ) as url:

        async def main() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                return await asyncio.gather(
                    *(
                        client.post("/classify", files={"image": ("x.jpg", samples[i % len(samples)][1])})
                        for i in range(48)
                    )
                )

        responses = asyncio.run(main())
        statuses = {r.status_code for r in responses}
        assert statuses <= {200, 429, 503} and statuses & {429, 503}, statuses
        for response in responses:
            if response.status_code != 200:
                assert response.headers["retry-after"] == "1" and response.json()["error"]
        assert classify(url, samples[0][1]).status_code == 200


def batch_histogram(server: str, model: str) -> tuple[float, float]:
    """(model calls so far, calls that held a single image) from the Prometheus histogram."""
    calls = single = 0.0
    for line in httpx.get(f"{server}/metrics").text.splitlines():
        if f'model="{model}"' not in line:
            continue
        if line.startswith("cifar10_inference_batch_size_count"):
            calls += float(line.split()[-1])
        elif line.startswith("cifar10_inference_batch_size_bucket") and 'le="1.0"' in line:
            single += float(line.split()[-1])
    return calls, single


def test_concurrent_requests_are_batched_and_match_unbatched_results(server: str, samples) -> None:
    images = [data for _, data in samples[:8]]
    alone = [classify(server, data, model="resnet18", top_k=10).json()["predictions"] for data in images]
    calls_before, single_before = batch_histogram(server, "resnet18")

    async def main() -> list[dict]:
        async with httpx.AsyncClient(base_url=server, timeout=60) as client:
            responses = await asyncio.gather(
                *(
                    client.post("/classify", files={"image": ("x.jpg", images[i % 8])}, data={"top_k": "10"})
                    for i in range(32)
                )
            )
        return [r.json()["predictions"] for r in responses]

    together = asyncio.run(main())
    calls, single = batch_histogram(server, "resnet18")
    assert (calls - calls_before) - (single - single_before) >= 1  # at least one call held several images
    for i, predictions in enumerate(together):
        expected = {p["label"]: p["probability"] for p in alone[i % 8]}
        for p in predictions:
            assert abs(p["probability"] - expected[p["label"]]) < 1e-5


def test_bentoml_cors_settings_reach_the_classification_routes(samples, tmp_path) -> None:
    """The classification routes bypass BentoML's middleware, so they apply its CORS settings themselves."""
    origin = "https://example.com"
    options = f'services.http.cors.enabled=true services.http.cors.access_control_allow_origins=["{origin}"]'
    with own_server(tmp_path / "home", BENTOML_CONFIG_OPTIONS=options) as url:
        response = httpx.post(
            f"{url}/classify",
            files={"image": ("x.jpg", samples[0][1])},
            data={"model": "lenet"},
            headers={"origin": origin},
        )
        assert response.status_code == 200 and response.headers["access-control-allow-origin"] == origin


def test_every_error_the_service_writes_is_json(server: str) -> None:
    wrong_method = httpx.get(f"{server}/classify")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert wrong_method.json()["error"] == "GET /classify is not allowed; use POST"
    unknown = httpx.get(f"{server}/nothing-here")
    assert unknown.status_code == 404 and unknown.json()["error"] == "no route for GET /nothing-here; /docs lists them"
    assert unknown.json()["request_id"] == unknown.headers["x-request-id"]
