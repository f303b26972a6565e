#!/usr/bin/env bash
# The GPU rows of the README's Performance section, in one call on a lent GPU machine
# (the device tool; its image has jax, flax, optax, orbax and torch, not grain,
# array_record, ml_collections or portpicker, which travel as wheels in .whl/).
#
#   bash experiments/gpu/step_speed.sh [OUTDIR]     (default: experiments/results)
#
# 1. ResNet-44 and F1 at batch 4096, ghost 128, bfloat16: this project's step against
#    PyTorch (cudnn, channels_last, autocast) with MFU against the card's bf16 matmul.
# 2. XLA:GPU compiler options on the ResNet-44 step (what moves it).
# 3. Cost breakdown: the ResNet-44 step without any normalization layer (jax_nonorm).
# 4. WRN-16-4 (channels 64-256) in JAX: MFU of a wider conv net on the same card.
# STEPS="main sweep breakdown wide" (default) picks which of them run.
set -uo pipefail
out=${1:-${OUT:-experiments/results}}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/grain-*.whl .whl/array_record-*.whl .whl/ml_collections-*.whl \
    .whl/portpicker-*.whl && export PYTHONPATH=/tmp/site
  # The image's flax/optax if the project imports with them, else the pinned wheels.
  if ! python3 -c "from gbn_jax import models, train" 2>"$out/import_error.txt"; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site2 .whl/flax-*.whl .whl/optax-*.whl && export PYTHONPATH=/tmp/site2:/tmp/site
  fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
  | tee "$out/gpu_bench_env.txt"
python3 -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__,
'optax', optax.__version__, 'torch', torch.__version__, jax.devices())" | tee -a "$out/gpu_bench_env.txt"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.45  # torch shares the card
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache  # the sweep reuses the default step
steps=" ${STEPS:-main sweep breakdown wide} "
[[ $steps == *" main "* ]] && timeout "${MAIN_TIMEOUT:-330}" python3 -m experiments.bench.step_speed --platform gpu \
  --dtype bfloat16 --models resnet44,f1 --batch 4096 --ghost 128 --repeats 5 --steps 5 \
  --out "$out/bench_train_gpu" 2>&1 | grep -v "it/s\]$" | tee "$out/bench_train_gpu.log"
[[ $steps == *" sweep "* ]] && timeout "${SWEEP_TIMEOUT:-230}" python3 -m experiments.bench.step_speed --xla-sweep \
  --platform gpu --dtype bfloat16 --models resnet44 --batch 4096 --ghost 128 --repeats 5 \
  --steps 5 --no-probe --no-torch --sweep-options "${SWEEP_OPTIONS:-default,no_command_buffer,exhaustive_tiling,latency_hiding}" --out "$out/bench_train_gpu_xla_sweep" 2>&1 | grep -v "it/s\]$" \
  | tee "$out/bench_train_gpu_xla_sweep.log"
[[ $steps == *" breakdown "* ]] && timeout "${BREAKDOWN_TIMEOUT:-300}" python3 \
  experiments/bench/step_speed.py --platform gpu --dtype bfloat16 --models resnet44 --batch 4096 \
  --ghost 128 --repeats 5 --steps 5 --variants jax_gbn,jax_bn,jax_nonorm,torch_bn \
  --out "$out/bench_train_gpu_breakdown" 2>&1 | grep -v "it/s\]$" \
  | tee "$out/bench_train_gpu_breakdown.log"
[[ $steps == *" wide "* ]] && timeout "${WIDE_TIMEOUT:-300}" python3 \
  experiments/bench/step_speed.py --platform gpu --dtype bfloat16 --models wrn16_4 --batch 4096 \
  --ghost 128 --repeats 5 --steps 3 --variants jax_gbn,jax_nonorm --no-torch \
  --out "$out/bench_train_gpu_wide" 2>&1 | grep -v "it/s\]$" | tee "$out/bench_train_gpu_wide.log"
exit 0
