"""Monitoring (#46): the alert rules pass promtool's check and their unit tests, the PrometheusRule holds the same
rules, the dashboard is Grafana-shaped, and a real Prometheus scraping a real server answers every panel's query."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from harness.samples import cifar_samples
from harness.server import ROOT, free_port
from service.inference.metrics import observe_all

MONITORING = ROOT / "deploy" / "monitoring"
RULES = MONITORING / "rules.yaml"
COMPONENT = ROOT / "deploy" / "kubernetes" / "components" / "monitoring"
DASHBOARD = json.loads((MONITORING / "dashboard.json").read_text())
RATE_INTERVAL = "30s"  # Grafana's $__rate_interval, for a Prometheus that scrapes every second


def promtool(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed; .ci/setup installs it (apt install prometheus)")
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_rules_pass_promtool_check_and_their_unit_tests() -> None:
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0 and "SUCCESS: 12 rules found" in checked.stdout, checked.stdout + checked.stderr
    tested = promtool("test", "rules", "rules.test.yaml")
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_every_alert_has_a_unit_test_where_it_fires_and_one_where_it_does_not(tmp_path: Path) -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    alerts = {rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule}
    firing, quiet = set(), set()
    for group in yaml.safe_load((MONITORING / "rules.test.yaml").read_text())["tests"]:
        instances = {s["series"].split('instance="')[1].split('"')[0] for s in group["input_series"]}
        for case in group.get("alert_rule_test", []):
            fired = {a["exp_labels"]["instance"] for a in case.get("exp_alerts", [])}
            (firing if fired else quiet).add(case["alertname"])
            if instances - fired:  # an instance in the same data that does not fire
                quiet.add(case["alertname"])
    assert firing == alerts and quiet == alerts

    # The unit tests can fail: an alert whose threshold is moved no longer passes them.
    broken = RULES.read_text().replace("chi2_1h > 0.25", "chi2_1h > 1")
    (tmp_path / "rules.yaml").write_text(broken)
    shutil.copy(MONITORING / "rules.test.yaml", tmp_path)
    failed = promtool("test", "rules", "rules.test.yaml", cwd=tmp_path)
    assert failed.returncode != 0 and "Cifar10PredictionDrift" in failed.stdout + failed.stderr


def test_the_prometheus_rule_component_holds_the_rules_file_and_renders_with_an_overlay(tmp_path: Path) -> None:
    rule = yaml.safe_load((COMPONENT / "prometheusrule.yaml").read_text())
    assert rule["kind"] == "PrometheusRule" and rule["spec"] == yaml.safe_load(RULES.read_text())
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule["spec"]))
    assert promtool("check", "rules", str(tmp_path / "rules.yaml")).returncode == 0
    if shutil.which("kubectl") is None:
        pytest.skip("no kubectl here to render the component: install kubectl 1.27 or newer")
    overlay = ROOT / "deploy" / "kubernetes" / "overlays" / "cpu"
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {"resources": [os.path.relpath(overlay, tmp_path)], "components": [os.path.relpath(COMPONENT, tmp_path)]}
        )
    )
    rendered = subprocess.run(
        ["kubectl", "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    objects = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(rendered)}
    monitor = objects["ServiceMonitor", "cifar10-classifier"]
    service = objects["Service", "cifar10-classifier"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert ("PrometheusRule", "cifar10-classifier") in objects


def test_observing_many_values_at_once_writes_what_observing_each_writes() -> None:
    from prometheus_client import CollectorRegistry, Histogram

    values = np.random.default_rng(0).random(500)
    values[:20] = [0.2, 0.3, 0.99, 1.0, 0.0, *np.linspace(0.05, 0.95, 15)]  # on the bounds, and beside them
    one_by_one, at_once = (
        Histogram("p", "", buckets=(0.2, 0.3, 0.5, 0.9, 0.99), registry=CollectorRegistry()) for _ in range(2)
    )
    for value in values:
        one_by_one.observe(value)
    observe_all(at_once, values)

    def samples(histogram: Histogram) -> dict:
        return {(s.name, s.labels.get("le")): s.value for s in histogram.collect()[0].samples if s.name != "p_created"}

    expected, got = samples(one_by_one), samples(at_once)
    assert got.pop(("p_sum", None)) == pytest.approx(expected.pop(("p_sum", None)))  # added in another order
    assert got == expected and expected["p_count", None] == 500


def test_the_dashboard_is_grafana_shaped() -> None:
    assert {"title", "uid", "schemaVersion", "panels", "templating"} <= DASHBOARD.keys()
    [variable] = DASHBOARD["templating"]["list"]
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
    ids = [panel["id"] for panel in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    for panel in DASHBOARD["panels"]:
        grid = panel["gridPos"]
        assert panel["type"] == "timeseries" and panel["title"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs)) and all(target["expr"] for target in panel["targets"])
    titles = " ".join(panel["title"].lower() for panel in DASHBOARD["panels"])
    for subject in ("requests", "latency", "per model call", "errors", "class", "confidence", "none of the classes"):
        assert subject in titles, subject
    assert "workers" in titles and "abandoned" in titles


@pytest.fixture(scope="module")
def prometheus(server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus that scrapes `server` every second and evaluates the rules every second."""
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed; .ci/setup installs it (apt install prometheus)")
    folder = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "cifar10", "static_configs": [{"targets": [server.removeprefix("http://")]}]}],
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=(folder / "prometheus.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and process.poll() is None, (folder / "prometheus.log").read_text()
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def query(prometheus: str, expr: str) -> list[dict]:
    answer = httpx.get(prometheus + "/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", (expr, answer)
    return answer["data"]["result"]


def predicted(server: str) -> Counter:
    """lenet's cifar10_predicted_class_total by class, as the server's /metrics says now."""
    counts: Counter = Counter()
    for line in httpx.get(server + "/metrics").text.splitlines():
        if line.startswith("cifar10_predicted_class_total{") and 'model="lenet"' in line:
            label = line.split('class="')[1].split('"')[0]
            counts[label] += float(line.rsplit(" ", 1)[1])
    return counts


@pytest.mark.server
@pytest.mark.timeout(240)
def test_a_real_prometheus_answers_every_panel_from_a_real_server(server: str, prometheus: str) -> None:
    metrics = httpx.get(server + "/metrics").text
    for series in (  # created at 0 when the server starts, not with their first event
        'cifar10_abandoned_requests_total{stage="reading"}',
        'cifar10_http_requests_total{endpoint="/classify",status="503"}',
        'cifar10_abandoned_images_total{model="lenet",outcome="skipped"}',
        'cifar10_predicted_class_total{class="frog",model="resnet18"}',
    ):
        assert series in metrics, series

    deadline = time.monotonic() + 60  # Prometheus's first scrape, so that it sees the load as an increase
    while not query(prometheus, "cifar10_predicted_class_total"):
        assert time.monotonic() < deadline, "Prometheus scraped nothing within 60 s"
        time.sleep(0.5)
    before = predicted(server)
    labels: Counter = Counter()
    images = [data for _, data in cifar_samples(per_class=4)]
    with httpx.Client(base_url=server, timeout=30) as http:
        for image in images:  # bounded: 40 images each, then a few bad requests
            answer = http.post("/classify", files={"image": image}, data={"model": "lenet"}).json()
            labels[answer["predictions"][0]["label"]] += 1
            http.post("/classify", files={"image": image}, data={"model": "resnet18"})
        for _ in range(3):
            assert http.post("/classify", files={"image": b"not an image"}).status_code == 415
    assert predicted(server) - before == labels  # one count per answer, under the class it answered

    deadline = time.monotonic() + 60  # until Prometheus has scraped the load and evaluated the rules on it
    while not query(prometheus, f"increase(cifar10_predicted_class_total[{RATE_INTERVAL}]) > 0") or not query(
        prometheus, "cifar10:prediction_drift:chi2_1h"
    ):
        assert time.monotonic() < deadline, "Prometheus saw no load or evaluated no drift within 60 s"
        time.sleep(1)
    rules = httpx.get(prometheus + "/api/v1/rules").json()["data"]["groups"]
    assert all(rule["health"] == "ok" for group in rules for rule in group["rules"]), rules
    empty = [
        (panel["title"], target["expr"])
        for panel in DASHBOARD["panels"]
        for target in panel["targets"]
        if not query(prometheus, target["expr"].replace("$__rate_interval", RATE_INTERVAL))
    ]
    assert empty == []
