"""The `cifar10` command's contract with its user: a bad option is one line and exit status 2, checked before any
work; outputs follow one rule (never replaced without --force) and are written like every other CLI's."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from core.store import shipped_file
from harness.samples import ROOT
from tests.conftest import run_cli


def one_line(result: subprocess.CompletedProcess, *words: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert all(word in lines[0] for word in words), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["train", "--arch", "lenet", "--data", "d", "--out", "r", "--epochs", "0"], ("--epochs", "from 1")),
        (["train", "--arch", "lenet", "--data", "d", "--out", "r", "--batch-size", "0"], ("--batch-size",)),
        (["train", "--arch", "lenet", "--data", "d", "--out", "r", "--lr", "-1"], ("--lr", "above 0")),
        (["train", "--arch", "lenet", "--data", "d", "--out", "r", "--val-size", "0"], ("--val-size",)),
        (["train", "--arch", "lenet", "--data", "d", "--out", "r", "--cutout", "40"], ("--cutout", "0 to 32")),
        (["train", "--arch", "vgg19", "--data", "d", "--out", "r"], ("--arch", "vgg16")),
        (["quantize", "m.onnx", "--data", "d", "--out", "q.onnx", "--images", "0"], ("--images",)),
        (["quantize", "m.onnx", "--data", "d", "--out", "q.onnx", "--min-agreement", "2"], ("--min-agreement",)),
        (["export", "best.pt", "--out", "m.onnx", "--tolerance", "0"], ("--tolerance", "above 0")),
        (["predict", "x.jpg", "--workers", "-3"], ("--workers", "from 1")),
        (["predict", "x.jpg", "--top-k", "11"], ("--top-k", "1 to 10")),
        (["predict", "x.jpg", "--batch-size", "zero"], ("--batch-size", "'zero' is not a whole number")),
        (["predict"], ("INPUT",)),
        (["predict", "x.jpg", "-q", "--bogus"], ("cifar10 predict: error: unrecognized arguments: --bogus",)),
        (["evaluate", "--data", "d", "-x"], ("cifar10 evaluate: error: unrecognized arguments: -x",)),
    ],
)
def test_a_bad_option_is_one_line_before_any_work(args: list[str], words: tuple[str, ...], tmp_path: Path) -> None:
    result = run_cli(*args, cwd=tmp_path)
    line = one_line(result, *words)
    assert line.startswith("cifar10 ") and line.endswith("--help")
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_predict_takes_the_usual_short_flags(tmp_path: Path, samples) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "cat.jpg").write_bytes(samples[0][1])
    result = run_cli("predict", str(tmp_path / "in"), "-q", "-m", "lenet", "-k", "2", "-o", str(tmp_path / "out.jsonl"))
    assert result.returncode == 0, result.stderr
    assert len(json.loads((tmp_path / "out.jsonl").read_text())["top_labels"]) == 2


def test_a_run_refused_for_its_data_leaves_no_run_folder(tmp_path: Path) -> None:
    result = run_cli("train", "--arch", "lenet", "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "run"))
    one_line(result, "data path not found")
    assert not (tmp_path / "run").exists()


def test_predict_against_a_server_refuses_what_it_would_ignore(tmp_path: Path, samples) -> None:
    (tmp_path / "cat.jpg").write_bytes(samples[0][1])
    no_scheme = run_cli("predict", str(tmp_path / "cat.jpg"), "--server", "localhost:3101")
    one_line(no_scheme, "--server 'localhost:3101' is not an http:// or https:// URL", "e.g. http://localhost:3101")
    precision = run_cli(
        "predict", str(tmp_path / "cat.jpg"), "--server", "http://localhost:3101", "--precision", "fp32"
    )
    one_line(precision, "--precision fp32 chooses a local model's copy", "drop --precision or --server")
    missing_folder = run_cli("predict", str(tmp_path / "cat.jpg"), "--out", str(tmp_path / "new" / "labels.csv"))
    one_line(missing_folder, "no folder", "create it first")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.jpg"]


def test_every_command_keeps_an_existing_output_without_force(tmp_path: Path, tiny_data: Path) -> None:
    """One rule for predict, export, quantize and evaluate: an existing output is replaced only with --force."""
    for name in ("kept.onnx", "kept.csv"):
        (tmp_path / name).write_text("precious\n")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "evaluation.json").write_text("precious\n")
    checkpoint = ROOT / "does-not-matter.pt"  # refused before the checkpoint is read
    refused = [
        run_cli("export", str(checkpoint), "--out", str(tmp_path / "kept.onnx")),
        run_cli("quantize", str(shipped_file("lenet")), "--data", str(tiny_data), "--out", str(tmp_path / "kept.onnx")),
        run_cli("evaluate", "--data", str(tiny_data), "--model", "lenet", "--out", str(tmp_path / "eval")),
        run_cli("predict", str(tiny_data / "test"), "--recursive", "--out", str(tmp_path / "kept.csv")),
    ]
    for result in refused:
        one_line(result, "exists; choose another --out or add --force to overwrite it")
    assert (tmp_path / "kept.onnx").read_text() == (tmp_path / "kept.csv").read_text() == "precious\n"
    forced = run_cli(
        "evaluate", "--data", str(tiny_data), "--model", "lenet", "--out", str(tmp_path / "eval"), "--force"
    )
    assert forced.returncode == 0 and json.loads((tmp_path / "eval" / "evaluation.json").read_text())["images"] == 50


def test_outputs_use_newlines_the_umask_and_the_documented_columns(tmp_path: Path, tiny_data: Path) -> None:
    labels = tmp_path / "labels.csv"
    rows = tmp_path / "labels.jsonl"
    for out in (labels, rows):
        assert (
            run_cli("predict", str(tiny_data / "test" / "cat"), "--model", "lenet", "--out", str(out)).returncode == 0
        )
    assert b"\r\n" not in labels.read_bytes() and labels.read_bytes().count(b"\n") == 6  # header and 5 rows
    header = labels.read_text().splitlines()[0].split(",")
    assert header == [
        "path",
        "label",
        "probability",
        "top_labels",
        "top_probabilities",
        "in_distribution",
        "ood_score",
        "error",
    ]
    first = json.loads(rows.read_text().splitlines()[0])
    assert list(first) == header and len(first["top_labels"]) == len(first["top_probabilities"]) == 3
    assert isinstance(first["in_distribution"], bool) and isinstance(first["ood_score"], float)
    assert labels.read_text().splitlines()[1].split(",")[5] in ("true", "false")
    exported = tmp_path / "lenet.onnx"
    old = os.umask(0o022)
    try:
        quantized = run_cli(
            "quantize",
            str(shipped_file("lenet")),
            "--data",
            str(tiny_data),
            "--out",
            str(exported),
            "--images",
            "64",
            "--min-agreement",
            "0",
        )
        assert quantized.returncode == 0, quantized.stderr
    finally:
        os.umask(old)
    for written in (labels, exported):
        assert stat.S_IMODE(written.stat().st_mode) == 0o644, written


def test_make_serve_refuses_a_busy_or_impossible_port_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "tools.port", str(port)], capture_output=True, text=True, cwd=ROOT
        )
    assert result.returncode == 1 and result.stderr.strip() == (
        f"error: port {port}: another process listens on it; stop it, or choose another port: make serve PORT=3001"
    )
    impossible = subprocess.run([sys.executable, "-m", "tools.port", "99999"], capture_output=True, text=True, cwd=ROOT)
    assert impossible.returncode == 1 and "use a whole number from 1 to 65535" in impossible.stderr
    assert "@$(BIN)/python -m tools.port $(PORT)" in (ROOT / "Makefile").read_text()  # make serve runs it first
