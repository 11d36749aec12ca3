#!/usr/bin/env bash
# The GPU checks in one call, for the lent GPU machine (device tool; stage the packages first with
# bash tools/device_pkgs.sh and carry [".device_pkgs"]):
#   1. the GPU-marked tests,
#   2. the training-throughput benchmark on CUDA (issue #4's table: images/s, step-time split, peak
#      memory, share of the bf16 peak, cached vs online teacher), ViT-B/32 -> w384/d6, random weights.
# Results go to $OUT (the device tool brings that folder back) or to ./gpu_out when OUT is unset.
# Uses the machine's own python3 (torch is there); nothing is installed.
#
#   bash tools/gpu_check.sh [steps] [batch_size]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
mkdir -p "$out"
device=${DEVICE:-cuda}
steps=${1:-60}
bs=${2:-256}
export PYTHONPATH="$PWD/.device_pkgs:$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
{
    echo "== environment"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
    $py -c "import sys, torch, open_clip, hydra; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'open_clip', open_clip.__version__, 'hydra', hydra.__version__)"
} 2>&1 | tee "$out/environment.txt"
rc=0
echo "== GPU tests"
$py -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$out/gpu_tests.txt" || rc=1
echo "== training throughput (device $device, $steps steps, batch $bs)"
$py benchmarks/bench_train_throughput.py --device "$device" --steps "$steps" --batch-size "$bs" \
    --out "$out/train_throughput.md" 2>&1 | tail -n 40 | tee "$out/train_throughput.log" || rc=1
exit $rc
