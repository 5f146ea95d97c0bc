"""Two served models side by side in one server: /classify requests/s and latency at 32 clients, alternating.

    python -m bench.served_pair resnet18 whitenet [--rounds 3] [--requests 960]

Both names are served by one `bentoml serve` (each the copy that answers on this host: int8 where it passes its
self-check), so the machine, the HTTP path and the batcher are the same; every round measures both, one right
after the other, and the table gives medians and the second's ratio to the first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import httpx

from bench.hey import multipart, run_load
from bench.report import machine, machine_line, table, write_json
from harness.samples import cifar_samples
from harness.server import Server, register_shipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first")
    parser.add_argument("second")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=960, help="per model and round")
    parser.add_argument("--clients", type=int, default=32)
    args = parser.parse_args()
    names = (args.first, args.second)
    _, image = cifar_samples(1)[3]
    bodies = {name: multipart([("image", "x.jpg", image), ("model", "", name.encode())]) for name in names}
    runs: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as home:
        register_shipped({**os.environ, "BENTOML_HOME": home})
        with Server(Path(home), models=",".join(names)) as server:
            served = httpx.get(f"{server.url}/models").json()["models"]
            for name in names:
                run_load(f"{server.url}/classify", *bodies[name], args.clients, 320)  # warm-up
            for _ in range(args.rounds):
                for name in names:
                    runs[name].append(run_load(f"{server.url}/classify", *bodies[name], args.clients, args.requests))
    rows = []
    for name in names:
        results = runs[name]
        rows.append(
            {
                "model": f"{name} ({served[name]['precision']})",
                "req/s": statistics.median(r["requests_per_s"] for r in results),
                "p50 ms": statistics.median(r["p50_ms"] for r in results),
                "p99 ms": statistics.median(r["p99_ms"] for r in results),
                "non-200": sum(sum(r["errors"].values()) for r in results),
            }
        )
    rows[1]["ratio"] = rows[1]["req/s"] / rows[0]["req/s"]
    rows[0]["ratio"] = 1.0
    info = machine()
    print(machine_line(info) + f"; {args.clients} clients, {args.rounds} rounds of {args.requests} requests")
    print(table(rows, list(rows[0])))
    write_json(f"served-{args.first}-{args.second}.json", {"rows": rows, "rounds": args.rounds}, info)


if __name__ == "__main__":
    main()
