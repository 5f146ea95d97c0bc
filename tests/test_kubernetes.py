"""The Kubernetes manifests (deploy/kubernetes): every overlay renders (`kubectl kustomize`, no cluster needed),
each object passes kubernetes-validate --strict, and the cross-references a schema cannot see hold."""

from __future__ import annotations

import copy
import gzip
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from harness.samples import ROOT
from service.http.keys import KeySet, parse
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
    for port in service["spec"]["ports"]:
        if port["targetPort"] not in ports:
            found.append(f"the Service targets port {port['targetPort']}, which the pod lacks")
    if str(ports.get("grpc")) != env.get("CIFAR10_GRPC_PORT", str(Settings().grpc_port)):
        found.append(f"container port grpc {ports.get('grpc')} is not CIFAR10_GRPC_PORT {env.get('CIFAR10_GRPC_PORT')}")
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


KEYS = ROOT / "deploy" / "kubernetes" / "components" / "api-keys"
KSERVE = ROOT / "deploy" / "kubernetes" / "kserve"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[o.name for o in OVERLAYS])
def test_each_overlay_mounts_the_api_keys_secret_the_example_shows(overlay: Path, tmp_path: Path) -> None:
    deployment = next(o for o in render(overlay) if o["kind"] == "Deployment")["spec"]["template"]["spec"]
    container = deployment["containers"][0]
    keys_file = Path(next(e["value"] for e in container["env"] if e["name"] == "CIFAR10_API_KEYS_FILE"))
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(keys_file.parent))
    volume = next(v for v in deployment["volumes"] if v["name"] == mount["name"])
    example = yaml.safe_load((KEYS / "api-keys.example.yaml").read_text())
    assert volume["secret"]["secretName"] == example["metadata"]["name"] and mount["readOnly"]
    assert keys_file.name in example["stringData"]  # the Secret's key is the file the service reads
    assert parse(example["stringData"][keys_file.name]) == KeySet((), ())  # no real key in the example
    (tmp_path / "secret.yaml").write_text(yaml.safe_dump(example))
    validate = Path(sys.executable).parent / "kubernetes-validate"
    result = subprocess.run(
        [str(validate), "--strict", "-k", KUBERNETES, str(tmp_path / "secret.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def strict(schema: dict) -> dict:
    """A CRD's schema made strict as `kubectl --validate=strict` is: no field it does not declare."""
    schema = dict(schema)
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        schema["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        schema.setdefault("additionalProperties", False)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            schema[key] = strict(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            schema[key] = [strict(s) for s in schema[key]]
    return schema


PROBES = ("readinessProbe", "livenessProbe")


def kserve_problems(runtime: dict, service: dict) -> list[str]:
    """What KServe's schemas cannot check: the protocol, the runtime and format named, port, image, probes."""
    found = []
    container = runtime["spec"]["containers"][0]
    model = service["spec"]["predictor"]["model"]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    if "v2" not in runtime["spec"].get("protocolVersions", []) or model.get("protocolVersion") != "v2":
        found.append("the runtime and the InferenceService must both say protocol v2")
    if model.get("runtime") != runtime["metadata"]["name"]:
        found.append(f"the InferenceService names runtime {model.get('runtime')}, not {runtime['metadata']['name']}")
    if model["modelFormat"]["name"] not in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}:
        found.append(f"the runtime does not support model format {model['modelFormat']['name']}")
    if str(container["ports"][0]["containerPort"]) != env.get("BENTOML_PORT"):
        found.append(f"port {container['ports'][0]['containerPort']} is not BENTOML_PORT {env.get('BENTOML_PORT')}")
    if container["image"] != makefile_images()["CPU"]:
        found.append(f"image {container['image']} is not what make image-cpu builds")
    for probe, path in (("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live")):
        if container.get(probe, {}).get("httpGet", {}).get("path") != path:
            found.append(f"{probe} does not ask {path}")
    canary = service["spec"]["predictor"].get("canaryTrafficPercent")
    if canary is not None and not 0 < canary < 100:
        found.append(f"canaryTrafficPercent {canary} sends the new revision all traffic or none; a canary is 1-99")
    return found


def test_the_kserve_runtime_and_inference_service_pass_kserves_schemas_and_fit_the_service() -> None:
    import jsonschema

    schemas = json.loads(gzip.decompress((ROOT / "tests" / "schemas" / "kserve-crds.json.gz").read_bytes()))
    # One validator per kind: jsonschema.validate checks the (large) schema itself again on every call.
    validators = {
        kind: jsonschema.validators.validator_for(schemas[kind])(strict(schemas[kind]))
        for kind in ("ServingRuntime", "InferenceService")
    }
    runtime = yaml.safe_load((KSERVE / "servingruntime.yaml").read_text())
    service = yaml.safe_load((KSERVE / "inferenceservice.yaml").read_text())
    grpc_runtime = yaml.safe_load((KSERVE / "servingruntime-grpc.yaml").read_text())
    for manifest in (runtime, service, grpc_runtime):
        validators[manifest["kind"]].validate(manifest)
    assert kserve_problems(runtime, service) == []
    # The gRPC runtime: KServe's h2c port is the service's CIFAR10_GRPC_PORT, and its probes ask gRPC health there.
    container = grpc_runtime["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert grpc_runtime["spec"]["protocolVersions"] == ["grpc-v2"]
    assert container["ports"][0]["name"] == "h2c"
    assert str(container["ports"][0]["containerPort"]) == env["CIFAR10_GRPC_PORT"]
    assert all(container[probe]["grpc"]["port"] == container["ports"][0]["containerPort"] for probe in PROBES)
    assert container["image"] == runtime["spec"]["containers"][0]["image"]
    typo = copy.deepcopy(runtime)
    typo["spec"]["protocolVersion"] = ["v2"]  # not a field: the strict schema says so
    with pytest.raises(jsonschema.ValidationError):
        validators["ServingRuntime"].validate(typo)
    other = copy.deepcopy(service)
    other["spec"]["predictor"]["model"]["runtime"] = "triton"
    assert any("names runtime triton" in p for p in kserve_problems(runtime, other))
    other["spec"]["predictor"]["canaryTrafficPercent"] = "10%"  # KServe's is an integer share
    with pytest.raises(jsonschema.ValidationError):
        validators["InferenceService"].validate(other)
    other["spec"]["predictor"]["canaryTrafficPercent"] = 100
    assert any("a canary is 1-99" in p for p in kserve_problems(runtime, other))


@pytest.mark.server
def test_the_kserve_probe_paths_answer_on_a_real_server(server: str) -> None:
    container = yaml.safe_load((KSERVE / "servingruntime.yaml").read_text())["spec"]["containers"][0]
    for probe in ("readinessProbe", "livenessProbe"):
        assert httpx.get(server + container[probe]["httpGet"]["path"]).status_code == 200, probe


RAYJOB = ROOT / "deploy" / "kubernetes" / "ray" / "rayjob.yaml"


def rayjob_problems(job: dict) -> list[str]:
    """What KubeRay's schema cannot check: the entrypoint is a `cifar10 predict --ray` that parses, on the cluster
    it runs in; Ray's version is the [ray] extra's; every pod runs the image ray.Containerfile builds."""
    from cli.main import build_parser

    found = []
    command = shlex.split(job["spec"]["entrypoint"])
    try:
        args = build_parser().parse_args(command[1:])
    except SystemExit:
        return [f"cifar10 cannot parse the entrypoint {job['spec']['entrypoint']!r}"]
    if command[0] != "cifar10" or not args.ray or args.address != "auto":
        found.append("the entrypoint must be cifar10 predict --ray --address auto (the cluster the job runs in)")
    pinned = re.search(r'"ray\[data\]==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    cluster = job["spec"]["rayClusterSpec"]
    if cluster["rayVersion"] != pinned:
        found.append(f"rayVersion {cluster['rayVersion']} is not the [ray] extra's {pinned}")
    built = re.search(r"-t (\S+) \.", (ROOT / "deploy" / "container" / "ray.Containerfile").read_text()).group(1)
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for container in (c for g in groups for c in g["template"]["spec"]["containers"]):
        if container["image"] != built:
            found.append(f"{container['name']} runs {container['image']}, not {built} (ray.Containerfile)")
    return found


def test_the_rayjob_passes_kuberays_schema_and_runs_a_predict_that_parses() -> None:
    import jsonschema

    schema = strict(
        json.loads(gzip.decompress((ROOT / "tests" / "schemas" / "kuberay-rayjob-crd.json.gz").read_bytes()))["RayJob"]
    )
    validator = jsonschema.validators.validator_for(schema)(schema)  # the schema checked once, not per call
    job = yaml.safe_load(RAYJOB.read_text())
    validator.validate(job)
    assert rayjob_problems(job) == []
    typo = copy.deepcopy(job)
    typo["spec"]["shutdownAfterJobFinish"] = True  # not a field: the strict schema says so
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(typo)
    wrong = copy.deepcopy(job)
    wrong["spec"]["entrypoint"] = "cifar10 predict s3://b/images/ --ray --top-k 11"
    assert any("cannot parse" in p for p in rayjob_problems(wrong))
