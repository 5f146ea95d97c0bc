"""Model lookup: the fast read of the BentoML store agrees with BentoML's own lookup."""

from pathlib import Path

import bentoml
import pytest

from core.errors import UserError
from core.store import MODEL_FILE, register, resolve, shipped_file, store_path


@pytest.fixture(scope="module")
def stored() -> bentoml.Model:
    register(shipped_file("lenet"), "store-test")
    return bentoml.models.get(register(shipped_file("lenet"), "store-test"))  # two versions: latest is the second


def test_tags_find_the_same_file_as_bentoml(stored: bentoml.Model) -> None:
    expected = Path(stored.path_of(MODEL_FILE))
    version = stored.tag.version
    for tag in (
        "store-test:latest",
        "store-test",
        f"store-test:{version}",
        "STORE-TEST:latest",
        f"store-test:{version[:8]}",
    ):  # a version prefix: BentoML's own lookup
        assert store_path(tag) == expected, tag
    assert resolve(f"store-test:{version}") == expected


def test_a_missing_latest_pointer_is_rebuilt_by_bentoml(stored: bentoml.Model) -> None:
    latest = Path(stored.path).parent / "latest"
    latest.unlink()
    assert store_path("store-test:latest") == Path(stored.path_of(MODEL_FILE))
    assert latest.read_text().strip() == stored.tag.version


def test_names_the_store_lacks() -> None:
    assert store_path("absent:latest") is None
    with pytest.raises(UserError, match="no model 'absent'"):
        resolve("absent")
