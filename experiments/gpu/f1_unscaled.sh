#!/usr/bin/env bash
# The paper's F1 protocol unscaled (|B_S| = 128, |B_L| = 4096, the full 50-epoch regime;
# +RA 1,600 epochs) on Fashion-MNIST, seed 0, one run per column. Each run's
# summary.json lands in OUTDIR as <column>.json, its log as <column>.log; a run whose
# workdir (OUTDIR/runs/<column>) exists is resumed.
#
#   bash experiments/gpu/f1_unscaled.sh OUTDIR [--wheels DIR] [--data DIR] [--quick]
# --quick: SB and +GBN at 1/100 of the epochs (a check of the script, minutes).
set -uo pipefail
extras=train
source "$(dirname "$0")/setup.sh"
columns="sb lb lb_lr lb_lr_gbn lb_lr_gbn_ra" options=""
[ -n "$quick" ] && columns="sb lb_lr_gbn" options=",epochs_scale=0.01"
for column in $columns; do
  start=$(date +%s)
  python3 -m gbn_jax.main --config="configs/fashion_mnist_f1.py:$column,seed=0$options" \
    ${data:+--config.data_dir="$data"} --workdir="$out/runs/$column" > "$out/$column.log" 2>&1
  rc=$?
  cp "$out/runs/$column/summary.json" "$out/$column.json" 2>/dev/null
  last_eval=$(grep eval_accuracy "$out/runs/$column/metrics.jsonl" 2>/dev/null | tail -1)
  echo "$column rc=$rc wall=$(( $(date +%s) - start ))s last eval: $last_eval"
  [ $rc -ne 0 ] && tail -c 600 "$out/$column.log"
done | tee "$out/f1_unscaled.log"
