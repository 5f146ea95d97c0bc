"""CIFAR10_* settings: checked by the project before BentoML sees them, each bad value one line naming it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.samples import ROOT
from harness.server import serve_expecting_exit
from service.settings import SettingError, Settings


def test_defaults_and_given_values() -> None:
    assert Settings.from_env({}) == Settings()
    settings = Settings.from_env({"CIFAR10_WORKERS": "3", "CIFAR10_PROVIDERS": "CPU", "CIFAR10_TIMEOUT_S": " 9 "})
    assert (settings.workers, settings.providers, settings.timeout_s) == (3, "cpu", 9)


@pytest.mark.parametrize(
    ("variable", "value", "words"),
    [
        ("CIFAR10_WORKERS", "-1", "CIFAR10_WORKERS='-1' is out of range; use a whole number from 0 to 256"),
        ("CIFAR10_WORKERS", "abc", "CIFAR10_WORKERS='abc' is not a whole number"),
        ("CIFAR10_MAX_BATCH_SIZE", "0", "CIFAR10_MAX_BATCH_SIZE='0' is out of range; use a whole number from 1"),
        ("CIFAR10_MAX_LATENCY_MS", "0", "CIFAR10_MAX_LATENCY_MS='0' is out of range"),
        ("CIFAR10_MAX_CONCURRENCY", "-5", "CIFAR10_MAX_CONCURRENCY='-5' is out of range"),
        ("CIFAR10_TIMEOUT_S", "1.5", "CIFAR10_TIMEOUT_S='1.5' is not a whole number"),
        ("CIFAR10_PROVIDERS", "gpu", "CIFAR10_PROVIDERS='gpu': use one of auto, cpu, cuda"),
    ],
)
def test_a_bad_value_names_the_variable_and_the_allowed_values(variable: str, value: str, words: str) -> None:
    with pytest.raises(SettingError) as info:
        Settings.from_env({variable: value})
    assert str(info.value).startswith(words) and "\n" not in str(info.value)


@pytest.mark.parametrize(("variable", "value"), [("CIFAR10_WORKERS", "-1"), ("CIFAR10_PROVIDERS", "gpu")])
def test_bentoml_serve_with_a_bad_setting_prints_one_line_and_exits(variable: str, value: str, tmp_path: Path) -> None:
    env = {**os.environ, "BENTOML_HOME": str(tmp_path), variable: value}
    result = serve_expecting_exit(["service.service:Classifier"], env, ROOT)
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith(f"error: {variable}={value!r}"), lines
