"""Model lookup: the fast read of the BentoML store agrees with BentoML's own lookup."""

from pathlib import Path

import bentoml
import pytest

from core.errors import UserError
from core.store import MODEL_FILE, register, resolve, shipped_file, store_path


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
