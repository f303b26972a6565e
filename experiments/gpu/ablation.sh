#!/usr/bin/env bash
# The headline table unscaled on one accelerator, through the ablation driver
# (python -m experiments.paper.ablation --plan gpu, the same code as the CPU sweep):
#   1. F1 on Fashion-MNIST under the authors' protocol: SB, LB, +LR, +GBN, +RA, seed 0,
#      then seeds 1 and 2 (the CPU runs' own commands);
#   2. ResNet-44 on Fashion-MNIST framed to 32x32 with the authors' CIFAR ResNet settings
#      (batch 2048, 100 epochs, ghost 256): LB, +LR, +GBN, seed 0.
# Each finished run's record (ablation_f1/runs/*.json) and the rebuilt tables land in
# OUTDIR as they finish; a run stopped midway resumes from its checkpoints when the
# script runs again (workdirs under OUTDIR/runs).
#
#   bash experiments/gpu/ablation.sh OUTDIR [--wheels DIR] [--data DIR]
set -uo pipefail
extras=train,research
source "$(dirname "$0")/setup.sh"
python3 -m experiments.paper.ablation --plan gpu --results_dir "$out" --runs_dir "$out/runs" \
  ${data:+--data_dir "$data"} 2>&1 | tr '\r' '\n' | sed '/img\/s/d' | tee "$out/driver.log"
# The tables of whatever finished (the driver rebuilds them after each run).
python3 -m experiments.paper.ablation --report_only --results_dir "$out" > /dev/null
