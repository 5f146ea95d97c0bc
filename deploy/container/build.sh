#!/usr/bin/env bash
# Build the service's container image from a bento: `gpu` (the project's bentofile: onnxruntime-gpu with
# CUDA 13 and cuDNN 9 from pip; also runs on CPU hosts) or `cpu` (the CPU onnxruntime wheel only).
# Uses docker when there is one, else podman. Prints the tag and the size last.
set -euo pipefail
kind=$1 tag=$2
cd "$(dirname "$0")/../.."
engine=none
if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
  engine=docker  # a client alone, without a running engine, does not count
elif command -v podman >/dev/null; then
  engine=podman
else
  echo "make image needs a running docker engine or podman; neither is here" >&2
  exit 2
fi
bentofile=bentofile.yaml
# The bento holds the copies its image may serve (service/service.py): fp32 for GPUs; for CPUs the int8 copy,
# which answers where its self-check passes, and fp32, which answers where it does not.
export CIFAR10_PRECISION=fp32
if [ "$kind" = cpu ]; then
  export CIFAR10_PRECISION=auto CIFAR10_PROVIDERS=cpu
  bentofile=$(mktemp --tmpdir=. .bentofile-cpu.XXXXXX.yaml)
  trap 'rm -f "$bentofile"' EXIT
  .venv/bin/python deploy/container/cpu_bentofile.py > "$bentofile"
fi
bento=$(.venv/bin/bentoml build -f "$bentofile" --output tag | sed -n 's/^__tag__://p')
if [ "$engine" = podman ]; then
  bash deploy/container/local-base.sh
fi
.venv/bin/bentoml containerize "$bento" --backend "$engine" --image-tag "$tag" >&2
size=$($engine image inspect "$tag" --format '{{.Size}}')
echo "$tag: $((size / 1000000)) MB (from bento $bento)"
