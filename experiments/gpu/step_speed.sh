#!/usr/bin/env bash
# The GPU rows of the performance tables (docs/gpu.md), in one call:
# 1. ResNet-44 and F1 at batch 4096, ghost 128, bfloat16: this project's step against
#    PyTorch (cudnn, channels_last, autocast), MFU against the card's bf16 matmul rate;
# 2. XLA:GPU compiler options on the ResNet-44 step (what moves it);
# 3. the cost breakdown: the ResNet-44 step without any normalization layer;
# 4. WRN-16-4 (channels 64-256) in JAX: MFU of a wider conv net on the same card.
# Writes OUTDIR/bench_train_gpu{,_xla_sweep,_breakdown,_wide}.{json,md,log}. Needs
# PyTorch with CUDA (installed here from the `bench` extra unless already present).
#
#   bash experiments/gpu/step_speed.sh OUTDIR [--wheels DIR] [--quick]
# --quick: one round of one step each (a check of the script, not a measurement).
set -uo pipefail
extras=train,research
python3 -c "import torch" 2>/dev/null || extras=train,research,bench
source "$(dirname "$0")/setup.sh"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.45  # PyTorch shares the card.
export JAX_COMPILATION_CACHE_DIR=$out/jax_cache  # The sweep reuses the default step.
rounds="--repeats 5 --steps 5"
[ -n "$quick" ] && rounds="--repeats 1 --steps 1 --warmup 1"
common="--platform gpu --dtype bfloat16 --batch 4096 --ghost 128 $rounds"
bench() {  # name, then the benchmark's arguments
  local name=$1; shift
  python3 -m experiments.bench.step_speed $common "$@" --out "$out/$name" 2>&1 \
    | sed '/it\/s\]$/d' | tee "$out/$name.log"
}
bench bench_train_gpu --models resnet44,f1
bench bench_train_gpu_xla_sweep --xla-sweep --models resnet44 --no-probe --no-torch \
  --sweep-options default,no_command_buffer,exhaustive_tiling,latency_hiding
bench bench_train_gpu_breakdown --models resnet44 --variants jax_gbn,jax_bn,jax_nonorm,torch_bn
bench bench_train_gpu_wide --models wrn16_4 --variants jax_gbn,jax_nonorm --no-torch
