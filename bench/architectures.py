"""The networks side by side: docs/architectures.md and docs/architectures.png.

    python -m bench.architectures [--quick]

For each network in models/: parameters, multiply-accumulates per image, ONNX file size, raw ONNX Runtime
images/s at batch 1 and 64 (fp32; int8 where a shipped int8 copy passes its checks), `/classify` requests/s
at 32 clients from one server serving them all, and test accuracy where a trained model is shipped. Networks
without a trained model are exported from their initial weights: speed and size do not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench import runtime
from bench.hey import multipart, run_load
from bench.report import ROOT, machine, machine_line, table
from core.runtime import OnnxModel
from core.selfcheck import self_check
from core.store import shipped_file
from harness.samples import cifar_samples
from harness.server import Server
from models import ARCHS, get_model
from models.size import multiply_accumulates, parameters
from training.export import export
from training.train import RECIPES

DOCS = ROOT / "docs"


def onnx_file(arch: str, folder: Path) -> tuple[Path, bool]:
    """The shipped ONNX file, or one exported from the network's initial weights; and whether it is trained."""
    if shipped_file(arch).is_file():
        return shipped_file(arch), True
    torch.manual_seed(0)
    checkpoint = folder / f"{arch}.pt"
    torch.save({"model": get_model(arch).state_dict(), "config": {"arch": arch}, "epoch": 0}, checkpoint)
    return export(checkpoint, folder / f"{arch}.onnx"), False


def raw(path: Path, seconds: float) -> dict[int, float]:
    model = OnnxModel(path, providers="cpu", threads=os.cpu_count() or 1)
    return {batch: runtime.measure(model, batch, seconds)["images_per_s"] for batch in (1, 64)}


def served(files: dict[str, Path], home: Path, quick: bool) -> dict[str, float]:
    """/classify requests/s at 32 clients for each network, from one server serving them all (fp32)."""
    script = "import sys\nfrom core.store import register\nfor f in sys.argv[1:]:\n    register(f)\n"
    env = {**os.environ, "BENTOML_HOME": str(home)}
    subprocess.run([sys.executable, "-c", script, *map(str, files.values())], env=env, cwd=ROOT, check=True)
    os.environ["BENTOML_HOME"] = str(home)
    _, image = cifar_samples(1)[3]
    rates = {}
    with Server(home, models=",".join(files), precision="fp32") as server:
        for arch in files:
            body, ctype = multipart([("image", "x.jpg", image), ("model", "", arch.encode())])
            requests = (300 if quick else 1500) if arch != "lenet" else (1500 if quick else 6000)
            rates[arch] = run_load(f"{server.url}/classify", body, ctype, 32, requests)["requests_per_s"]
            print(f"served {arch}: {rates[arch]:,.0f} requests/s", flush=True)
    return rates


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        ax.scatter(row["parameters"], row["raw_b64"], s=30 + row["macs_m"] / 4, alpha=0.7)
        accuracy = f", {row['test_accuracy']:.1%}" if row["test_accuracy"] else ""
        ax.annotate(
            f"{row['arch']}{accuracy}",
            (row["parameters"], row["raw_b64"]),
            textcoords="offset points",
            xytext=(6, 4),
            fontsize=9,
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="parameters",
        ylabel="raw ONNX Runtime images/s (fp32, batch 64)",
        title="CIFAR-10 networks: size against speed (marker area: multiply-accumulates)",
    )
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter timings and loads")
    args = parser.parse_args()
    info = machine()
    seconds = 1.0 if args.quick else 3.0
    rows = []
    with tempfile.TemporaryDirectory() as work:
        files, trained = {}, {}
        for arch in ARCHS:
            files[arch], trained[arch] = onnx_file(arch, Path(work))
        rates = served(files, Path(work) / "home", args.quick)
        for arch in ARCHS:
            model = get_model(arch).eval()
            fp32 = raw(files[arch], seconds)
            int8_file = shipped_file(f"{arch}-int8")
            int8 = raw(int8_file, seconds) if int8_file.is_file() and self_check(OnnxModel(int8_file)).passed else {}
            accuracy = OnnxModel(files[arch], providers="cpu").info.test_accuracy if trained[arch] else None
            rows.append(
                {
                    "arch": arch,
                    "parameters": parameters(model),
                    "macs_m": multiply_accumulates(model) / 1e6,
                    "onnx_mb": files[arch].stat().st_size / 1e6,
                    "raw_b1": fp32[1],
                    "raw_b64": fp32[64],
                    "int8_b1": int8.get(1),
                    "int8_b64": int8.get(64),
                    "served_c32": rates[arch],
                    "test_accuracy": accuracy,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    DOCS.mkdir(exist_ok=True)
    chart(rows, DOCS / "architectures.png")
    (DOCS / "architectures.md").write_text(document(rows, info))
    print(f"wrote {DOCS / 'architectures.md'} and {DOCS / 'architectures.png'}")


def document(rows: list[dict], info: dict) -> str:
    def cell(value: float | None, form: str) -> str:
        return "—" if value is None else format(value, form)

    shown = [
        {
            "network": row["arch"],
            "parameters": f"{row['parameters']:,}",
            "MMACs / image": f"{row['macs_m']:,.1f}",
            "ONNX MB": f"{row['onnx_mb']:.1f}",
            "raw b1 img/s": f"{row['raw_b1']:,.0f}",
            "raw b64 img/s": f"{row['raw_b64']:,.0f}",
            "int8 raw b1 / b64": "—" if row["int8_b1"] is None else f"{row['int8_b1']:,.0f} / {row['int8_b64']:,.0f}",
            "/classify req/s, 32 clients": f"{row['served_c32']:,.0f}",
            "test accuracy": cell(row["test_accuracy"], ".2%"),
            "train it": f"`cifar10 train --arch {row['arch']} --data cifar10.zip --out runs/{row['arch']}`",
        }
        for row in rows
    ]
    recipes = ", ".join(f"{arch} lr {recipe['lr']:g}" for arch, recipe in RECIPES.items())
    return f"""# The networks side by side

Written by `python -m bench.architectures` (the chart too). {machine_line(info)}; ONNX Runtime
{info["onnxruntime"]} on the CPU provider, one session on every core, random inputs; the service with
`CIFAR10_MODELS` naming all six, fp32, measured with `hey` at 32 clients, one CIFAR-10 JPEG per request.
Test accuracy is on the 10,000 test images, for the networks whose trained model is shipped; the others
were measured from their initial weights (size and speed do not depend on them) and have no accuracy
yet. int8: only where a shipped int8 copy exists and passes its self-check here (LeNet's agreed with fp32
on 98.70% of held-out images, below the 99% required).

{table(shown, list(shown[0]))}

Each is trained by the same recipe (`training/train.py`: Nesterov SGD, warm-up then linear decay, weight
decay 5e-4, label smoothing 0.1, random crop and flip), 60 epochs of 128 images, with its own peak
learning rate ({recipes}); `cifar10 export`, `cifar10 quantize` and `cifar10 register` then take it to the
service, served with `CIFAR10_MODELS=resnet18,lenet,{rows[1]["arch"]}`. The networks are sized for 32x32
images: `models/alexnet.py` (3x3 kernels, three pools), `models/vgg.py` (VGG-11 and VGG-16 with
BatchNorm, one linear layer), `models/googlenet.py` (the paper's nine Inception blocks with BatchNorm,
run at 16x16, 8x8 and 4x4, no auxiliary classifiers), `models/resnet.py` (the CIFAR stem).

![parameters against raw images/s, marker area multiply-accumulates](architectures.png)
"""


if __name__ == "__main__":
    main()
