"""`cifar10 predict --ray` on a real local Ray: the rows local `predict` writes, from folders and Parquet alike."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from harness.samples import ROOT, cifar_samples
from tests.conftest import run_cli

SUMMARY = re.compile(
    r"^([\d,]+) images?, ([\d,]+) errors?, [\d,]+ images/s -> .+ \(Ray: up to [\d,]+ actors?, [\d.]+ s\)$"
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """400 CIFAR-10 test images (40 a class) and two files that are not images."""
    folder = tmp_path_factory.mktemp("images")
    for i, (label, data) in enumerate(cifar_samples(40)):
        (folder / f"{i:04d}-{label}.jpg").write_bytes(data)
    (folder / "notes.txt").write_text("not an image")
    (folder / "cut.jpg").write_bytes(cifar_samples(1)[0][1][:40])
    return folder


def rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def summary(stderr: str) -> tuple[int, int]:
    """(images, errors) from the run's last line, which must be the summary."""
    match = SUMMARY.match(stderr.strip().splitlines()[-1])
    assert match, stderr[-2000:]
    return int(match.group(1).replace(",", "")), int(match.group(2).replace(",", ""))


def test_on_ray_the_rows_are_local_predicts_for_400_test_images(folder: Path, tmp_path: Path) -> None:
    """The same paths in the same order, the same labels and probabilities, the same error rows, and a summary."""
    missing = str(folder / "missing.jpg")
    local = run_cli("predict", str(folder), missing, "--out", str(tmp_path / "local.csv"), "--quiet")
    assert local.returncode == 0, local.stderr
    on_ray = run_cli("predict", str(folder), missing, "--ray", "--out", str(tmp_path / "ray.csv"), "--quiet")
    assert on_ray.returncode == 0, on_ray.stderr
    expected, got = rows(tmp_path / "local.csv"), rows(tmp_path / "ray.csv")
    assert [r["path"] for r in got] == [r["path"] for r in expected] and len(got) == 403
    assert [r["label"] for r in got] == [r["label"] for r in expected]
    assert [r["error"] for r in got] == [r["error"] for r in expected]
    for mine, theirs in zip(got, expected, strict=True):
        assert [float(p) for p in mine["top_probabilities"].split(";") if p] == pytest.approx(
            [float(p) for p in theirs["top_probabilities"].split(";") if p], abs=1e-5
        )
    assert sum(bool(r["error"]) for r in got) == 3  # the text file, the cut JPEG, the missing file
    assert summary(on_ray.stderr) == (403, 3)
    assert "core_worker" not in on_ray.stderr  # Ray's error line about restartable actors (#41)


def test_parquet_in_parquet_out(folder: Path, tmp_path: Path) -> None:
    """A table of image bytes named by an id column; a missing or broken image is an error row, not a failure."""
    files = sorted(folder.glob("00[0-4]*.jpg"))  # 50 images
    table = pa.table(
        {
            "id": [f.name for f in files] + ["empty", "broken"],
            "jpeg": [f.read_bytes() for f in files] + [None, b"\xff\xd8 not really"],
        }
    )
    pq.write_table(table, tmp_path / "images.parquet")
    out = tmp_path / "labels.parquet"
    on_ray = run_cli(
        "predict",
        str(tmp_path / "images.parquet"),
        "--ray",
        "--image-column",
        "jpeg",
        "--id-column",
        "id",
        "--model",
        "lenet",
        "--out",
        str(out),
        "--quiet",
    )
    assert on_ray.returncode == 0, on_ray.stderr
    assert summary(on_ray.stderr) == (52, 2)
    written = pq.read_table(out).to_pylist()  # a folder of files, one per block
    local = run_cli("predict", *map(str, files), "--model", "lenet", "--out", str(tmp_path / "local.csv"), "--quiet")
    assert local.returncode == 0, local.stderr
    expected = {Path(r["path"]).name: r["label"] for r in rows(tmp_path / "local.csv")}
    assert len(expected) == 50
    assert {r["path"]: r["label"] for r in written if r["path"] in expected} == expected
    errors = {r["path"]: r["error"] for r in written if r["error"]}
    assert errors["empty"] == "no image bytes" and errors.keys() == {"empty", "broken"}
    assert all(r["label"] is None and r["top_labels"] == [] for r in written if r["error"])


def test_a_parquet_file_without_the_named_column_is_one_line_naming_the_option(tmp_path: Path) -> None:
    pq.write_table(pa.table({"path": ["a"], "bytes": [b"x"]}), tmp_path / "images.parquet")
    result = run_cli("predict", str(tmp_path / "images.parquet"), "--ray", "--out", str(tmp_path / "out.csv"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"cifar10 predict: error: {tmp_path / 'images.parquet'} has no column 'image' (it has path, bytes); "
        "name it with --image-column"
    )
    assert not (tmp_path / "out.csv").exists()


def test_ray_options_without_ray_and_parquet_output_without_ray_are_refused(tmp_path: Path) -> None:
    for args, message in (
        (["--actors", "2"], "--actors is for a Ray run; add --ray, or drop --actors"),
        (["--out", str(tmp_path / "x.parquet")], "Parquet output is written by a Ray run; add --ray"),
        (["--ray", "--server", "http://127.0.0.1:9"], "--server is for a run on this machine"),
    ):
        result = run_cli("predict", str(tmp_path), *args)
        assert result.returncode == 2 and message in result.stderr and len(result.stderr.splitlines()) == 1


def test_the_serving_image_has_no_ray() -> None:
    packages = yaml.safe_load((ROOT / "bentofile.yaml").read_text())["python"]["packages"]
    assert not [p for p in packages if re.match(r"(ray|pyarrow)\b", p)]
