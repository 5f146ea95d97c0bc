"""The Kubernetes manifests (deploy/kubernetes): every overlay renders (`kubectl kustomize`, no cluster needed),
each object passes kubernetes-validate --strict, and the cross-references a schema cannot see hold."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from harness.samples import ROOT
from service.settings import Settings

OVERLAYS = sorted((ROOT / "deploy" / "kubernetes" / "overlays").iterdir())
KUBECTL = shutil.which("kubectl")
KUBERNETES = "1.37"


def render(overlay: Path) -> list[dict]:
    if KUBECTL is None:
        pytest.skip("no kubectl here to render the overlays: install kubectl 1.27 or newer")
    result = subprocess.run([KUBECTL, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def makefile_images() -> dict[str, str]:
    """What `make image` and `make image-cpu` build, from the Makefile's IMAGE_* variables."""
    return dict(re.findall(r"^IMAGE_(GPU|CPU) \?= (\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE))


def problems(objects: list[dict], overlay: str) -> list[str]:
    """What a schema cannot check: probe paths and ports, grace period against the drain, image, selectors."""
    found = []
    by_kind = {obj["kind"]: obj for obj in objects}
    deployment, service = by_kind["Deployment"], by_kind["Service"]
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    if str(ports.get("http")) != env.get("BENTOML_PORT", "3000"):
        found.append(f"container port {ports.get('http')} is not the service's port {env.get('BENTOML_PORT')}")
    for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
        get = container.get(probe, {}).get("httpGet", {})
        if get.get("path") != path or get.get("port") not in ("http", ports.get("http")):
            found.append(f"{probe} asks {get.get('path')}:{get.get('port')}, the service answers {path} on http")
    drain = int(env.get("CIFAR10_DRAIN_S") or Settings().drain_s)
    pause = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
    if grace <= pause + drain:
        found.append(f"terminationGracePeriodSeconds {grace} does not outlast preStop {pause} s + drain {drain} s")
    image = makefile_images()[overlay.upper()]
    if container["image"] != image:
        found.append(f"image {container['image']} is not what make builds for {overlay}: {image}")
    labels = pod["metadata"]["labels"]
    for kind, selector in (
        ("Deployment", deployment["spec"]["selector"]["matchLabels"]),
        ("Service", service["spec"]["selector"]),
        ("PodDisruptionBudget", by_kind["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]),
    ):
        if not selector or any(labels.get(k) != v for k, v in selector.items()):
            found.append(f"the {kind} selector {selector} does not select the pods {labels}")
    if by_kind["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] != deployment["metadata"]["name"]:
        found.append("the HorizontalPodAutoscaler scales another Deployment")
    if service["spec"]["ports"][0]["targetPort"] not in ports:
        found.append(f"the Service targets port {service['spec']['ports'][0]['targetPort']}, which the pod lacks")
    return found


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[o.name for o in OVERLAYS])
def test_each_overlay_renders_and_passes_the_strict_schema(overlay: Path, tmp_path: Path) -> None:
    objects = render(overlay)
    assert {o["kind"] for o in objects} == {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    rendered = tmp_path / f"{overlay.name}.yaml"
    rendered.write_text(yaml.safe_dump_all(objects))
    validate = Path(sys.executable).parent / "kubernetes-validate"
    result = subprocess.run(
        [str(validate), "--strict", "-k", KUBERNETES, str(rendered)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[o.name for o in OVERLAYS])
def test_each_overlay_fits_the_service_and_the_images_make_builds(overlay: Path) -> None:
    assert problems(render(overlay), overlay.name) == []


def test_the_cross_reference_check_catches_a_broken_probe_or_grace_period() -> None:
    objects = render(OVERLAYS[0])
    broken_probe, short_grace, other_image = (copy.deepcopy(objects) for _ in range(3))
    deployment = next(o for o in broken_probe if o["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] = "/ready"
    deployment = next(o for o in short_grace if o["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 20
    deployment = next(o for o in other_image if o["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["image"] = "cifar10-classifier:latest"
    assert any("readinessProbe asks /ready" in p for p in problems(broken_probe, OVERLAYS[0].name))
    assert any("does not outlast preStop 5 s + drain 20 s" in p for p in problems(short_grace, OVERLAYS[0].name))
    assert any("is not what make builds" in p for p in problems(other_image, OVERLAYS[0].name))


@pytest.mark.server
def test_the_probe_paths_answer_on_a_real_server(server: str) -> None:
    objects = render(OVERLAYS[0])
    container = next(o for o in objects if o["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert httpx.get(server + container[probe]["httpGet"]["path"]).status_code == 200, probe
