"""Print the CPU image's bentofile: the project's bentofile.yaml with the CPU onnxruntime wheel in place of
onnxruntime-gpu and its CUDA and cuDNN wheels (1.6 GB of the GPU image), under its own bento name."""

import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]

bentofile = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
bentofile["name"] += "-cpu"
packages = bentofile["python"]["packages"]
gpu = next(p for p in packages if p.startswith("onnxruntime-gpu"))
packages[packages.index(gpu)] = re.sub(r"^onnxruntime-gpu(\[[^]]*\])?", "onnxruntime", gpu)
bentofile["envs"] = [{"name": "CIFAR10_PROVIDERS", "value": "cpu"}]
yaml.safe_dump(bentofile, sys.stdout, sort_keys=False)
