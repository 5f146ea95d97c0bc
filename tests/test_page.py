"""The page at / in a real headless Chromium against a real `bentoml serve` (skipped, with the reason, where no
Chromium is installed; .ci/run installs Debian's)."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from harness.samples import REAL_IMAGES, ROOT, TEST_ZIP

pytestmark = pytest.mark.server
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = ROOT / "docs" / "page.png"  # rewritten when CIFAR10_UPDATE_SCREENSHOT=1
SHOWN = ROOT / "docs" / "page.json"  # what the screenshot shows, written with it and checked against the service
CLASSES = ("cat", "ship", "truck")  # the first test image of each, which both shipped models get right


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if CHROMIUM is None:
        pytest.skip("no Chromium here: apt-get install chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # Headless, and nothing that reaches beyond this machine (its network is closed).
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server: str) -> Iterator:
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    problems: list[str] = []
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.goto(server)
    page.wait_for_selector("#model option", state="attached")
    yield page
    assert problems == []  # no console errors, whatever the test did
    page.close()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    if not REAL_IMAGES:
        pytest.skip(f"the page tests use real test images from {TEST_ZIP}, which is not here")
    folder = tmp_path_factory.mktemp("upload")
    paths = []
    with zipfile.ZipFile(TEST_ZIP) as archive:
        for label in CLASSES:
            paths.append(folder / f"{label}.jpg")
            paths[-1].write_bytes(archive.read(f"test/{label}/0000.jpg"))
    return paths


def top_labels(page) -> dict[str, str]:
    """Each result's file name and its top-1 label, once every result has arrived."""
    page.wait_for_function("document.querySelectorAll('.result[aria-busy=true]').length === 0")
    return {
        node.query_selector(".name").inner_text(): (node.query_selector(".bars .label") or node).inner_text()
        for node in page.query_selector_all(".result")
    }


def shown(page) -> dict:
    """What the page shows: the model line, and each result's verdict and labels with their percentages."""
    return {
        "model_info": page.inner_text("#model-info"),
        "results": {
            node.query_selector(".name").inner_text(): {
                "verdict": node.query_selector(".verdict").inner_text(),
                "labels": [
                    f"{bar.query_selector('.label').inner_text()} {bar.query_selector('.pct').inner_text()}"
                    for bar in node.query_selector_all(".bars li")
                ],
                "error": node.query_selector(".error").inner_text(),
            }
            for node in page.query_selector_all(".result")
        },
    }


def test_three_images_show_their_classes_noise_none_and_a_pdf_the_apis_error(page, images, tmp_path: Path) -> None:
    pdf = tmp_path / "notes.pdf"
    pdf.write_bytes(b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n")
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(noise)
    assert not page.is_visible("#key-form")  # no keys on this server: no key form
    page.set_input_files("#files", [*images, noise, pdf])
    labels = top_labels(page)
    assert {name: labels[name] for name in (f"{c}.jpg" for c in CLASSES)} == {f"{c}.jpg": c for c in CLASSES}
    error = page.locator(".result", has_text="notes.pdf").locator(".error").inner_text()
    assert error == "PDF is not a supported image type; send JPEG, PNG, WebP, GIF, BMP or TIFF"
    outside = page.locator(".result", has_text="noise.png")
    assert outside.locator(".verdict").inner_text() == "This does not look like any of the ten classes."
    assert not outside.locator(".bars").is_visible()  # the labels wait behind "Its labels anyway"
    outside.locator(".anyway summary").click()
    assert outside.locator(".bars li").count() == 5
    assert page.locator(".result", has_text="cat.jpg").locator(".verdict").inner_text() == ""
    served = httpx.get(f"{page.url.rstrip('/')}/models").json()["models"]["resnet18"]
    info = page.inner_text("#model-info")
    assert f"version {served['version']}" in info and served["precision"] in info
    assert f"test accuracy {served['test_accuracy'] * 100:.2f}%" in info
    shot = tmp_path / "page.png"
    page.screenshot(path=shot, full_page=True)
    now = {**shown(page), "version": served["version"]}
    now["model_info"] = now["model_info"].replace(served["version"], "VERSION")  # a store version is per home
    if os.environ.get("CIFAR10_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)
        SHOWN.write_text(json.dumps({k: v for k, v in now.items() if k != "version"}, indent=2) + "\n")
    assert same_figures(json.loads(SHOWN.read_text()), now), (
        "docs/page.png shows other figures than the page does now; rewrite both with "
        "CIFAR10_UPDATE_SCREENSHOT=1 .venv/bin/python -m pytest tests/test_page.py"
    )


def same_figures(recorded: dict, now: dict) -> bool:
    """The same model line, verdicts, errors and labels, with percentages within 0.2 points (a last digit may round
    either way on another CPU)."""

    def split(labels: list[str]) -> tuple[list[str], list[float]]:
        return [label.rsplit(" ", 1)[0] for label in labels], [float(label.rsplit(" ", 1)[1][:-1]) for label in labels]

    if recorded["model_info"] != now["model_info"] or recorded["results"].keys() != now["results"].keys():
        return False
    for name, was in recorded["results"].items():
        (was_labels, was_pcts), (labels, pcts) = split(was["labels"]), split(now["results"][name]["labels"])
        same = (was["verdict"], was["error"], was_labels) == (
            now["results"][name]["verdict"],
            now["results"][name]["error"],
            labels,
        )
        if not same or any(abs(a - b) > 0.2 for a, b in zip(was_pcts, pcts, strict=True)):
            return False
    return True


def test_switching_to_lenet_classifies_again_with_lenet(page, images) -> None:
    page.set_input_files("#files", images[0])
    top_labels(page)
    assert page.inner_text(".result .note").startswith("resnet18 ")
    page.select_option("#model", "lenet")
    top_labels(page)
    assert page.inner_text(".result .note").startswith("lenet ")  # the model that answered, and its latency
    assert "test accuracy 73.15%" in page.inner_text("#model-info")  # LeNet's card


def test_the_page_works_from_the_keyboard(page, images) -> None:
    # Playwright starts intercepting file choosers without waiting for the browser: start well before the Space
    page.on("filechooser", lambda _: None)
    page.keyboard.press("Tab")  # the docs link, then the model list, then the file chooser
    while page.evaluate("document.activeElement.id") != "model":
        page.keyboard.press("Tab")
    page.keyboard.press("ArrowDown")  # resnet18 -> lenet, without a mouse
    assert page.input_value("#model") == "lenet"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "files"
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Space")
    chooser.value.set_files(images[1])
    assert top_labels(page) == {"ship.jpg": "ship"}


def test_a_phone_width_screen_has_no_horizontal_scroll(browser, server: str, images) -> None:
    page = browser.new_page(viewport={"width": 360, "height": 740}, is_mobile=True)
    page.goto(server)
    page.wait_for_selector("#model option", state="attached")
    page.set_input_files("#files", images)
    top_labels(page)
    assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    page.close()


def test_with_api_keys_the_page_asks_for_one_and_keeps_it_in_the_tab(browser, keyed_server, images) -> None:
    url, _, _ = keyed_server
    page = browser.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.goto(url)
    page.wait_for_selector("#key-form", state="visible")  # GET /models answered 401
    page.fill("#key", "wrong-key")
    page.click("#key-form button")
    page.wait_for_function("document.getElementById('key-problem').textContent.includes('refused')")
    page.fill("#key", "key-one")
    page.click("#key-form button")
    page.wait_for_selector("#model option", state="attached")
    assert not page.is_visible("#key-form")
    page.set_input_files("#files", images[0])
    assert top_labels(page) == {"cat.jpg": "cat"}
    assert page.evaluate("sessionStorage.getItem('cifar10-api-key')") == "key-one"
    assert page.evaluate("localStorage.length") == 0 and "key-one" not in page.evaluate("document.cookie")
    assert problems == []
    page.close()


def test_the_page_shows_the_probabilities_the_api_answers(page, images) -> None:
    """One softmax, one temperature: the percentages on the page are /classify's (tests/test_calibration.py ties
    /classify to the model's temperature)."""
    page.set_input_files("#files", images[0])
    top_labels(page)
    shown = {
        bar.query_selector(".label").inner_text(): bar.query_selector(".pct").inner_text()
        for bar in page.query_selector_all(".result .bars li")
    }
    answer = httpx.post(
        f"{page.url.rstrip('/')}/classify", files={"image": ("cat.jpg", images[0].read_bytes())}, data={"top_k": "5"}
    ).json()["predictions"]
    assert shown == {p["label"]: f"{p['probability'] * 100:.1f}%" for p in answer}


def test_the_page_and_the_api_docs_load_nothing_from_elsewhere(browser, server: str) -> None:
    """Every resource the page at / and the Swagger UI at /docs load comes from the server itself."""
    for path in ("/", "/docs"):
        page = browser.new_page()
        requested: list[str] = []
        page.on("request", lambda request, requested=requested: requested.append(request.url))
        page.goto(server + path, wait_until="networkidle")
        if path == "/docs":
            page.wait_for_selector(".opblock-summary-path")  # Swagger UI has drawn the routes
            drawn = page.locator(".opblock-summary-path").all_inner_texts()
            assert "/classify" in drawn and "/v2/models/{name}/infer" in drawn
            assert page.title() == "CIFAR-10 classifier: the API"
        assert [url for url in requested if not url.startswith((server, "data:"))] == [], path
        page.close()


def test_the_api_description_is_this_services_and_covers_every_route(server: str) -> None:
    spec = httpx.get(f"{server}/docs.json").json()
    assert spec["info"]["title"] == "CIFAR-10 classifier" and spec["info"]["version"] not in ("", "None")
    assert "BentoML" not in spec["info"]["description"] and "in_distribution" in spec["info"]["description"]
    for path in (
        "/classify",
        "/classify_batch",
        "/models",
        "/livez",
        "/readyz",
        "/metrics",
        "/v2",
        "/v2/health/ready",
        "/v2/models/{name}",
        "/v2/models/{name}/infer",
        "/v2/models/{name}/versions/{version}/infer",
    ):
        assert path in spec["paths"], path
    infer = spec["paths"]["/v2/models/{name}/infer"]["post"]
    assert {"400", "404", "415", "429"} <= set(infer["responses"]) and "requestBody" in infer
    assert "ood_score" in json.dumps(spec["paths"]["/classify"])
