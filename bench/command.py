"""`cifar10` commands run as a user runs them, timed from the interpreter's start."""

from __future__ import annotations

import subprocess
import sys
import time
import tomllib
from pathlib import Path

from bench.report import ROOT


def entry_point(checkout: Path = ROOT) -> list[str]:
    """`cifar10` through the checkout's own entry point (from its pyproject.toml), with this Python."""
    scripts = tomllib.loads((checkout / "pyproject.toml").read_text())["project"]["scripts"]
    module, function = scripts["cifar10"].split(":")
    return [sys.executable, "-c", f"import sys; from {module} import {function}; sys.exit({function}())"]


def timed(args: list[str], checkout: Path = ROOT) -> tuple[float, str]:
    """Run `cifar10 ARGS` in `checkout`; (wall seconds, start-up included, and its stderr). Fails if it fails."""
    began = time.perf_counter()
    result = subprocess.run(
        [*entry_point(checkout), *args], cwd=checkout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    seconds = time.perf_counter() - began
    if result.returncode != 0:
        raise SystemExit(f"cifar10 {' '.join(args)} failed:\n{result.stderr[-2000:]}")
    return seconds, result.stderr
