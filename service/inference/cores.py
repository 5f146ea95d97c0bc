"""The CPU cores shared by a server's worker processes: all of them for a model call that runs alone.

Every worker's ONNX Runtime could use every core, but two workers running calls at once then
run twice as many threads as there are cores and ResNet-18 loses a quarter of its throughput;
with a fair share of threads each, a worker left with all the clients (keep-alive connections
stay with the worker that accepted them) would use one core of two. So each model has two
sessions, and a call takes the one with all cores only while no other worker is in a call.
The workers see each other through one byte each in a file they all map: no locks, and a stale
read costs at most one call run with the other session.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class SharedCores:
    """Which of a server's `workers` are in a model call; this process is worker `index` (0-based)."""

    def __init__(self, path: Path, workers: int, index: int) -> None:
        """`path`: a file for this server's workers only (it is created if missing)."""
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            if os.fstat(fd).st_size < workers:
                os.ftruncate(fd, workers)
            self.flags = mmap.mmap(fd, workers)
        finally:
            os.close(fd)
        self.index = index
        self.flags[index] = 0  # a file left by an earlier server with the same process id

    def others_busy(self) -> bool:
        return any(self.flags[i] for i in range(len(self.flags)) if i != self.index)

    @contextmanager
    def call(self) -> Iterator[bool]:
        """Mark this worker busy for the call; yields True when the call may use every core."""
        alone = not self.others_busy()
        self.flags[self.index] = 1
        try:
            yield alone
        finally:
            self.flags[self.index] = 0

    def close(self) -> None:
        """At server shutdown: remove the file (the first worker to get here does)."""
        self.flags.close()
        self.path.unlink(missing_ok=True)
