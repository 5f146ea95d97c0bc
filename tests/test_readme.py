"""The README read as a newcomer runs it: its example files, its curl lines against a real server, and commands
whose paths must fit together."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness.samples import REAL_IMAGES, ROOT, TEST_ZIP

README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def bash_lines(text: str) -> list[str]:
    return [line for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines() if line]


@pytest.fixture(scope="module")
def example_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's line that makes cat.jpg, dog.png and notes.txt, run as written (paths made absolute)."""
    if not REAL_IMAGES:
        pytest.skip(f"the README's examples come from {TEST_ZIP}, which is not here")
    folder = tmp_path_factory.mktemp("readme")
    line = next(line for line in bash_lines(section("HTTP API")) if "cat.jpg" in line and "zipfile" in line)
    command = shlex.split(line.replace("../shared/data/cifar10-test.zip", str(TEST_ZIP)))
    subprocess.run([sys.executable, *command[1:]], cwd=folder, check=True)
    return folder


@pytest.mark.server
def test_the_http_examples_run_as_written(example_files: Path, server: str) -> None:
    if shutil.which("curl") is None:
        pytest.skip("no curl here")
    answers = []
    for line in bash_lines(section("HTTP API")):
        if line.startswith("curl "):
            command = shlex.split(line.replace("localhost:3000", server.removeprefix("http://")), comments=True)
            answers.append(
                json.loads(
                    subprocess.run(command, cwd=example_files, capture_output=True, text=True, check=True).stdout
                )
            )
    assert answers and all("error" not in a for a in answers), answers
    assert answers[0]["predictions"][0]["label"] == "cat"
    batch = next(a for a in answers if "results" in a)
    assert [r.get("status") for r in batch["results"]] == [None, None, 415]


def test_paths_fit_together() -> None:
    """The quantize example reads what the export example wrote; the Kubernetes text names a line that exists."""
    training = bash_lines(section("Training"))
    export = next(shlex.split(line) for line in training if " export " in line)
    written = export[export.index("--out") + 1]
    quantize = next(shlex.split(line) for line in bash_lines(README) if " quantize resnet18" in line)
    assert quantize[2] == written
    overlay = yaml.safe_load((ROOT / "deploy/kubernetes/overlays/cpu/kustomization.yaml").read_text())
    assert "newName:" in README and any("newName" in image for image in overlay["images"])


def test_the_configuration_table_lists_every_setting_the_service_reads() -> None:
    from dataclasses import fields

    from service.settings import Settings

    listed = set(re.findall(r"^\| `(CIFAR10_[A-Z0-9_]+)`", section("Configuration"), re.M))
    assert listed == {f"CIFAR10_{spec.name.upper()}" for spec in fields(Settings)}
