"""Live model changes (#44) on a real `bentoml serve` with two workers: Triton's repository routes through
tritonclient and plain HTTP, a shadow's figures, promote, rollback and unload under 32 concurrent clients with every
answer checked against what the version it names gives alone, and bad candidates that change nothing."""

from __future__ import annotations

import asyncio
import fcntl
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from core.store import shipped_file
from harness.inference import in_process
from harness.samples import cifar_samples
from harness.server import serving
from service.http.repository import TURN_ON
from service.inference.core import Asked, Classified
from service.inference.model import ModelFile, ModelSource
from service.settings import Settings
from tests.conftest import ROOT, another_lenet, wrong_int8

pytestmark = pytest.mark.server
CLIENTS = 32


@dataclass
class Live:
    """A server with model control on and two workers, its home (store and log), and the lenet version it served
    at start."""

    url: str
    home: Path
    log: Path
    first: str

    def post(self, path: str, parameters: dict | None = None) -> httpx.Response:
        body = {"parameters": parameters} if parameters is not None else None
        return httpx.post(self.url + path, json=body, timeout=120)

    def load(self, name: str, **parameters) -> httpx.Response:
        return self.post(f"/v2/repository/models/{name}/load", parameters)

    def serving(self, name: str) -> list[dict]:
        """What each worker serves for `name`."""
        workers = httpx.get(self.url + "/models").json()["serving_by_worker"]
        assert len(workers) == 2
        return [served[name] for served in workers.values()]

    def store(self, script: str) -> str:
        """Run `script` against this server's model store; what it prints."""
        env = {**os.environ, "BENTOML_HOME": str(self.home)}
        out = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, check=True, capture_output=True)
        return out.stdout.decode().strip()

    def register(self, path: Path, name: str = "") -> str:
        """Register `path` (as `name`, where given); its store version."""
        tag = self.store(f"from core.store import register; print(register({str(path)!r}, {name or None!r}))")
        return tag.partition(":")[2]

    def stored(self, name: str, version: str) -> Path:
        script = f"import bentoml; print(bentoml.models.get('{name}:{version}').path_of('model.onnx'))"
        return Path(self.store(script))


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    home = tmp_path_factory.mktemp("live")
    env = {
        **os.environ,
        "BENTOML_HOME": str(home),
        "CIFAR10_WORKERS": "2",
        "CIFAR10_MODEL_CONTROL": "on",
        "CIFAR10_MODELS": "lenet,resnet18",
    }
    with serving(env) as (_, url, log):
        first = httpx.get(url + "/models").json()["models"]["lenet"]["version"]
        yield Live(url, home, log, first)


def alone(live: Live, version: str, images: list[bytes]) -> list[Classified]:
    """What lenet `version` from the server's store answers for `images`, loaded alone in this process."""
    tag = f"cifar10-lenet:{version}"
    source = ModelSource("lenet", version, ModelFile(tag, live.stored("cifar10-lenet", version)))
    inference = in_process(Settings(providers="cpu", max_batch_images=len(images)), sources=[source])
    return asyncio.run(inference.classify(Asked("lenet", 10, images=images))).items


def same_answer(answer: dict, expected: Classified) -> bool:
    """The server's answer and the version's own agree: every probability within 1e-5, and the label where the
    top two are further apart than that (a nearer tie may fall either way in another batch)."""
    got = {p["label"]: p["probability"] for p in answer["predictions"]}
    want = {p.label: p.probability for p in expected.predictions}
    close = got.keys() == want.keys() and all(abs(got[label] - want[label]) <= 1e-5 for label in want)
    top, second = expected.predictions[:2]
    clear = top.probability - second.probability > 1e-5
    return close and (not clear or answer["predictions"][0]["label"] == top.label)


def test_the_index_lists_the_store_with_each_version_state(live: Live) -> None:
    rows = live.post("/v2/repository/index").json()
    assert {"name": "lenet", "version": live.first, "state": "READY", "reason": "answers"} in rows
    names = {row["name"] for row in rows}
    assert names == {"lenet", "resnet18", "whitenet"}  # every shipped one; an int8 copy answers for its fp32 version
    whitenet = next(row for row in rows if row["name"] == "whitenet")  # in the store, not served here
    assert (whitenet["state"], whitenet["reason"]) == ("UNAVAILABLE", "not loaded")
    ready = httpx.post(live.url + "/v2/repository/index", json={"ready": True}).json()
    assert ready and all(row["state"] == "READY" for row in ready)

    client = triton.InferenceServerClient(live.url.removeprefix("http://"))
    assert client.get_model_repository_index() == rows
    client.unload_model("resnet18")
    assert not client.is_model_ready("resnet18") and client.is_model_ready("lenet")
    workers = httpx.get(live.url + "/models").json()["serving_by_worker"].values()
    assert workers and all("resnet18" not in served for served in workers)
    client.load_model("resnet18")  # the store's newest, the only one
    assert client.is_model_ready("resnet18")


def test_bad_calls_are_refused_with_what_exists(live: Live) -> None:
    unknown_model = live.load("vgg")
    assert unknown_model.status_code == 404 and "it has: lenet, resnet18, whitenet" in unknown_model.json()["error"]
    unknown_version = live.load("lenet", version="zzz")
    assert unknown_version.status_code == 404 and live.first in unknown_version.json()["error"]
    for body in (b"{", b"[]", b'{"parameters": {"version": 3}}', b'{"parameters": {"shadow": true, "sample": 2}}'):
        answer = httpx.post(live.url + "/v2/repository/models/lenet/load", content=body)
        assert answer.status_code == 400, body
    answering = live.post("/v2/repository/models/lenet/unload", {"version": live.first})
    assert answering.status_code == 409 and "load another version first" in answering.json()["error"]

    # A change of lenet under way (its lock held, as the worker running it holds it): a second one is refused.
    [folder] = (live.home / "cifar10-repository").iterdir()
    with open(folder / "lenet.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        busy = live.load("lenet", version=live.first)
    assert busy.status_code == 409 and "under way" in busy.json()["error"]


def test_the_control_routes_are_off_by_default_and_say_how_to_turn_them_on(server: str) -> None:
    answer = httpx.post(server + "/v2/repository/index")
    assert answer.status_code == 404 and answer.json()["error"] == TURN_ON


@pytest.mark.timeout(420)
def test_shadow_promote_rollback_and_unload_under_load_fail_no_request_and_mix_no_versions(
    live: Live, tmp_path: Path
) -> None:
    second = live.register(another_lenet(tmp_path / "lenet-second.onnx"))
    corrupt = live.register(another_lenet(tmp_path / "lenet-corrupt.onnx", seed=2))
    stored = live.stored("cifar10-lenet", corrupt)
    stored.write_bytes(stored.read_bytes()[:-100])  # changed after registration: its sha256 no longer matches
    images = [data for _, data in cifar_samples(per_class=10)]
    expected = {version: alone(live, version, images) for version in (live.first, second)}
    pairs = zip(*expected.values(), strict=True)
    agree = sum(a.predictions[0].label == b.predictions[0].label for a, b in pairs) / len(images)

    answers: list[tuple[int, dict]] = []
    failures: list[str] = []
    stop = threading.Event()
    deadline = time.monotonic() + 120  # the clients end by themselves whatever the server does

    def client(index: int) -> None:
        with httpx.Client(base_url=live.url, timeout=30) as http:
            for n in range(5000):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                k = (index * 7 + n) % len(images)
                try:
                    answer = http.post("/classify", files={"image": images[k]}, data={"model": "lenet", "top_k": "10"})
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                if answer.status_code == 200:
                    answers.append((k, answer.json()))
                else:
                    failures.append(f"{answer.status_code} {answer.text[:200]}")

    with ThreadPoolExecutor(CLIENTS) as pool:
        clients = [pool.submit(client, i) for i in range(CLIENTS)]
        try:
            time.sleep(1)
            shadow = live.load("lenet", version=second, shadow=True, sample=0.5)
            assert shadow.status_code == 200, shadow.text
            shadowed = wait_for_shadowed(live, at_least=200)
            images_shadowed = sum(s["images"] for s in shadowed)
            agreement = sum(s["top1_agreement"] * s["images"] for s in shadowed) / images_shadowed
            assert abs(agreement - agree) < 0.1, (agreement, agree)
            metrics = httpx.get(live.url + "/metrics").text
            assert f'cifar10_shadow_images_total{{model="lenet",outcome="computed",version="{second}"}}' in metrics

            bad = live.load("lenet", version=corrupt)
            assert bad.status_code == 422 and "sha256 differs" in bad.json()["error"], bad.text
            assert all(s["version"] == live.first and s["shadow"]["version"] == second for s in live.serving("lenet"))

            promoted = live.load("lenet", version=second)
            assert promoted.status_code == 200, promoted.text
            assert [s["version"] for s in live.serving("lenet")] == [second, second]
            time.sleep(2)
            rolled_back = live.load("lenet", version=live.first)
            assert rolled_back.status_code == 200, rolled_back.text
            time.sleep(2)
            unloaded = live.post("/v2/repository/models/lenet/unload", {"version": second})
            assert unloaded.status_code == 200, unloaded.text
            assert all(s["version"] == live.first and s["warm_versions"] == [] for s in live.serving("lenet"))
            time.sleep(2)
        finally:
            stop.set()
            for done in clients:
                done.result()

    assert failures == []
    by_version = {version: [(k, a) for k, a in answers if a["model_version"] == version] for version in expected}
    assert len(by_version[second]) > 100 and len(by_version[live.first]) > 100
    assert sum(map(len, by_version.values())) == len(answers)
    wrong = [(v, k) for v, pairs in by_version.items() for k, a in pairs if not same_answer(a, expected[v][k])]
    assert wrong == []


def wait_for_shadowed(live: Live, at_least: int) -> list[dict]:
    """Both workers' shadow figures, once they hold `at_least` images between them (within 30 s)."""
    deadline = time.monotonic() + 30
    while True:
        shadows = [s["shadow"] for s in live.serving("lenet")]
        if sum(s["images"] for s in shadows) >= at_least or time.monotonic() > deadline:
            return shadows
        time.sleep(0.5)


def test_bad_candidates_are_refused_with_the_reason_and_change_nothing(live: Live, tmp_path: Path) -> None:
    lenet = shipped_file("lenet")
    # A LeNet stored under cifar10-resnet18, with its own sha256 and metadata (as a hand-made store entry would be).
    as_resnet = live.store(
        "import shutil, bentoml\n"
        f"m = bentoml.models.get('cifar10-lenet:{live.first}')\n"
        "with bentoml.models.create('cifar10-resnet18', metadata=m.info.metadata) as new:\n"
        f"    shutil.copyfile({str(lenet)!r}, new.path_of('model.onnx'))\n"
        "print(new.tag.version)"
    )
    # A LeNet whose recorded contract is not this service's (another input size).
    mismatch = live.store(
        "import shutil, bentoml\n"
        f"m = bentoml.models.get('cifar10-lenet:{live.first}')\n"
        "with bentoml.models.create('cifar10-lenet', metadata={**m.info.metadata, 'input_size': 64}) as new:\n"
        f"    shutil.copyfile({str(lenet)!r}, new.path_of('model.onnx'))\n"
        "print(new.tag.version)"
    )
    # The shipped ResNet-18 again, with a newer int8 copy made from it whose scales are wrong: its self-check fails.
    resnet = live.register(shipped_file("resnet18"))
    live.register(wrong_int8(shipped_file("resnet18-int8"), tmp_path / "wrong-int8.onnx"), "cifar10-resnet18-int8")
    before = live.serving("resnet18")

    cases = [
        ("resnet18", as_resnet, "does not say"),
        ("lenet", mismatch, "does not fit this service"),
        ("resnet18", resnet, "failed its self-check"),
    ]
    for name, version, reason in cases:
        answer = live.load(name, version=version)
        assert answer.status_code == 422 and reason in answer.json()["error"], answer.text
        assert "nothing changed" in answer.json()["error"]
    assert live.serving("resnet18") == before
    assert all(s["version"] == live.first for s in live.serving("lenet"))

    client = triton.InferenceServerClient(live.url.removeprefix("http://"))
    with pytest.raises(InferenceServerException, match="does not fit this service"):
        client.load_model("lenet")  # the store's newest: `mismatch`
