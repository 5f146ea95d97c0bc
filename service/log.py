"""The service's own lines on stderr (the access log is service/http/access.py's)."""

from __future__ import annotations

import contextlib
import sys


def say(line: str) -> None:
    """One line on stderr, which may be a pipe nobody reads any more (a server whose parent is gone)."""
    with contextlib.suppress(OSError):
        print(line, file=sys.stderr, flush=True)
