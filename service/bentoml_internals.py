"""Every use of BentoML and uvicorn beyond their documented APIs that serving needs, in one place (written against
BentoML 1.4.40 and uvicorn 0.55.0, which pyproject.toml pins; the model store's layout is core/bentoml_internals.py's).

On an upgrade of either, re-check each item below; tests/test_bentoml_internals.py fails loudly
when one of them has moved:
- `BentoMLContainer.http.cors` and `.access_control_options`: the CORS settings;
- `bentoml serve` sets PROMETHEUS_MULTIPROC_DIR to `$BENTOML_HOME/prometheus_multiproc_dir` for its workers and
  empties that folder when it starts, and each worker's /metrics reads the folder named by the variable;
- the undocumented `service_class=` argument of `@bentoml.service`, and `Service.to_asgi(is_main)`,
  through which the classification routes are put ahead of BentoML's per-request middleware;
- `bentoml._internal.utils.circus.create_standalone_arbiter(check_delay=10)` and
  `bentoml.serving.create_watcher(respawn=not running_inside_container())`: how often `bentoml
  serve`'s process manager looks for dead workers, and whether it starts them again; both looked
  up when the server starts, after it imports the service;
- `bentoml.images.Image` inserts an `apt-get install build-essential git gnupg2 ...` (588 MB) before
  anything else for every distro it knows (`CONTAINER_METADATA`), and none for a name it does not;
- uvicorn's `protocols.http.auto.AutoHTTPProtocol` (what its default `http="auto"` resolves to when
  BentoML's worker builds its uvicorn.Config, after importing the service) and the hooks of its
  httptools protocol (`connection_made`, `on_headers_complete`, `on_response_complete`,
  `connection_lost`, `shutdown`, `cycle`, `loop`, `scope`, `transport`, and the cycle's `disconnected`),
  for a time limit on request heads that uvicorn lacks, for a last moment to send a request when a
  worker shuts down, and to give each request its `Connection`.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import os
import select
import shutil
import sys
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.errors import UserError
from service.log import say

ASGIApp = Callable[..., Any]
LAST_CALL_S = 0.5  # at shutdown, how long a connection without a request may still send one
CONNECTION = "cifar10.connection"  # the scope key of a request's Connection (below)
_CLOSED = select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL


def cors_options() -> dict | None:
    """Starlette CORSMiddleware options from BentoML's `http.cors` settings, or None when CORS is off."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    if not BentoMLContainer.http.cors.enabled.get():
        return None
    return BentoMLContainer.access_control_options.get()


def service_class(wrap: Callable[[type, ASGIApp, dict | None], ASGIApp]) -> type:
    """A `bentoml.Service` subclass whose ASGI app is `wrap(the service's class, BentoML's app, cors_options())`, made
    in each worker before uvicorn starts."""
    import bentoml

    class WrappedService(bentoml.Service):
        def to_asgi(self, is_main: bool = True) -> ASGIApp:
            app = super().to_asgi(is_main)  # also loads this service's BentoML configuration
            return wrap(self.inner, app, cors_options())

    return WrappedService


def own_metrics_folder() -> Path:
    """Give this worker's Prometheus files a folder of its server's own, before any metric has a value.

    Every `bentoml serve` on a host shares BentoML's folder and empties it when it starts: a second server wiped the
    first one's counts, and each counted the other's requests. A server's workers (whose parent is the server) share
    `$BENTOML_HOME/cifar10-metrics/PID-STARTED` instead; folders of servers that no longer run are removed."""
    import psutil

    from core.bentoml_internals import bentoml_home

    def name(process: psutil.Process) -> str:
        return f"{process.pid}-{int(process.create_time() * 1000)}"

    root = bentoml_home() / "cifar10-metrics"
    folder = root / name(psutil.Process(os.getppid()))
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    for other in root.iterdir():
        pid = other.name.partition("-")[0]
        try:
            alive = pid.isdigit() and name(psutil.Process(int(pid))) == other.name
        except psutil.Error:
            alive = False
        if not alive:
            shutil.rmtree(other, ignore_errors=True)
    # A worker killed outside its cleanup left its live gauges (cifar10_workers_serving): its replacement drops them.
    for path in folder.glob("gauge_live*_*.db"):
        pid = path.stem.rpartition("_")[2]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(int(pid), str(folder))
    return folder


def hung_up(connection: asyncio.trsock.TransportSocket) -> bool:
    """Whether the client has closed (or reset) its end of `connection`, asked of the socket itself: the event loop
    reads a hang-up only when it next gets round to that connection. About 1 us; safe from any thread."""
    fd = connection.fileno()
    if fd < 0:  # closed here already
        return True
    poller = select.poll()
    poller.register(fd, select.POLLRDHUP)
    return any(events & _CLOSED for _, events in poller.poll(0))


class Connection:
    """A request's connection as uvicorn's protocol holds it: whether its client has hung up, and ending it then."""

    def __init__(self, protocol: Any) -> None:
        self.protocol = weakref.ref(protocol)  # the protocol holds this: no reference cycle for the GC to find
        self.socket = protocol.transport.get_extra_info("socket")

    def hung_up(self) -> bool:
        """Whether the client has gone, from its socket (see `hung_up`); safe from any thread."""
        return hung_up(self.socket)

    def end(self) -> None:
        """End the connection of a client that has hung up, as uvicorn does once it has read the hang-up: no answer,
        and no error logged for the missing one. In the event loop."""
        protocol = self.protocol()
        if protocol is None:  # gone with its connection
            return
        if protocol.cycle is not None:
            protocol.cycle.disconnected = True
        protocol.transport.close()


def protocol_problem() -> str:
    """Why uvicorn's protocol cannot take this service's additions (install_protocol), or "": a server without them
    would have no head timeout and no hang-up probe, so it must not start."""
    try:
        from uvicorn.protocols.http import auto
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError as exc:
        return f"uvicorn's httptools protocol is missing ({exc}); install the pinned httptools and uvicorn"
    if not issubclass(auto.AutoHTTPProtocol, HttpToolsProtocol):
        return "uvicorn would use its h11 protocol, not httptools'; install the pinned httptools"
    return ""


def install_protocol(head_timeout_s: float) -> None:
    """uvicorn's httptools protocol with three additions: a 408 for a request line and headers that take longer than
    `head_timeout_s` (uvicorn has no such limit: its keep-alive timer stops at a connection's first byte, so a client
    sending a header byte a second would hold its connection for ever); a last moment to send a request at
    shutdown; and each request's `Connection` in its scope (`CONNECTION`). Call before uvicorn starts; raises
    RuntimeError where it cannot apply (protocol_problem, which the server checks before any worker starts).
    """
    from uvicorn.protocols.http import auto

    if protocol_problem():
        raise RuntimeError(protocol_problem())
    auto.AutoHTTPProtocol = service_protocol(head_timeout_s)


def service_protocol(head_timeout_s: float) -> type:
    """The httptools protocol class with install_protocol's additions."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    body = json.dumps({"error": f"the request headers did not arrive within {head_timeout_s:g} s"}).encode()
    answer = (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )

    class ServiceProtocol(HttpToolsProtocol):
        head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self.connection = Connection(self)
            self._start_head_timer()

        def on_headers_complete(self) -> None:
            self._stop_head_timer()
            self.scope[CONNECTION] = self.connection
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._start_head_timer()  # for the next request on this connection

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_head_timer()
            super().connection_lost(exc)

        def shutdown(self) -> None:
            """uvicorn's graceful shutdown closes a connection without a request in progress at once, cutting a
            request that is on its way; give such a connection a last moment to send one instead."""
            if self.cycle is None or self.cycle.response_complete:
                self._start_head_timer(LAST_CALL_S)
            else:
                super().shutdown()

        def _start_head_timer(self, limit: float = head_timeout_s) -> None:
            self._stop_head_timer()
            if not self.transport.is_closing():
                self.head_timer = self.loop.call_later(limit, self._head_too_slow)

        def _stop_head_timer(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def _head_too_slow(self) -> None:
            self.head_timer = None
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.write(answer)
                self.transport.close()

    return ServiceProtocol


def restart_dead_workers_within(seconds: float) -> None:
    """Have `bentoml serve`'s process manager restart a dead worker within `seconds`, in a container too.

    BentoML looks for dead workers every 10 s (a killed worker's replacement came 8-9 s later), and in
    a container (BENTOML_CONTAINERIZED) restarts none, leaving a pod with one worker less for good
    while /readyz and /livez stay 200 on the others. Its 10 s dodged a conflict of its older runner
    health checks; this service has no runners. Call while the service module is imported.
    """
    from bentoml import serving
    from bentoml._internal.utils import circus
    from circus.arbiter import Arbiter
    from circus.watcher import Watcher

    create_arbiter, create_watcher = circus.create_standalone_arbiter, serving.create_watcher
    if getattr(create_arbiter, "check_delay", None) == seconds:  # imported twice (the server, then each worker)
        return
    takes = {
        name
        for init in (Arbiter.__init__, Watcher.__init__)
        for name in inspect.signature(init).parameters
        if name in ("check_delay", "respawn")
    }
    if takes != {"check_delay", "respawn"}:
        say(
            "cifar10: warning: circus's Arbiter or Watcher has changed (no check_delay or respawn): dead workers are "
            "restarted as BentoML does, every 10 s and never in a container"
        )
        return

    @functools.wraps(create_arbiter)
    def create_standalone_arbiter(watchers: list, **kwargs: Any) -> Any:
        return create_arbiter(watchers, **{"check_delay": seconds, **kwargs})

    @functools.wraps(create_watcher)
    def create_respawning_watcher(name: str, args: list[str], **kwargs: Any) -> Any:
        watcher = create_watcher(name, args, **kwargs)
        watcher.respawn = True
        return watcher

    create_standalone_arbiter.check_delay = seconds
    circus.create_standalone_arbiter = create_standalone_arbiter
    serving.create_watcher = create_respawning_watcher


def before_serving(check: Callable[[], None]) -> None:
    """Run `check` in `bentoml serve`'s server process just before it starts the workers (not when a build, or a
    worker, imports the service): a UserError from it stops the server with one line."""
    from bentoml._internal.utils import circus

    create_arbiter = circus.create_standalone_arbiter

    @functools.wraps(create_arbiter)
    def checked_arbiter(watchers: list, **kwargs: Any) -> Any:
        try:
            check()
        except UserError as exc:
            sys.exit(f"error: {exc}")
        return create_arbiter(watchers, **kwargs)

    circus.create_standalone_arbiter = checked_arbiter


def slim_image(python_version: str) -> Any:
    """The bento's container image: python:<version>-slim as it is, without the compilers and git BentoML
    installs for the distros it knows (588 MB of them). Every package
    this service needs is a wheel, so nothing is compiled at build time."""
    import bentoml

    return bentoml.images.Image(base_image=f"python:{python_version}-slim", distro=WHEELS_ONLY)


WHEELS_ONLY = "debian-slim-wheels-only"  # not one of BentoML's distros: it adds no apt-get step for it
