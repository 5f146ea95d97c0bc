#!/usr/bin/env bash
# One GPU lease, call by call (../shared/gpu-host/README.md): train ResNet-18 in the background while the serving
# set is staged, then measure serving once training is done. Run from the project root on the GPU host:
#   bash bench/gpu_lease.sh train SECONDS   carry .gpu/train .gpu/pre .gpu/test  (training images, simplejpeg, test zip)
#   bash bench/gpu_lease.sh stage pK [install]  carry .gpu/bundle/pK             (each part; with the last: install)
#   bash bench/gpu_lease.sh finish MODE SECONDS  carry models/pretrained/resnet18.onnx (MODE: quick or full)
# What comes back lies in $OUT: the checkpoint in 15 MiB pieces (cat best.pt.* > best.pt), run.tar (the run's
# log, metrics and curves), gpu.log, choices.log and results.tar (BENCHMARKS.md and the JSON results).
set -euo pipefail
phase=$1
root=$PWD
logs=/tmp/lease
mkdir -p "$logs" /tmp/data

case $phase in
train)
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  cp .gpu/train/cifar10-train.zip .gpu/test/cifar10-test.zip /tmp/data/
  python3 -m pip install -q --no-index --no-deps --target /tmp/pre .gpu/pre/*.whl
  # setsid: the run outlives this call (the host keeps it while the lease is held).
  PYTHONPATH=/tmp/pre:$root CIFAR10_CACHE=/tmp/cache PYTHONUNBUFFERED=1 setsid nohup python3 -m bench.gpu_train \
    --data /tmp/data/cifar10-train.zip --out /tmp/run --seconds "$2" >"$logs/train.log" 2>&1 </dev/null &
  for _ in $(seq 120); do grep -q "^chose\|Error\|error" "$logs/train.log" && break; sleep 1; done
  cat "$logs/train.log"
  ;;
stage)
  bash ".gpu/bundle/$2/stage.sh"
  if [ "${3:-}" = install ]; then
    # install.sh's last check fails on opentelemetry (a namespace package: no __file__ to compare) after everything
    # is installed, and the service module cannot be imported before models are registered: check the provider here.
    VERIFY_IMPORTS=core.runtime VERIFY_MODEL=models/pretrained/lenet.onnx bash /tmp/stage/p1/install.sh 2>&1 |
      tail -15 || true
    PYTHONPATH=/tmp/site python3 -c "import onnxruntime as o; print(o.__file__, o.get_available_providers())"
  fi
  tail -2 "$logs/train.log"
  ;;
finish)
  # $3: the seconds this call may take; every step ends inside them, and what is done is in $OUT at once.
  stop=$(($(date +%s) + $3 - 20))
  left() { echo $((stop - $(date +%s))); }
  while pgrep -f bench.gpu_train >/dev/null && [ "$(left)" -gt 240 ]; do sleep 1; done
  pkill -f bench.gpu_train || true
  tail -4 "$logs/train.log"
  split -b 15M /tmp/run/best.pt "$OUT/best.pt." || echo "no best.pt: training failed (run.tar has its log)"
  tar -cf "$OUT/run.tar" -C /tmp/run metrics.jsonl summary.json curves.png -C "$logs" train.log || true
  export PYTHONPATH=/tmp/site:$root PATH=/tmp/site/bin:$PATH CIFAR10_TEST_ZIP=/tmp/data/cifar10-test.zip
  export PYTHONUNBUFFERED=1
  quick=$([ "$2" = quick ] && echo --quick || true)
  timeout "$(($(left) * 2 / 3))" python3 -m bench.gpu $quick >"$OUT/gpu.log" 2>&1 || echo "bench.gpu: exit $?"
  grep -v "^\s*$" "$OUT/gpu.log" | tail -25
  timeout "$(left)" python3 -m bench.gpu_choices --requests "$([ "$2" = quick ] && echo 1000 || echo 4000)" \
    >"$OUT/choices.log" 2>&1 || echo "bench.gpu_choices: exit $?"
  tail -20 "$OUT/choices.log"
  tar -cf "$OUT/results.tar" BENCHMARKS.md bench/results/gpu-summary.json bench/results/gpu-choices.json || true
  ;;
*)
  echo "unknown phase $phase: use train, stage or finish" >&2
  exit 2
  ;;
esac
