"""`make serve`'s check of its port before BentoML starts (which would print 58 lines for a port in use):
a whole number from 1 to 65535 that no process listens on.

    python -m service.port PORT
"""

from __future__ import annotations

import errno
import socket
import sys


def port_problem(text: str) -> str | None:
    """Why `text` cannot be the server's port, or None."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        return "use a whole number from 1 to 65535, e.g. make serve PORT=3001"
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT does not count
        try:
            probe.bind(("0.0.0.0", int(text)))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "another process listens on it; stop it, or choose another port: make serve PORT=3001"
            return f"cannot listen on it ({exc.strerror}); choose another port: make serve PORT=3001"
    return None


if __name__ == "__main__":
    problem = port_problem(sys.argv[1] if len(sys.argv) > 1 else "")
    if problem:
        sys.exit(f"error: port {sys.argv[1] if len(sys.argv) > 1 else '(none)'}: {problem}")
