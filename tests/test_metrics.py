"""/metrics as an operator scrapes it, from real `bentoml serve` processes: each server counts only its own
requests, whatever else runs on the host."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.server import Server, register_shipped

pytestmark = pytest.mark.server


def answered(url: str) -> float:
    """The server's count of /classify requests answered 200."""
    families = text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
    return sum(
        sample.value
        for family in families
        if family.name == "cifar10_http_requests"
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels == {"endpoint": "/classify", "status": "200"}
    )


def classify(url: str, image: bytes, times: int) -> None:
    for _ in range(times):
        assert httpx.post(f"{url}/classify", files={"image": ("x.jpg", image)}).status_code == 200


def test_two_servers_of_one_home_each_count_only_their_own_requests(tmp_path: Path, samples) -> None:
    home = tmp_path / "home"
    register_shipped({**os.environ, "BENTOML_HOME": str(home)})
    image = samples[0][1]
    with Server(home, models="lenet", workers="2") as first:
        classify(first.url, image, 5)
        assert answered(first.url) == 5
        with Server(home, models="lenet", workers="1") as second:  # its start once emptied the first one's folder
            classify(second.url, image, 3)
            classify(first.url, image, 2)
            assert (answered(first.url), answered(second.url)) == (7, 3)
        classify(first.url, image, 1)
        assert answered(first.url) == 8
