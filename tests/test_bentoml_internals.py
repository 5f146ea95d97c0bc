"""Each BentoML and uvicorn internal that core/bentoml_internals.py and service/bentoml_internals.py rely on is
still where it was: on an upgrade, a failure here names what moved."""

import inspect
import select
import socket
import struct
import time
from pathlib import Path

import bentoml
from bentoml._internal.configuration.containers import BentoMLContainer

from core.bentoml_internals import bentoml_home, stored_file
from core.store import MODEL_FILE, register, shipped_file
from service.bentoml_internals import WHEELS_ONLY, cors_options, hung_up, service_class, slim_image


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
    assert issubclass(service_class(lambda app, cors: app), bentoml.Service)


def test_the_process_managers_check_delay_and_respawn_are_where_they_were() -> None:
    from bentoml import serving
    from bentoml._internal.utils import circus
    from circus.watcher import Watcher

    # unwrap: once the service is imported, these are its wrappers
    assert "check_delay" in inspect.getsource(inspect.unwrap(circus.create_standalone_arbiter))
    assert "respawn=not running_inside_container()" in inspect.getsource(inspect.unwrap(serving.create_watcher))
    assert "respawn" in inspect.signature(Watcher.__init__).parameters


def test_uvicorns_protocol_hooks_are_where_they_were() -> None:
    from uvicorn.config import HTTP_PROTOCOLS
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

    assert HTTP_PROTOCOLS["auto"] == "uvicorn.protocols.http.auto:AutoHTTPProtocol"
    for hook in ("connection_made", "on_headers_complete", "on_response_complete", "connection_lost", "shutdown"):
        assert callable(getattr(HttpToolsProtocol, hook)), hook
    source = inspect.getsource(HttpToolsProtocol.__init__)
    assert "self.cycle" in source and "self.loop" in source
    assert "self.scope = " in inspect.getsource(HttpToolsProtocol.on_message_begin)
    assert "self.scope" in inspect.getsource(HttpToolsProtocol.on_headers_complete)
    # Connection.end: a cycle marked disconnected ends without uvicorn's "returned without starting response" 500
    assert "not self.disconnected" in inspect.getsource(RequestResponseCycle.run_asgi)


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
