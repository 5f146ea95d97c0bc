"""What this host offers a model: usable CPU cores, GPUs, and the CPU's model and instruction sets."""

from __future__ import annotations

import ctypes
import math
import os
import platform
from functools import cache
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
# The flags that change ONNX Runtime's kernels (for int8 without VNNI, its answers) and bf16 training's speed.
INSTRUCTION_SETS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (`docker run --cpus`, a
    Kubernetes CPU limit), which os.cpu_count() ignores: it reports the host's cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = cgroup.read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


@cache
def gpu_count() -> int:
    """GPUs the CUDA driver sees (0 when there is no driver): asked without touching ONNX Runtime."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    except OSError:
        return 0


def _cpuinfo_field(name: str, cpuinfo: Path) -> str:
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == name), "")


def cpu_model(cpuinfo: Path = CPUINFO) -> str:
    return _cpuinfo_field("model name", cpuinfo) or platform.processor() or "unknown CPU"


def instruction_sets(cpuinfo: Path = CPUINFO) -> tuple[str, ...]:
    """Which of INSTRUCTION_SETS this CPU reports, in that order."""
    flags = set(_cpuinfo_field("flags", cpuinfo).split())
    return tuple(name for name in INSTRUCTION_SETS if name in flags)


def describe_cpu() -> str:
    """The CPU in one phrase, for log lines and figures: its model and the instruction sets that matter."""
    return f"{cpu_model()} ({' '.join(instruction_sets()) or 'no AVX2'})"
