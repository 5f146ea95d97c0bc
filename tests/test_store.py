"""Model lookup: the fast read of the BentoML store agrees with BentoML's own lookup."""

import os
import subprocess
import sys
from pathlib import Path

import bentoml
import onnx
import pytest

from core.errors import UserError
from core.store import MODEL_FILE, register, resolve, shipped_file, store_path
from tests.conftest import ROOT, run_cli


@pytest.fixture(scope="module")
def stored() -> bentoml.Model:
    register(shipped_file("lenet"), "cifar10-lenet-storetest")
    return bentoml.models.get(
        register(shipped_file("lenet"), "cifar10-lenet-storetest")
    )  # two versions: latest is the second


def test_tags_find_the_same_file_as_bentoml(stored: bentoml.Model) -> None:
    expected = Path(stored.path_of(MODEL_FILE))
    version = stored.tag.version
    for tag in (
        "cifar10-lenet-storetest:latest",
        "cifar10-lenet-storetest",
        f"cifar10-lenet-storetest:{version}",
        "CIFAR10-LENET-STORETEST:latest",
        f"cifar10-lenet-storetest:{version[:8]}",
    ):  # a version prefix: BentoML's own lookup
        assert store_path(tag) == expected, tag
    assert resolve(f"cifar10-lenet-storetest:{version}") == expected


def test_a_missing_latest_pointer_is_rebuilt_by_bentoml(stored: bentoml.Model) -> None:
    latest = Path(stored.path).parent / "latest"
    latest.unlink()
    assert store_path("cifar10-lenet-storetest:latest") == Path(stored.path_of(MODEL_FILE))
    assert latest.read_text().strip() == stored.tag.version


def test_names_the_store_lacks() -> None:
    assert store_path("absent:latest") is None
    with pytest.raises(UserError, match="no model 'absent'"):
        resolve("absent")


@pytest.mark.parametrize(
    ("file", "name", "words"),
    [
        ("lenet", "cifar10-resnet18", "the file is a lenet, so its name starts with cifar10-lenet"),
        ("resnet18-int8", "cifar10-resnet18", "cannot register an int8 file as 'cifar10-resnet18': its name must end"),
        ("resnet18", "cifar10-resnet18-int8", "cannot register an fp32 file as 'cifar10-resnet18-int8'"),
        ("lenet", "my-lenet", "store names start with cifar10-"),
    ],
)
def test_a_name_that_does_not_say_what_the_file_is_is_refused(file: str, name: str, words: str) -> None:
    with pytest.raises(UserError, match=words):
        register(shipped_file(file), name)


def test_names_come_from_the_file_and_agree_with_it() -> None:
    assert register(shipped_file("resnet18-int8")).startswith("cifar10-resnet18-int8:")
    assert register(shipped_file("lenet"), "cifar10-lenet-long-run").startswith("cifar10-lenet-long-run:")


def test_a_newer_less_accurate_version_is_named_and_warned_about(
    tmp_path: Path, samples: list[tuple[str, bytes]]
) -> None:
    """#41: `make bento` (service.plan) and `predict` say which version answers, and warn where it scores below the
    shipped file on the same test images."""
    proto = onnx.load(str(shipped_file("lenet")))
    for prop in proto.metadata_props:
        if prop.key == "test_accuracy":
            prop.value = "0.102"  # as a ten-minute run on a tenth of the data scored, on the same 10,000 images
    worse = tmp_path / "lenet-worse.onnx"
    onnx.save(proto, str(worse))
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "CIFAR10_MODELS": "lenet"}
    assert run_cli("register", str(worse), env=env).returncode == 0
    plan = subprocess.run(
        [sys.executable, "-m", "service.plan"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert plan.returncode == 0, plan.stderr
    lines = plan.stdout.splitlines()
    assert lines[0].startswith("lenet: cifar10-lenet:") and "10.20%" in lines[0]
    assert lines[1] == (
        "  warning: lenet's 10.20% is below the shipped lenet's 73.15% on the same test images; choose a version "
        "with --model lenet:VERSION or CIFAR10_MODELS=lenet:VERSION (`bentoml models list` shows them)"
    )
    version = lines[0].split()[1].split(":")[1]
    assert lines[-1] == f"to serve these versions wherever this runs: CIFAR10_MODELS=lenet:{version}"
    image = tmp_path / "cat.jpg"
    image.write_bytes(samples[0][1])
    predict = run_cli("predict", str(image), "--model", "lenet", "--quiet", env=env)
    assert predict.returncode == 0, predict.stderr
    assert "is below the shipped lenet's 73.15%" in predict.stderr
