"""CIFAR10_* settings: checked by the project before BentoML sees them, each bad value one line naming it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.samples import ROOT
from harness.server import register_shipped, serve_expecting_exit
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


def test_the_model_list_is_parsed_and_checked() -> None:
    assert Settings().models == (("resnet18", "latest"), ("lenet", "latest"))
    parsed = Settings.from_env({"CIFAR10_MODELS": " vgg11:ABC123, cifar10-lenet ,resnet18"}).models
    assert parsed == (("vgg11", "abc123"), ("lenet", "latest"), ("resnet18", "latest"))
    for raw, words in (
        ("resnet18,,lenet", "'' is not NAME or NAME:VERSION"),
        ("lenet,lenet", "lenet is listed twice"),
        ("resnet18-int8", "list resnet18, not resnet18-int8"),
    ):
        with pytest.raises(SettingError, match=words):
            Settings.from_env({"CIFAR10_MODELS": raw})


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        (
            {"CIFAR10_MODELS": "resnet18,vgg11"},
            "CIFAR10_MODELS names vgg11, which the model store lacks (it has: lenet, resnet18, whitenet)",
        ),
        # A host whose driver sees no GPU (CUDA_VISIBLE_DEVICES hides any), whatever this one has.
        (
            {"CIFAR10_PROVIDERS": "cuda", "CUDA_VISIBLE_DEVICES": ""},
            "CIFAR10_PROVIDERS=cuda: cuda was asked for, but the CUDA driver sees no GPU",
        ),
    ],
)
def test_a_server_that_cannot_serve_what_it_is_asked_says_why_in_one_line(
    settings: dict, words: str, tmp_path: Path
) -> None:
    env = {**os.environ, "BENTOML_HOME": str(tmp_path)}
    register_shipped(env)
    result = serve_expecting_exit(["service.service:Classifier"], {**env, **settings}, ROOT)
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and words in lines[0], lines
