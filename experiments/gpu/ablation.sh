#!/usr/bin/env bash
# Issue 11's runs for one lent GPU session (the device tool), through the ablation
# driver (experiments/paper/ablation.py --plan gpu, the same code as the CPU sweep):
#   1. the headline table unscaled, F1 on Fashion-MNIST under the authors' protocol:
#      SB, LB, +LR, +GBN, +RA, seed 0, then seeds 1 and 2 (the CPU runs' own commands);
#   2. ResNet-44 on Fashion-MNIST framed to 32x32, the authors' CIFAR ResNet settings
#      (batch 2048, 100 epochs, ghost 256): LB, +LR, +GBN, seed 0.
# Each finished run's JSON and the rebuilt tables land in OUTDIR as they finish, so a
# session that runs out of time keeps every run it completed. The IDX files travel in
# .fmnist/ and the Python packages the device lacks as wheels in .whl/
# (experiments/gpu/setup.sh).
#
#   bash experiments/gpu/ablation.sh [OUTDIR]    (default: $OUT, else /tmp/gpu_ablation)
#   TIME_LIMIT=540 (seconds for the whole plan; the run going at the limit is lost)
set -uo pipefail
out=${1:-${OUT:-/tmp/gpu_ablation}}
mkdir -p "$out"
source experiments/gpu/setup.sh
data_dir=${DATA_DIR:-.fmnist}
[ -d "$data_dir" ] || data_dir=""  # none carried: the trainer's own search (Debian's files)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/device.txt" 2>&1
timeout "${TIME_LIMIT:-540}" python3 -m experiments.paper.ablation --plan gpu \
  --results_dir "$out" --runs_dir "${RUNS_DIR:-/tmp/gpu_runs}" ${data_dir:+--data_dir "$data_dir"} \
  2>&1 | tr '\r' '\n' | grep -v "img/s" | tee "$out/driver.log"
# The tables of whatever finished (the driver rebuilds them after each run).
python3 -m experiments.paper.ablation --report_only --results_dir "$out" > /dev/null 2>&1
exit 0
