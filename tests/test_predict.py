"""`cifar10 predict` and `cifar10 evaluate` on real files, locally and through a live server."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from cli.predict import files_in
from core.errors import UserError
from harness.samples import ROOT
from harness.server import free_port
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory: pytest.TempPathFactory, samples) -> Path:
    """Real JPEG and PNG images, plus a text file, a truncated JPEG and an empty file."""
    folder = tmp_path_factory.mktemp("mixed")
    for i, (label, data) in enumerate(samples[:6]):
        if i % 2:
            buffer = io.BytesIO()
            Image.open(io.BytesIO(data)).save(buffer, "PNG")
            (folder / f"{i:02d}-{label}.png").write_bytes(buffer.getvalue())
        else:
            (folder / f"{i:02d}-{label}.jpg").write_bytes(data)
    (folder / "07-notes.txt").write_text("not an image\n")
    (folder / "08-truncated.jpg").write_bytes(samples[6][1][:120])
    (folder / "09-empty.jpg").write_bytes(b"")
    return folder


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_predict_labels_good_files_and_reports_bad_ones_in_order(mixed_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "labels.jsonl"
    result = run_cli("predict", str(mixed_folder), "--model", "lenet", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "9 images, 3 errors" in result.stderr
    rows = read_jsonl(out)
    assert [Path(r["path"]).name for r in rows] == sorted(p.name for p in mixed_folder.iterdir())
    assert all(
        r["label"] and not r["error"] and len(r["top_labels"]) == len(r["top_probabilities"]) == 3 for r in rows[:6]
    )
    assert [bool(r["error"]) for r in rows[6:]] == [True, True, True]
    assert "truncated" in rows[7]["error"] and "empty" in rows[8]["error"]


def test_csv_and_jsonl_agree(mixed_folder: Path, tmp_path: Path) -> None:
    run_cli("predict", str(mixed_folder), "--model", "lenet", "--out", str(tmp_path / "a.jsonl"))
    result = run_cli("predict", str(mixed_folder), "--model", "lenet", "--out", str(tmp_path / "a.csv"))
    assert result.returncode == 0
    rows = list(csv.DictReader((tmp_path / "a.csv").open()))
    for row, line in zip(rows, read_jsonl(tmp_path / "a.jsonl"), strict=True):
        assert row["label"] == (line["label"] or "") and row["path"] == line["path"]
        if line["probability"] is not None:
            assert float(row["probability"]) == pytest.approx(line["probability"], abs=1e-6)


def test_paths_from_stdin_and_stdout_output(mixed_folder: Path) -> None:
    paths = "\n".join(str(p) for p in sorted(mixed_folder.glob("*.jpg"))) + "\n"
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "predict", "-", "--model", "lenet", "--format", "jsonl"],
        input=paths,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0
    assert len(result.stdout.splitlines()) == len(paths.split())


def test_local_and_server_predictions_agree(mixed_folder: Path, tmp_path: Path, server: str) -> None:
    """Compared by probability per class (all ten): the order of two near-equal classes is not an answer."""
    local, remote = tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    assert (
        run_cli("predict", str(mixed_folder), "--model", "lenet", "--top-k", "10", "--out", str(local)).returncode == 0
    )
    result = run_cli(
        "predict",
        str(mixed_folder),
        "--model",
        "lenet",
        "--top-k",
        "10",
        "--out",
        str(remote),
        "--server",
        server,
        "--batch-size",
        "4",
    )
    assert result.returncode == 0, result.stderr
    for a, b in zip(read_jsonl(local), read_jsonl(remote), strict=True):
        assert (a["path"], bool(a["error"])) == (b["path"], bool(b["error"]))
        assert dict(zip(a["top_labels"], a["top_probabilities"], strict=True)) == pytest.approx(
            dict(zip(b["top_labels"], b["top_probabilities"], strict=True)), abs=1e-5
        )


def test_existing_output_is_kept_without_force(mixed_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "keep.csv"
    out.write_text("precious\n")
    result = run_cli("predict", str(mixed_folder), "--out", str(out))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and "--force" in result.stderr
    assert out.read_text() == "precious\n"
    assert run_cli("predict", str(mixed_folder), "--model", "lenet", "--out", str(out), "--force").returncode == 0
    assert out.read_text().startswith("path,label")


def test_unknown_model_is_a_one_line_error_and_leaves_no_file(mixed_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    result = run_cli("predict", str(mixed_folder), "--model", "vgg16", "--out", str(out))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and "no model" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_unreachable_server_is_a_one_line_error(mixed_folder: Path) -> None:
    result = run_cli("predict", str(mixed_folder), "--server", f"http://127.0.0.1:{free_port()}")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the server" in lines[0]


def test_no_inputs_is_an_error(tmp_path: Path) -> None:
    result = run_cli("predict", str(tmp_path / "*.jpg"))
    assert result.returncode == 2 and "no files match" in result.stderr


def test_evaluate_matches_counting_predict_output(tiny_data: Path, tmp_path: Path) -> None:
    result = run_cli("evaluate", "--data", str(tiny_data), "--model", "lenet", "--out", str(tmp_path / "eval"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert (tmp_path / "eval" / "confusion.png").is_file()
    out = tmp_path / "p.jsonl"
    assert (
        run_cli(
            "predict", str(tiny_data / "test"), "--recursive", "--model", "lenet", "--out", str(out), "--top-k", "1"
        ).returncode
        == 0
    )
    rows = read_jsonl(out)
    correct = sum(Path(r["path"]).parent.name == r["label"] for r in rows)
    assert report["images"] == len(rows)
    assert report["accuracy"] == pytest.approx(correct / len(rows))
    assert sum(map(sum, report["confusion_matrix"]["rows_true_cols_predicted"])) == len(rows)


def test_folders_list_in_path_order(tmp_path: Path) -> None:
    for name in ("b.jpg", "a/2.jpg", "a/1/x.jpg", "a b/3.jpg", "A.jpg", ".hidden.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "link").symlink_to(tmp_path / "a")  # not followed: the tree could loop
    top = str(tmp_path)
    expected = [".hidden.jpg", "A.jpg", "a/1/x.jpg", "a/2.jpg", "a b/3.jpg", "b.jpg"]
    assert list(files_in(top, recursive=True)) == [f"{top}/{name}" for name in expected]
    assert list(files_in(top, recursive=False)) == [f"{top}/{name}" for name in (".hidden.jpg", "A.jpg", "b.jpg")]
    with pytest.raises(UserError, match="cannot list folder"):
        list(files_in(str(tmp_path / "gone"), recursive=True))


def test_evaluate_without_matplotlib_writes_the_json_and_names_the_install_command(
    tiny_data: Path, tmp_path: Path
) -> None:
    """As after `make serve` alone: the serving set has neither matplotlib nor torch."""
    script = (
        "import sys; sys.modules['matplotlib'] = sys.modules['torch'] = None\nfrom cli.main import main\n"
        f"sys.exit(main(['evaluate', '--data', {str(tiny_data)!r}, '--model', 'lenet', '--out', "
        f"{str(tmp_path / 'eval')!r}]))"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "eval" / "evaluation.json").is_file() and not (tmp_path / "eval" / "confusion.png").exists()
    assert "calibration: ECE " in result.stdout
    assert f"{sys.executable} -m pip install matplotlib" in result.stdout


def test_sub_folders_skipped_without_recursive_are_named(tmp_path: Path, samples) -> None:
    (tmp_path / "photos" / "holiday").mkdir(parents=True)
    (tmp_path / "photos" / "a.jpg").write_bytes(samples[0][1])
    (tmp_path / "photos" / "holiday" / "b.jpg").write_bytes(samples[1][1])
    flat = run_cli("predict", str(tmp_path / "photos"), "--model", "lenet")
    assert flat.returncode == 0 and len(flat.stdout.splitlines()) == 2  # header + a.jpg
    assert f"skipped 1 sub-folder of {tmp_path / 'photos'}; add --recursive to include them" in flat.stderr
    assert "1 image, 0 errors" in flat.stderr
    deep = run_cli("predict", str(tmp_path / "photos"), "--model", "lenet", "--recursive")
    assert len(deep.stdout.splitlines()) == 3 and "skipped" not in deep.stderr


def test_a_run_that_fails_before_any_work_prints_no_csv_header(tmp_path: Path) -> None:
    result = run_cli("predict", str(tmp_path / "nothing-*.jpg"))
    assert result.returncode == 2 and result.stdout == ""


def test_a_folder_without_images_at_its_top_leaves_no_output_file(tmp_path: Path, samples) -> None:
    """`predict photos/ --out labels.csv` where the images sit in sub-folders: an error, no empty labels.csv."""
    (tmp_path / "photos" / "test").mkdir(parents=True)
    (tmp_path / "photos" / "test" / "a.jpg").write_bytes(samples[0][1])
    result = run_cli("predict", str(tmp_path / "photos"), "--out", str(tmp_path / "labels.csv"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "add --recursive" in lines[0] and "no input files" in lines[-1], lines
    assert len(lines) == 2 and not list(tmp_path.glob("labels.csv*"))
