"""Optional API keys on a real server: every route but the probes wants one, rotation needs no restart, the CLI,
tritonclient and the page use one, and no key is ever written to the log."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
import tritonclient.http as triton

from harness.samples import ROOT
from harness.server import serve_expecting_exit, serving
from service.errors import Forbidden, Unauthorized
from service.http import keys as keys_module
from service.http.keys import ApiKeys
from tests.conftest import run_cli

pytestmark = pytest.mark.server
PROTECTED = ["/classify", "/classify_batch", "/models", "/metrics", "/v2", "/v2/models/lenet", "/v2/models/lenet/infer"]
OPEN = ["/livez", "/readyz", "/v2/health/live", "/v2/health/ready", "/", "/page/app.js", "/docs", "/docs.json"]


def request(url: str, path: str, key: str | None = None, image: bytes = b"") -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    if path in ("/classify", "/classify_batch"):
        field = "image" if path == "/classify" else "images"
        return httpx.post(url + path, files={field: ("x.jpg", image)}, data={"model": "lenet"}, headers=headers)
    if path.endswith("/infer"):
        return httpx.post(url + path, json={"inputs": []}, headers=headers)
    return httpx.get(url + path, headers=headers)


def test_without_a_key_every_route_but_the_probes_is_a_401(keyed_server, samples) -> None:
    url, _, _ = keyed_server
    for path in PROTECTED:
        for key in (None, "wrong-key"):
            answer = request(url, path, key, samples[0][1])
            assert answer.status_code == 401, (path, key, answer.text)
            assert answer.headers["www-authenticate"].startswith("Bearer") and "API key" in answer.json()["error"]
    for path in OPEN:
        assert request(url, path).status_code == 200, path


def test_with_a_key_every_route_answers(keyed_server, samples) -> None:
    url, _, _ = keyed_server
    statuses = {path: request(url, path, "key-two", samples[0][1]).status_code for path in PROTECTED}
    assert statuses == {**dict.fromkeys(PROTECTED, 200), "/v2/models/lenet/infer": 400}  # no inputs: a 400
    assert request(url, "/metrics", "scrape-key").status_code == 200  # the scraper's key opens /metrics only
    assert request(url, "/classify", "scrape-key", samples[0][1]).status_code == 403


def test_the_cli_and_tritonclient_send_the_key(keyed_server, samples, tmp_path: Path) -> None:
    url, _, _ = keyed_server
    (tmp_path / "cat.jpg").write_bytes(samples[0][1])
    without = run_cli("predict", str(tmp_path / "cat.jpg"), "--server", url, "--model", "lenet")
    assert without.returncode == 2 and "wants an API key: set CIFAR10_API_KEY" in without.stderr
    keyed_run = run_cli(
        "predict", str(tmp_path / "cat.jpg"), "--server", url, "--model", "lenet", env={"CIFAR10_API_KEY": "key-one"}
    )
    assert keyed_run.returncode == 0 and "cat.jpg" in keyed_run.stdout, keyed_run.stderr
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    assert client.get_model_metadata("lenet", headers={"Authorization": "Bearer key-one"})["name"] == "lenet"


def test_a_changed_keys_file_takes_effect_at_once_and_no_key_reaches_the_log(keyed_server, samples) -> None:
    url, keys, log = keyed_server
    original = keys.read_text()
    assert request(url, "/models", "key-one").status_code == 200
    keys.write_text("key-three\n")  # rotated: the next request sees it
    assert request(url, "/models", "key-one").status_code == 401
    assert request(url, "/models", "key-three").status_code == 200
    keys.write_text("# nobody\n")  # emptied by mistake: no key is accepted until it holds keys again
    assert request(url, "/models", "key-three").status_code == 401
    keys.unlink()  # deleted: likewise
    assert request(url, "/models", "key-three").status_code == 401
    assert request(url, "/readyz").status_code == 200  # the probes stay open
    keys.write_text(original)  # back as it was, for the other tests that share this server
    assert request(url, "/models", "key-one").status_code == 200
    text = log.read_text()
    assert "holds no key: every key is refused until it holds keys" in text and "cannot be read" in text
    assert not any(key in text for key in ("key-one", "key-two", "key-three", "scrape-key", "wrong-key"))


def test_every_worker_holds_the_keys_the_file_holds(tmp_path: Path) -> None:
    """Rotated, then deleted: no worker keeps an old key; restored: every worker takes the new one."""
    keys = tmp_path / "keys"
    keys.write_text("key-one\n")
    env = {**os.environ, "BENTOML_HOME": str(tmp_path), "CIFAR10_API_KEYS_FILE": str(keys), "CIFAR10_WORKERS": "2"}
    with serving(env) as (_, url, _):

        def statuses(key: str) -> set[int]:  # a new connection each: both workers answer some
            return {request(url, "/models", key).status_code for _ in range(20)}

        assert statuses("key-one") == {200}
        keys.write_text("key-two\n")
        assert statuses("key-one") == {401} and statuses("key-two") == {200}
        keys.unlink()
        assert statuses("key-one") == statuses("key-two") == {401}
        keys.write_text("key-two\n")
        assert statuses("key-two") == {200}


def test_keys_are_compared_in_constant_time_every_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The library call (hmac.compare_digest) on every key, so which key matched does not show in the timing."""
    (tmp_path / "keys").write_text("alpha\nbeta\ngamma\n")
    compared = []
    real = keys_module.hmac.compare_digest
    monkeypatch.setattr(keys_module.hmac, "compare_digest", lambda a, b: compared.append(b) or real(a, b))
    api_keys = ApiKeys(tmp_path / "keys")
    assert api_keys.refusal("/classify", b"Bearer alpha") is None
    assert isinstance(api_keys.refusal("/classify", b"Bearer delta"), Unauthorized)
    assert compared == [b"alpha", b"beta", b"gamma"] * 3  # alpha: every known key, then the route's; delta: known
    assert api_keys.refusal("/readyz", b"") is None
    assert isinstance(api_keys.refusal("/classify", b"Basic alpha"), Unauthorized)


def test_admin_keys_alone_open_the_model_control_routes(tmp_path: Path) -> None:
    (tmp_path / "keys").write_text("plain\nboss admin\nscraper metrics\n")
    api_keys = ApiKeys(tmp_path / "keys")
    load = "/v2/repository/models/lenet/load"
    assert api_keys.refusal(load, b"Bearer boss") is None and api_keys.refusal("/classify", b"Bearer boss") is None
    assert isinstance(api_keys.refusal(load, b"Bearer plain"), Forbidden)
    assert isinstance(api_keys.refusal(load, b"Bearer scraper"), Forbidden)
    assert isinstance(api_keys.refusal(load, b""), Unauthorized)
    assert isinstance(api_keys.refusal("/classify", b"Bearer scraper"), Forbidden)


@pytest.mark.parametrize(
    ("content", "words"), [("# only a comment\n", "holds no key"), ("one two three\n", "a line holds a key")]
)
def test_an_unusable_keys_file_stops_the_server_in_one_line(tmp_path: Path, content: str, words: str) -> None:
    (tmp_path / "keys").write_text(content)
    env = {**os.environ, "BENTOML_HOME": str(tmp_path), "CIFAR10_API_KEYS_FILE": str(tmp_path / "keys")}
    result = serve_expecting_exit(["service.service:Classifier"], env, ROOT)
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and words in lines[0], lines
