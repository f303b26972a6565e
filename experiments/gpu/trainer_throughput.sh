#!/usr/bin/env bash
# Issue 12, item 5 on a lent GPU (the device tool), in one call:
# 1. bench_trainer.py --platform gpu: the trainer's throughput over its isolated step's,
#    F1 at batch 128 (SB) and 4096 (+RA), ResNet-44 at batch 128 (goal: >= 0.9 at 4096).
# 2. The unscaled F1 table (five columns, seed 0) through run_gpu_f1_unscaled.sh, and
#    its wall time per column against the committed 96 + 55 + 58 + 166 s (+LR timed out).
# The Fashion-MNIST IDX files travel in .fmnist/ and missing packages as wheels in .whl/
# (see run_gpu_bench.sh).
#
#   bash experiments/gpu/trainer_throughput.sh [OUTDIR]     (default: experiments/results)
#
# Knobs: CASES, ROUNDS, STEP_SECONDS, TRAINER_STEPS, BENCH_TIMEOUT; the table's VARIANTS, RUN_TIMEOUT and
# CONFIG_OPTIONS (appended to each column's config argument); STEPS="bench table" picks
# the parts; PLATFORM=cpu rehearses the whole script on a CPU, e.g.
#   PLATFORM=cpu DATA_DIR=/usr/share/datasets/fashion-mnist CASES=f1_b128 ROUNDS=1 \
#     STEP_SECONDS=2 TRAINER_STEPS=150 CONFIG_OPTIONS=,epochs_scale=0.002 \
#     RUNS_DIR=/tmp/out/runs bash experiments/gpu/trainer_throughput.sh /tmp/out
set -uo pipefail
out=${1:-${OUT:-experiments/results}}
mkdir -p "$out"
source experiments/gpu/setup.sh
platform=${PLATFORM:-gpu}
data_dir=${DATA_DIR:-.fmnist}
steps=" ${STEPS:-bench table} "
if [[ $steps == *" bench "* ]]; then
  timeout "${BENCH_TIMEOUT:-420}" python3 -m experiments.bench.trainer_throughput --platform "$platform" \
    --cases "${CASES:-f1_b4096,f1_b128,resnet44_b128}" --rounds "${ROUNDS:-3}" \
    --step-seconds "${STEP_SECONDS:-5}" ${TRAINER_STEPS:+--steps "$TRAINER_STEPS"} --data-dir "$data_dir" \
    --out "$out/bench_trainer_$platform" 2>&1 | tee "$out/bench_trainer_$platform.log"
fi
if [[ $steps == *" table "* ]]; then
  if [ "$platform" = cpu ]; then export JAX_PLATFORMS=cpu; fi
  DATA_DIR="$data_dir" bash experiments/gpu/f1_unscaled.sh "$out/f1_unscaled_$platform"
  python3 -m experiments.bench.trainer_throughput --table-walls "$out/f1_unscaled_$platform" \
    --out "$out/f1_unscaled_walls_$platform"
fi
exit 0
