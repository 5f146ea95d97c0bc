"""What every benchmark writes: the machine it ran on (CPU model and instruction sets beside every figure), CSV
and JSON results under bench/results/, and Markdown tables for BENCHMARKS.md."""

from __future__ import annotations

import csv
import json
import platform
import shutil
import subprocess
from pathlib import Path

import onnxruntime as ort

from core.host import cpu_model, instruction_sets, usable_cores

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def machine() -> dict:
    """The host: cores, CPU model and the instruction sets that change ONNX Runtime's kernels, GPUs, versions."""
    gpu = "none"
    if shutil.which("nvidia-smi"):
        gpu = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip() or "none"
    return {
        "cores": usable_cores(),
        "cpu": cpu_model(),
        "instruction_sets": list(instruction_sets()),
        "gpu": gpu,
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
    }


def machine_line(info: dict) -> str:
    """The header line under which every table of a run is printed."""
    sets = ", ".join(info["instruction_sets"]) or "no AVX2"
    return f"Measured on: {info['cpu']}, {info['cores']} cores ({sets}); GPU: {info['gpu']}"


def write_csv(name: str, rows: list[dict]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (RESULTS / name).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: json.dumps(v) if isinstance(v, dict) else v for k, v in r.items()} for r in rows)


def write_json(name: str, result: dict, info: dict) -> None:
    """bench/results/NAME with the machine beside the figures, so that runs on different hosts are never compared
    blindly."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / name).write_text(json.dumps({"machine": info, **result}, indent=2) + "\n")


def table(rows: list[dict], columns: list[str]) -> str:
    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:,.2f}" if abs(v) < 10 else f"{v:,.1f}"
        return json.dumps(v) if isinstance(v, dict) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
