"""Each BentoML and uvicorn internal that core/bentoml_internals.py and service/bentoml_internals.py rely on still
does what they rely on (probed by behaviour: a real uvicorn in this process, a real arbiter and watcher): on an
upgrade, a failure here names what moved."""

import inspect
import select
import socket
import struct
import sys
import threading
import time
from pathlib import Path

import bentoml
from bentoml._internal.configuration.containers import BentoMLContainer

from core.bentoml_internals import bentoml_home, stored_file
from core.store import MODEL_FILE, register, shipped_file
from service.bentoml_internals import (
    CONNECTION,
    WHEELS_ONLY,
    Connection,
    cors_options,
    hung_up,
    install_protocol,
    protocol_problem,
    restart_dead_workers_within,
    service_class,
    slim_image,
)


def test_the_store_layout_is_read_as_bentoml_writes_it() -> None:
    tag = register(shipped_file("lenet"), "cifar10-lenet-layout")
    model = bentoml.models.get(tag)
    assert stored_file("cifar10-lenet-layout", "latest", MODEL_FILE) == stored_file(
        "cifar10-lenet-layout", model.tag.version, MODEL_FILE
    )
    assert str(stored_file("cifar10-lenet-layout", "", MODEL_FILE)) == model.path_of(MODEL_FILE)
    assert stored_file("cifar10-lenet-layout", "no-such-version", MODEL_FILE) is None


def test_bentoml_home_is_bentomls() -> None:
    assert bentoml_home().resolve() == Path(BentoMLContainer.bentoml_home.get()).resolve()


def test_cors_settings_are_where_they_were() -> None:
    assert isinstance(BentoMLContainer.http.cors.enabled.get(), bool)
    assert isinstance(BentoMLContainer.access_control_options.get(), dict)
    assert cors_options() is None  # off by default


def test_service_class_and_to_asgi_are_where_they_were() -> None:
    assert "service_class" in inspect.signature(bentoml.service).parameters
    assert "is_main" in inspect.signature(bentoml.Service.to_asgi).parameters
    assert issubclass(service_class(lambda service, app, cors: app), bentoml.Service)


def test_the_process_manager_restarts_dead_workers_within_a_second_in_a_container_too() -> None:
    from bentoml import serving
    from bentoml._internal.utils import circus

    restart_dead_workers_within(1.0)
    assert circus.create_standalone_arbiter([]).check_delay == 1.0
    assert serving.create_watcher("probe", [sys.executable, "-c", "pass"]).respawn is True


def test_uvicorn_runs_the_services_protocol_and_calls_its_hooks() -> None:
    """The protocol class uvicorn resolves for http="auto" is the service's, each request's scope gets its
    Connection (on_headers_complete), and headers that come too slowly get a 408 (connection_made's head timer)."""
    import uvicorn

    assert protocol_problem() == ""
    install_protocol(head_timeout_s=0.5)
    seen = []

    async def app(scope, receive, send) -> None:
        seen.append(scope.get(CONNECTION))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    with socket.create_server(("127.0.0.1", 0)) as listener:
        config = uvicorn.Config(app, log_level="error", lifespan="off")
        config.load()
        assert config.http_protocol_class.__name__ == "ServiceProtocol"
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 10
            while not server.started and time.monotonic() < deadline:
                time.sleep(0.05)
            with socket.create_connection(listener.getsockname(), timeout=5) as client:
                client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert client.recv(1024).startswith(b"HTTP/1.1 200")
            assert isinstance(seen[0], Connection)
            with socket.create_connection(listener.getsockname(), timeout=5) as client:
                client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # and nothing more
                assert client.recv(1024).startswith(b"HTTP/1.1 408 ")
        finally:
            server.should_exit = True
            thread.join(10)


def test_an_image_of_an_unknown_distro_gets_no_apt_step() -> None:
    from bentoml._internal.container.frontend.dockerfile import CONTAINER_METADATA

    assert WHEELS_ONLY not in CONTAINER_METADATA
    assert not any("apt-get" in command for command in slim_image("3.11").commands)
    assert any("build-essential" in command for command in bentoml.images.Image(python_version="3.11").commands)


def test_the_hang_up_probe_reads_a_real_socket() -> None:
    """Open and idle, or with unread data: there. Closed by the client, reset by it, or closed here: hung up."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        for ending in ("close", "reset", "ours"):
            client = socket.create_connection(listener.getsockname())
            server, _ = listener.accept()
            assert not hung_up(server)
            client.sendall(b"POST /classify HTTP/1.1\r\n")
            assert select.select([server], [], [], 5)[0]
            assert not hung_up(server)  # data waiting to be read is not a hang-up
            if ending == "reset":
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            if ending == "ours":
                server.close()
            else:
                client.close()
            deadline = time.monotonic() + 5  # the loopback delivers the FIN or RST at once; a busy host may lag
            while not hung_up(server) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert hung_up(server), ending
            server.close()
            client.close()
