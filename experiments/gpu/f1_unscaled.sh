#!/usr/bin/env bash
# The paper's F1 protocol unscaled (|B_S| = 128, |B_L| = 4096, the full 50-epoch regime;
# +RA 1600 epochs) on Fashion-MNIST, seed 0, on one lent GPU (the device tool). The IDX
# files travel in .fmnist/ and the missing Python packages as wheels in .whl/ (see
# run_gpu_bench.sh). Each run's summary.json lands in OUTDIR as <variant>.json.
#
#   bash experiments/gpu/f1_unscaled.sh [OUTDIR]    (default: experiments/results/f1_unscaled_gpu)
# CONFIG_OPTIONS (e.g. ",epochs_scale=0.01") is appended to each column's config argument.
set -uo pipefail
out=${1:-${OUT:-experiments/results/f1_unscaled_gpu}}
mkdir -p "$out"
source experiments/gpu/setup.sh
data_dir=${DATA_DIR:-.fmnist}
runs=${RUNS_DIR:-/tmp/runs}  # the runs' workdirs (a workdir that exists is resumed)
for variant in ${VARIANTS:-sb lb lb_lr lb_lr_gbn lb_lr_gbn_ra}; do
  start=$(date +%s)
  limit_var="TIMEOUT_$variant"  # e.g. TIMEOUT_sb=120; default RUN_TIMEOUT (300 s)
  timeout "${!limit_var:-${RUN_TIMEOUT:-300}}" python3 -m gbn_jax.main \
    --config="configs/fashion_mnist_f1.py:$variant,seed=0${CONFIG_OPTIONS:-}" --config.data_dir="$data_dir" \
    --workdir="$runs/$variant" > "${runs}_$variant.log" 2>&1
  rc=$?
  cp "$runs/$variant/summary.json" "$out/$variant.json" 2>/dev/null
  last_eval=$(grep eval_accuracy "$runs/$variant/metrics.jsonl" 2>/dev/null | tail -1)
  echo "$variant rc=$rc wall=$(( $(date +%s) - start ))s last eval: $last_eval"
  [ $rc -ne 0 ] && tail -c 600 "${runs}_$variant.log"
done | tee "$out/f1_unscaled_gpu.log"
exit 0
