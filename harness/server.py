"""Real `bentoml serve` processes on free localhost ports, started and stopped for tests and benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_grpc_port(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with a free CIFAR10_GRPC_PORT unless it sets one: the default, 3001, would collide between servers."""
    return {"CIFAR10_GRPC_PORT": str(free_port()), **env}


def start_server(args: list[str], env: dict, cwd: Path, port: int, timeout: float = 120) -> subprocess.Popen:
    """Start `bentoml serve ARGS` on `port` (and a free gRPC port: with_grpc_port) and wait until /readyz answers
    200."""
    env = with_grpc_port(env)
    log = open(Path(env.get("BENTOML_HOME", cwd)) / f"serve-{port}.log", "w")  # noqa: SIM115
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "bentoml"), "serve", *args, "--port", str(port), "--host", "127.0.0.1"],
        cwd=cwd,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # its own process group: stop_server can end it all
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"bentoml serve exited with {process.returncode}; see {log.name}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(process)
    raise RuntimeError(f"bentoml serve was not ready in {timeout}s; see {log.name}")


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM (the server drains), then SIGKILL to the whole group if it is still there after 30 s."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the workers too, or they would outlive the test
        process.wait()


def register_shipped(env: Mapping[str, str]) -> None:
    """The shipped models into the store of env's BENTOML_HOME, as `make serve` does first."""
    subprocess.run([sys.executable, "-m", "core.store"], env=dict(env), cwd=ROOT, check=True, capture_output=True)


@contextmanager
def serving(env: Mapping[str, str]) -> Iterator[tuple[subprocess.Popen, str, Path]]:
    """The shipped models registered and served with `env` (its BENTOML_HOME holds the store and the log);
    yields the process, its URL and its log; stops it unless it has already exited."""
    register_shipped(env)
    port = free_port()
    process = start_server(["service.service:Classifier"], dict(env), ROOT, port)
    try:
        yield process, f"http://127.0.0.1:{port}", Path(env["BENTOML_HOME"]) / f"serve-{port}.log"
    finally:
        if process.poll() is None:
            stop_server(process)


class Server:
    """A `bentoml serve` of the shipped models with the given CIFAR10_* settings, from `checkout` (this one)."""

    def __init__(self, home: Path, checkout: Path = ROOT, **settings: str) -> None:
        self.home, self.port = home, free_port()
        self.grpc_port = int(settings.setdefault("grpc_port", str(free_port())))
        env = {**os.environ, "BENTOML_HOME": str(home), **{f"CIFAR10_{k.upper()}": v for k, v in settings.items()}}
        self.process = start_server(["service.service:Classifier"], env, checkout, self.port)
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"

    def rss_mb(self) -> float:
        tree = psutil.Process(self.process.pid)
        return sum(p.memory_info().rss for p in [tree, *tree.children(recursive=True)]) / 2**20

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *_: object) -> None:
        stop_server(self.process)


def serve_expecting_exit(args: list[str], env: dict, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """`bentoml serve ARGS` that should stop by itself (a bad setting or model); killed with its workers if not."""
    command = [
        str(Path(sys.executable).parent / "bentoml"),
        "serve",
        *args,
        "--host",
        "127.0.0.1",
        "--port",
        str(free_port()),
    ]
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=with_grpc_port(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
