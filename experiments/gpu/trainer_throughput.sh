#!/usr/bin/env bash
# The trainer against its isolated step on one accelerator, and the unscaled F1 table:
# 1. python -m experiments.bench.trainer_throughput: the trainer's throughput over its
#    isolated step's, F1 at batch 128 (SB) and 4096 (+RA), ResNet-44 at batch 128;
#    writes OUTDIR/bench_trainer_<platform>.{json,md,log};
# 2. the unscaled F1 table (five columns, seed 0) through f1_unscaled.sh into
#    OUTDIR/f1_unscaled_<platform>/, and its wall time per column against the committed
#    runs (experiments/results/f1_unscaled_gpu) in OUTDIR/f1_unscaled_walls_<platform>.*.
#
#   bash experiments/gpu/trainer_throughput.sh OUTDIR [--wheels DIR] [--data DIR]
#        [--platform gpu|cpu] [--quick]
# --platform cpu --quick rehearses the whole script on a CPU in minutes.
set -uo pipefail
extras=train,research
source "$(dirname "$0")/setup.sh"
sizes=(--cases f1_b4096,f1_b128,resnet44_b128 --rounds 3 --step-seconds 5)
[ -n "$quick" ] && sizes=(--cases f1_b128 --rounds 1 --step-seconds 2 --steps 150)
[ "$platform" = cpu ] && export JAX_PLATFORMS=cpu
python3 -m experiments.bench.trainer_throughput --platform "$platform" "${sizes[@]}" \
  ${data:+--data-dir "$data"} --out "$out/bench_trainer_$platform" 2>&1 \
  | tee "$out/bench_trainer_$platform.log"
bash experiments/gpu/f1_unscaled.sh "$out/f1_unscaled_$platform" ${wheels:+--wheels "$wheels"} \
  ${data:+--data "$data"} ${quick:+--quick}
python3 -m experiments.bench.trainer_throughput --table-walls "$out/f1_unscaled_$platform" \
  --out "$out/f1_unscaled_walls_$platform"
