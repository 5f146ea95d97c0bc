"""File helpers shared by training, export and the model store."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from core.errors import UserError


def cache_dir() -> Path:
    """Where work done once is kept between runs: decoded data sets, int8 self-check results (CIFAR10_CACHE)."""
    return Path(os.environ.get("CIFAR10_CACHE", Path.home() / ".cache" / "cifar10-service"))


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's content."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def refuse_existing(path: Path, force: bool) -> None:
    """The one rule for every command's output: an existing file is replaced only with --force."""
    if path.exists() and not force:
        raise UserError(f"{path} exists; choose another --out or add --force to overwrite it")


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """`write` fills a temporary file beside `path`, which then replaces it: a cut never leaves half a file,
    and processes writing the same path at once never share a temporary file. The file gets the mode the
    umask gives a new file (mkstemp's own is 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        tmp.chmod(0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: set it straight back
    os.umask(mask)
    return mask
