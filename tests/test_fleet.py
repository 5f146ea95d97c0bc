"""A fleet (#44): two real `bentoml serve` replicas behind a real HAProxy with the shipped configuration
(deploy/haproxy/haproxy.cfg), restarted one after the other onto a new version under load, fail no request."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from harness.samples import cifar_samples
from harness.server import ROOT, free_port, register_shipped, start_server, stop_server
from tests.conftest import another_lenet, run_cli

pytestmark = pytest.mark.server
CLIENTS = 8


def wait_for(url: str, within_s: float = 30) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer 200 within {within_s} s")


@pytest.mark.timeout(400)
def test_a_rolling_restart_behind_haproxy_onto_a_new_version_fails_no_request(tmp_path: Path) -> None:
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed; .ci/setup installs it (apt install haproxy)")
    env = {**os.environ, "BENTOML_HOME": str(tmp_path), "CIFAR10_WORKERS": "1"}
    register_shipped(env)
    registered = run_cli("register", str(another_lenet(tmp_path / "lenet-new.onnx")), env=env)
    assert registered.returncode == 0, registered.stderr
    new, old = list_lenet_versions(env)
    ports = [free_port(), free_port()]
    front = free_port()
    replicas = {port: start_server(["service.service:Classifier"], served(env, old), ROOT, port) for port in ports}
    addresses = {
        "LISTEN": f"127.0.0.1:{front}",
        "REPLICA_1": f"127.0.0.1:{ports[0]}",
        "REPLICA_2": f"127.0.0.1:{ports[1]}",
    }
    balancer = subprocess.Popen(
        ["haproxy", "-db", "-f", str(ROOT / "deploy" / "haproxy" / "haproxy.cfg")],
        env={**env, **addresses},
        stdout=(tmp_path / "haproxy.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    images = [data for _, data in cifar_samples(per_class=2)]
    answered: list[tuple[float, str]] = []
    failures: list[str] = []
    stop = threading.Event()
    deadline = time.monotonic() + 180  # the clients end by themselves whatever the servers do

    def client(index: int) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{front}", timeout=30) as http:
            for n in range(20000):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                image = images[(index + n) % len(images)]
                try:
                    answer = http.post("/classify", files={"image": image}, data={"model": "lenet"})
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                if answer.status_code == 200:
                    answered.append((time.monotonic(), answer.json()["model_version"]))
                else:
                    failures.append(f"{answer.status_code} {answer.text[:200]}")

    try:
        wait_for(f"http://127.0.0.1:{front}/readyz")
        with ThreadPoolExecutor(CLIENTS) as pool:
            clients = [pool.submit(client, i) for i in range(CLIENTS)]
            try:
                time.sleep(1)
                for port in ports:  # one replica at a time, as a rolling update does
                    stop_server(replicas[port])
                    replicas[port] = start_server(["service.service:Classifier"], served(env, new), ROOT, port)
                    time.sleep(2)  # HAProxy's `rise 2` checks, 500 ms apart, put it back
                restarted = time.monotonic()
                time.sleep(2)
            finally:
                stop.set()
                for done in clients:
                    done.result()
    finally:
        balancer.terminate()
        balancer.wait(timeout=10)
        for process in replicas.values():
            stop_server(process)

    assert failures == []
    versions = [version for _, version in answered]
    assert versions.count(old) > 50 and versions.count(new) > 50
    assert {version for at, version in answered if at > restarted} == {new}


def served(env: dict, version: str) -> dict:
    return {**env, "CIFAR10_MODELS": f"lenet:{version}"}


def list_lenet_versions(env: dict) -> list[str]:
    """The store's lenet versions, newest first."""
    script = (
        "import bentoml\n"
        "models = sorted(bentoml.models.list('cifar10-lenet'), key=lambda m: m.info.creation_time, reverse=True)\n"
        "print(' '.join(m.tag.version for m in models))"
    )
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, check=True, capture_output=True, text=True)
    return out.stdout.split()
