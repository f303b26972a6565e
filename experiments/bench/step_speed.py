"""Train-step throughput: this project (JAX) against the authors' approach in PyTorch.

Times the full training step (forward, backward, clipping at global norm 5, SGD with
momentum and weight decay) of

* ``jax_gbn``: the project's own step, ``gbn_jax.trainer.steps.make_train_step`` with
  ``get_model(norm="ghost")`` and ``regimes.resolve(...).optimizer()``, jitted over a
  1-D "data" mesh with explicit shardings and the state donated, as the trainer does;
* ``jax_bn``: the same with ``norm="batch"`` (flax ``nn.BatchNorm``), for reference;
* ``jax_nonorm``: the same network with every norm layer replaced by the identity (the
  cost breakdown: what normalization adds to the step);
* ``torch_chunk_accum``: the authors' large-batch loop, forward and backward per chunk
  of |B_S| examples with gradient accumulation (``experiments/bench/torch_reference.py``);
* ``torch_gbn_loop``: one pass whose GhostBatchNorm loops over chunks in Python;
* ``torch_bn``: plain ``nn.BatchNorm`` over the whole batch.

Every variant is compiled and warmed up first (excluded); then rounds interleave the
variants (the order rotates every round), each timing ``--steps`` steps. Reported:
the median step time over all timed steps, examples/s, and per-round ratios against
``torch_chunk_accum`` and ``torch_bn`` (median over rounds), so that load from other
jobs on the machine hits every variant alike. Both frameworks use the same thread
count (``torch.set_num_threads``; XLA:CPU uses every core, ``os.cpu_count()``).

The JAX variants compile with the trainer's CPU default, ``train.XLA_CPU_FAST_OPTIONS``
(``--xla-preset none``: XLA's own defaults); the allocator is the environment's
(docs/performance.md: huge pages for malloc).

Also reported: model FLOPs utilization (MFU), the analytic model FLOPs of a step (3x the
forward pass's convolution and dense FLOPs, counted from the jaxpr) per second over a
dense matmul rate measured on the same device in the same run (bf16 on a GPU). XLA's
own cost analysis is kept in the JSON; on a GPU it does not count cuDNN convolutions.

``--xla-sweep`` instead compiles the project's ResNet step under XLA:CPU compiler
options and a layout/precision probe, and times them interleaved (the table of what
was tried against the conv-net gap). ``--xla-preset`` opts the main benchmark into
such options.

Usage (CPU, the README table):
  .venv/bin/python -m experiments.bench.step_speed --models f1,resnet44
  .venv/bin/python -m experiments.bench.step_speed --xla-sweep --models resnet44 --batch 128
GPU (ResNet-44 bf16, batch 4096, ghost 128; MFU against the card's bf16 matmul rate;
experiments/gpu/step_speed.sh runs every GPU table of the README in one call):
  python -m experiments.bench.step_speed --platform gpu --dtype bfloat16 --models resnet44 \
      --batch 4096

References:
  Hoffer, Hubara & Soudry (2017), sections 4-5.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from tqdm import tqdm

from experiments.harness import provenance, tables, timing
from experiments.harness.provenance import RESULTS_DIR
from experiments.harness.timing import Variant
from gbn_jax.trainer.steps import XLA_CPU_FAST_OPTIONS

MODULE = "experiments.bench.step_speed"
DEFAULT_BATCH = {"f1": 4096, "resnet44": 512, "wrn16_4": 512, "resnet50": 32}
# wrn16_4 and resnet50 (JAX only, --no-torch): a wider conv net, for how MFU depends on
# channel width, and the ImageNet ResNet, for the CPU options' effect on it.
INPUT_SHAPE = {
    "f1": (28, 28, 1),
    "resnet44": (32, 32, 3),
    "wrn16_4": (32, 32, 3),
    "resnet50": (224, 224, 3),
}
REFERENCE = "torch_chunk_accum"

# XLA:CPU compiler options tried against the conv-net gap (`--xla-sweep`). Names and
# values come from xla/debug_options_flags.cc of the XLA inside jaxlib 0.10.2; they
# go to `jax.jit(...).lower(...).compile(compiler_options=...)`, so every variant
# lives in one process and is timed interleaved with the others.
XLA_SWEEP: dict[str, dict[str, Any]] = {
    "default": {},
    # YNNPACK (default for convolutions, dots, reductions here) off: Eigen kernels.
    "ynn_off": {"xla_cpu_experimental_ynn_fusion_type": ""},
    "ynn_conv_only": {
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
    },
    "ynn_dot_only": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
    # YNNPACK for reductions only, dots on Eigen: gbn_jax.trainer.steps.XLA_CPU_FAST_OPTIONS.
    "ynn_reduce_only": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"},
    "xnnpack": {"xla_cpu_use_xnnpack": True},
    "xnn_graph_greedy": {
        "xla_cpu_experimental_xnn_graph_fusion_mode": "XNN_GRAPH_FUSION_MODE_GREEDY"
    },
    "onednn": {"xla_cpu_use_onednn": True},
    "fast_math": {"xla_cpu_enable_fast_math": True},
    "single_thread_eigen": {"xla_cpu_multi_thread_eigen": False},
    "no_concurrency_scheduler": {"xla_cpu_enable_concurrency_optimized_scheduler": False},
    "no_fusion_emitters": {"xla_cpu_use_fusion_emitters": False},
    "vector_width_128": {"xla_cpu_prefer_vector_width": 128},
    # The trainer's default: ynn_reduce_only plus the optimization barriers of
    # models.base.conv_input kept (not expanded).
    "trainer": dict(XLA_CPU_FAST_OPTIONS),
    # ... and without the rewrite of long reductions into reduce-window + reduce.
    "trainer_no_tree_reduction": {
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE",
        "xla_disable_hlo_passes": "cse_barrier_expander,tree_reduction_rewriter",
    },
    "trainer_ynn_off_no_tree_reduction": {
        "xla_cpu_experimental_ynn_fusion_type": "",
        "xla_disable_hlo_passes": "cse_barrier_expander,tree_reduction_rewriter",
    },
    # The same with YNNPACK off entirely (reductions on XLA's own loops too).
    "trainer_ynn_off": {
        "xla_cpu_experimental_ynn_fusion_type": "",
        "xla_disable_hlo_passes": "cse_barrier_expander",
    },
}
# XLA:GPU options for the same sweep with --platform gpu (ResNet-44 in bfloat16).
XLA_GPU_SWEEP: dict[str, dict[str, Any]] = {
    "default": {},
    "autotune_off": {"xla_gpu_autotune_level": 0},  # what autotuning buys
    "no_triton_gemm": {"xla_gpu_enable_triton_gemm": False},
    "cublaslt": {"xla_gpu_enable_cublaslt": True},
    "no_command_buffer": {"xla_gpu_enable_command_buffer": ""},  # CUDA graphs off
    "exhaustive_tiling": {"xla_gpu_exhaustive_tiling_search": True},
    "latency_hiding": {"xla_gpu_enable_latency_hiding_scheduler": True},
}
# Opt-in presets for every JAX variant of the main benchmark (--xla-preset).
XLA_PRESETS: dict[str, dict[str, Any]] = {
    "none": {},
    "eigen": XLA_SWEEP["ynn_off"],
    "ynn_reduce_only": XLA_SWEEP["ynn_reduce_only"],
    "fast": XLA_SWEEP["trainer"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="f1,resnet44", help="comma list of f1,resnet44")
    p.add_argument("--batch", type=int, default=None, help="override the per-model batch")
    p.add_argument("--ghost", type=int, default=128, help="ghost batch size |B_S|")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    p.add_argument("--platform", default="cpu", choices=("cpu", "gpu"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument(
        "--variants",
        default="jax_gbn,jax_bn,torch_chunk_accum,torch_gbn_loop,torch_bn",
        help="comma list of variants",
    )
    p.add_argument(
        "--omp-wait-policy",
        default="PASSIVE",
        help="OMP_WAIT_POLICY for torch (set before import); PASSIVE stops OpenMP threads "
        "spinning, which on a shared, oversubscribed CPU slowed torch several-fold",
    )
    p.add_argument(
        "--xla-preset",
        default="fast",
        choices=sorted(XLA_PRESETS),
        help="XLA:CPU options of the JAX variants: fast (the trainer's default), none "
        "(XLA's defaults), eigen, ynn_reduce_only",
    )
    p.add_argument("--xla-sweep", action="store_true", help="time XLA:CPU options instead")
    p.add_argument(
        "--sweep-options",
        default=None,
        help="comma list of XLA_SWEEP (CPU) or XLA_GPU_SWEEP keys (default: all)",
    )
    p.add_argument("--no-probe", action="store_true", help="skip the layout probe conv nets")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch variants")
    p.add_argument("--out", default=None, help="output stem (default results/bench_train)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------
# Variants: each is set up (compiled, warmed) once and then timed by `run(steps)`.
# ---------------------------------------------------------------------------------------


def without_normalization(model: Any) -> Any:
    """The same network with every normalization layer replaced by the identity.

    Only for the cost breakdown (``jax_nonorm``): what the convolutions, activations
    and optimizer cost without any normalization, so that the norms' share of the step
    is the difference.
    """
    import flax.linen as nn

    class Identity(nn.Module):
        use_running_average: bool | None = None

        def __call__(self, x):
            return x

    cls = type(model)
    stripped = type(f"{cls.__name__}NoNorm", (cls,), {"norm_layer": lambda self, train: Identity})
    return stripped(
        **{
            f.name: getattr(model, f.name)
            for f in dataclasses.fields(cls)
            if f.init and f.name not in ("parent", "name")
        }
    )


def paper_regime(ghost: int, batch_size: int) -> Any:
    """The paper's optimizer at a constant LR, for timing and compiling steps.

    Clipping at global norm 5, weight decay 1e-4, momentum 0.9 (PyTorch's form, as
    torch.optim.SGD), LR 0.1 (sqrt-scaled from |B_S| = ``ghost``); one epoch of a
    60k-example set for the schedule. Shared with experiments/bench/comm_analysis.py.

    Returns:
      The ``gbn_jax.trainer.regimes.ResolvedRegime``.
    """
    from gbn_jax.trainer import regimes

    return regimes.resolve(
        dict(
            reference_batch_size=ghost,
            batch_size=batch_size,
            epochs=1,
            lr_schedule=((0, 0.1),),
            momentum=0.9,
            weight_decay=1e-4,
            grad_clip_norm=5.0,
        ),
        num_train_examples=max(60_000, batch_size),
    )


def project_step(
    model_name: str,
    norm: str,
    batch_size: int,
    ghost: int,
    dtype: str,
    compiler_options: dict[str, Any] | None = None,
) -> tuple[Callable, Any, dict, Any, Any]:
    """The project's train step, jitted as gbn_jax.trainer.train does it.

    Returns:
      ``(compiled_step, state, batch, rng, lowered)``: the compiled step (state
      donated), a fresh state on the mesh, a random batch and key, and the lowering
      (for XLA's cost and memory analyses).
    """
    from gbn_jax import models

    zoo_name = "resnet_cifar" if model_name == "resnet44" else model_name
    model = models.get_model(
        zoo_name,
        num_classes=10,
        norm="batch" if norm == "none" else norm,
        ghost_batch_size=ghost if norm == "ghost" else None,
        dtype=dtype,
    )
    if norm == "none":
        model = without_normalization(model)
    regime = paper_regime(ghost, batch_size)
    return compile_step(model, regime, INPUT_SHAPE[model_name], batch_size, compiler_options or {})


def compile_step(
    model: Any,
    regime: Any,
    shape: tuple[int, ...],
    batch_size: int,
    compiler_options: dict[str, Any],
) -> tuple[Callable, Any, dict, Any, Any]:
    """``gbn_jax.trainer.steps.make_train_step`` of a model and regime, compiled on one device.

    Jitted as the trainer jits its steps (explicit shardings over a 1-D "data" mesh,
    the state donated), fed a random float32 batch; shared with trainer_throughput.py.

    Args:
      model: a ``gbn_jax.models`` network.
      regime: a ``gbn_jax.trainer.regimes.ResolvedRegime`` (its optimizer and schedule).
      shape: one example's shape.
      batch_size: examples per step.
      compiler_options: XLA options (``{}``: XLA's defaults).

    Returns:
      ``(compiled_step, state, batch, rng, compiled)`` as ``project_step``.
    """
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from gbn_jax.trainer import steps

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    tx = regime.optimizer()
    init = jax.jit(
        lambda rng: steps.create_train_state(rng, model, tx, shape), out_shardings=replicated
    )
    state = init(jax.random.key(0))
    step = steps.make_train_step(model, tx, regime.learning_rate)
    jitted = jax.jit(
        step,
        in_shardings=(replicated, batch_sharding, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
    )
    rng = np.random.default_rng(0)
    batch = jax.device_put(
        {
            "image": rng.standard_normal((batch_size, *shape), np.float32),
            "label": rng.integers(0, 10, batch_size).astype(np.int32),
        },
        batch_sharding,
    )
    key = jax.device_put(jax.random.key(1), replicated)
    from gbn_jax.trainer.steps import tracing  # the barriers the options keep, as the trainer

    with tracing(compiler_options):
        lowered = jitted.lower(state, batch, key)
    compiled = lowered.compile(compiler_options=compiler_options)
    return compiled, state, batch, key, compiled


def count_matmul_flops(jaxpr: Any) -> float:
    """FLOPs of the convolutions and dot products in a (closed) jaxpr, recursively.

    2 x (output elements) x (contraction size) per ``conv_general_dilated`` and
    ``dot_general``; elementwise work (norms, activations, the optimizer) is not
    counted, as in the usual model-FLOPs utilization (PaLM, appendix B).
    """
    from jax.extend.core import jaxprs_in_params

    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            contraction = int(np.prod([lhs[d] for d in lc])) if lc else 1
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * contraction
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            dn = eqn.params["dimension_numbers"]
            out_features = rhs[dn.rhs_spec[0]]
            per_output = np.prod(rhs) / out_features  # kernel window x input features/group
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * per_output
        for sub in jaxprs_in_params(eqn.params):
            total += count_matmul_flops(sub)
    return total


def model_flops_per_example(model: Any, shape: tuple[int, ...]) -> float:
    """Training FLOPs per example: 3 x the forward pass's conv and dot FLOPs.

    The backward pass costs two forward passes (gradients with respect to activations
    and to weights), the convention of model-FLOPs utilization; traced on a batch of 8
    in inference mode, so no normalization statistics enter.
    """
    import jax
    import jax.numpy as jnp

    x = jnp.zeros((8, *shape), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)
    return 3.0 * count_matmul_flops(jaxpr.jaxpr) / 8


def xla_costs(compiled: Any) -> dict[str, float]:
    """FLOPs and bytes of one step (XLA cost analysis) and its memory footprint."""
    out: dict[str, float] = {}
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        out["flops"] = float(cost.get("flops", float("nan")))
        out["bytes_accessed"] = float(cost.get("bytes accessed", float("nan")))
    except Exception as e:  # cost analysis is best effort on some backends
        out["cost_analysis_error"] = repr(e)
    try:
        mem = compiled.memory_analysis()
        out["argument_bytes"] = float(mem.argument_size_in_bytes)
        out["output_bytes"] = float(mem.output_size_in_bytes)
        out["temp_bytes"] = float(mem.temp_size_in_bytes)
    except Exception as e:
        out["memory_analysis_error"] = repr(e)
    return out


def jax_variant(name: str, model_name: str, args: argparse.Namespace, batch: int) -> Variant:
    """Compiles and warms one JAX variant: "jax_gbn" or "jax_bn", "@<XLA_SWEEP key>"."""
    import jax

    base, _, option_key = name.partition("@")
    norm = {"jax_gbn": "ghost", "jax_bn": "batch", "jax_nonorm": "none"}[base]
    preset = XLA_PRESETS[args.xla_preset] if args.platform == "cpu" else {}  # CPU options
    options = dict(preset, **XLA_SWEEP.get(option_key, {}))
    t0 = time.perf_counter()
    compiled, state, data, key, _ = project_step(
        model_name, norm, batch, args.ghost, args.dtype, options
    )
    compile_s = time.perf_counter() - t0
    holder = {"state": state}
    for _ in range(args.warmup):  # first executions allocate and page in
        holder["state"], metrics = compiled(holder["state"], data, key)
    jax.block_until_ready(metrics)

    def step() -> None:
        holder["state"], m = compiled(holder["state"], data, key)
        jax.block_until_ready(m["loss"])

    info = {"compile_s": compile_s, "compiler_options": options, **xla_costs(compiled)}
    info["loss_after_warmup"] = float(metrics["loss"])
    return Variant(name, functools.partial(timing.time_calls, step), info)


def torch_variant(name: str, model_name: str, args: argparse.Namespace, batch: int) -> Variant:
    """Builds and warms one PyTorch variant of experiments/bench/torch_reference.py."""
    import torch

    from experiments.bench import torch_reference

    mode = name.removeprefix("torch_")
    device = "cuda" if args.platform == "gpu" else "cpu"
    model = torch_reference.get_model(
        model_name, "ghost" if mode == "gbn_loop" else "batch", args.ghost
    ).to(device)
    shape = INPUT_SHAPE[model_name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, shape[2], shape[0], shape[1], generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    if device == "cuda":
        torch.backends.cudnn.benchmark = True  # as XLA autotunes its convolutions
    if args.platform == "gpu" and model_name == "resnet44":
        # NHWC is what tensor cores want; the usual PyTorch recipe for conv nets.
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = torch.bfloat16 if args.dtype == "bfloat16" else None
    step = torch_reference.make_train_step(model, mode, args.ghost, autocast_dtype=autocast)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        loss = step(x, y)
    sync()

    def timed_step() -> None:
        step(x, y)
        sync()

    info = {"loss_after_warmup": float(loss.detach())}
    return Variant(name, functools.partial(timing.time_calls, timed_step), info)


def matmul_rate(args: argparse.Namespace, n: int | None = None, repeats: int = 5) -> float:
    """Measured dense matmul FLOP/s on the JAX device (bf16 on GPU, f32 on CPU)."""
    import jax
    import jax.numpy as jnp

    n = n or (8192 if args.platform == "gpu" else 2048)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" and args.platform == "gpu" else jnp.float32
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    inner = 10 if args.platform == "gpu" else 1
    # Chained products keep the device busy without host round trips in between.
    f = jax.jit(lambda a, b: jax.lax.fori_loop(0, inner, lambda i, c: (c @ b) * 1e-3, a))
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 * inner / best


# ---------------------------------------------------------------------------------------
# Interleaved timing.
# ---------------------------------------------------------------------------------------


def summarize(times: dict[str, list[list[float]]], batch: int, reference: str) -> dict:
    """Median step times, examples/s and per-round median ratios to ``reference``."""
    out = {}
    for name, rounds in times.items():
        flat = [t for r in rounds for t in r]
        med = statistics.median(flat)
        row = {
            "median_step_s": med,
            "examples_per_s": batch / med,
            "round_medians_s": [statistics.median(r) for r in rounds],
        }
        for ref in (reference, "torch_bn", "jax_bn"):
            if ref in times and ref != name:
                ratios = [
                    statistics.median(b) / statistics.median(a)
                    for a, b in zip(rounds, times[ref], strict=True)
                ]
                row[f"speedup_vs_{ref}"] = statistics.median(ratios)
        out[name] = row
    return out


def bench_model(model_name: str, args: argparse.Namespace, rate: float) -> dict[str, Any]:
    """Builds every requested variant of one model, times them, returns the record."""
    from gbn_jax import models

    batch = args.batch or DEFAULT_BATCH[model_name]
    zoo = models.get_model(model_name, num_classes=10, norm="batch")
    # Same network, same work: one model-FLOPs count serves every variant.
    flops = model_flops_per_example(zoo, INPUT_SHAPE[model_name]) * batch
    names = [v for v in args.variants.split(",") if v]
    if args.no_torch:
        names = [n for n in names if not n.startswith("torch")]
    variants = []
    for name in tqdm(names, desc=f"{model_name}: compile + warm-up"):
        make = jax_variant if name.startswith("jax") else torch_variant
        variants.append(make(name, model_name, args, batch))
    times = timing.interleave(variants, args.repeats, args.steps, f"{model_name} b={batch}")
    ref = REFERENCE if REFERENCE in times else names[-1]
    summary = summarize(times, batch, ref)
    for v in variants:
        summary[v.name]["info"] = v.info
        achieved = flops / summary[v.name]["median_step_s"]
        summary[v.name]["model_flops_per_s"] = achieved
        summary[v.name]["mfu"] = achieved / rate
    return {
        "model": model_name,
        "batch": batch,
        "ghost": args.ghost,
        "model_flops_per_step": flops,
        "variants": summary,
    }


def main_benchmark(args: argparse.Namespace) -> None:
    stem = args.out or str(RESULTS_DIR / "bench_train")
    env = provenance.environment(MODULE, args)
    rate = matmul_rate(args)
    records = [bench_model(m, args, rate) for m in args.models.split(",")]
    env["load_average_end"] = os.getloadavg()
    env["matmul_flops_per_s"] = rate
    lines = [
        "# Train-step throughput: JAX (this project) vs the authors' approach in PyTorch",
        "",
        f"Hardware: {env['cpu']} ({env['cpu_count']} cores), {env['device_kind']}; "
        f"jax {env['jax']}, torch {env.get('torch')} ({env.get('torch_threads')} threads), "
        f"dtype {args.dtype}. Load average (1/5/15 min) at start "
        f"{tuple(round(x, 1) for x in env['load_average_start'])}, at end "
        f"{tuple(round(x, 1) for x in env['load_average_end'])}. Measured matmul rate "
        f"{rate / 1e9:.1f} GFLOP/s.",
        "",
        f"Command: `{env['command']}`. {args.repeats} interleaved rounds x {args.steps} "
        "steps per variant, warm-up excluded; medians. Speed-ups are medians of per-round "
        "ratios (>1: faster than the reference). MFU: model FLOPs (3 x the forward "
        "pass's conv and dense FLOPs, analytic) per second over the measured matmul rate.",
        "",
    ]
    for rec in records:
        lines += [
            f"## {rec['model']}, batch {rec['batch']}, ghost {rec['ghost']}",
            "",
            speed_table(rec["variants"]),
            "",
        ]
    tables.write_outputs(stem, {"environment": env, "results": records}, "\n".join(lines))


def speed_table(variants: dict[str, dict[str, Any]]) -> str:
    """One model's variants: step time, throughput, the speed-up over each reference that
    ran (the authors' chunk loop, torch BN, JAX BN; 1.00 on the reference's own row), model
    TFLOP/s and MFU."""
    refs = [ref for ref in (REFERENCE, "torch_bn", "jax_bn") if ref in variants]
    rows = [
        [
            name,
            f"{v['median_step_s'] * 1e3:.0f}",
            f"{v['examples_per_s']:.0f}",
            *(f"{1.0 if name == ref else v['speedup_vs_' + ref]:.2f}" for ref in refs),
            f"{v['model_flops_per_s'] / 1e12:.2f}",
            f"{v['mfu']:.1%}",
        ]
        for name, v in variants.items()
    ]
    header = ["variant", "step (ms)", "examples/s", *(f"x vs {r}" for r in refs)]
    return tables.markdown_table([*header, "model TFLOP/s", "MFU"], rows)


# ---------------------------------------------------------------------------------------
# XLA:CPU sweep: compiler options on the project's step, plus a layout/precision probe.
# ---------------------------------------------------------------------------------------


def probe_convnet(layout: str, dtype: str, batch: int, ghost: int | None) -> Variant:
    """A standalone conv net (6 conv3x3 + norm + ReLU) in NHWC or NCHW, for layouts.

    flax's nn.Conv is NHWC only, so the layout question is asked of ``lax.conv``
    directly: same network, same step, only the dimension numbers differ.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from jax import lax

    dt = jnp.dtype(dtype)
    chans = [(3, 32, 1), (32, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2), (128, 128, 1)]
    cax = 3 if layout == "NHWC" else 1
    red = tuple(a for a in range(4) if a != cax)

    def norm(x, g, b):
        xf = x.astype(jnp.float32)
        if ghost:
            xf = xf.reshape(x.shape[0] // ghost, ghost, *x.shape[1:])
            axes = tuple(a + 1 for a in red)
        else:
            axes = red
        m = xf.mean(axes, keepdims=True)
        v = jnp.maximum((xf * xf).mean(axes, keepdims=True) - m * m, 0.0)
        y = ((xf - m) * lax.rsqrt(v + 1e-5)).reshape(x.shape)
        shp = [1, 1, 1, 1]
        shp[cax] = -1
        return (y * g.reshape(shp) + b.reshape(shp)).astype(dt)

    def loss_fn(params, x, y):
        h = x.astype(dt)
        for (_, _, s), p in zip(chans, params["convs"], strict=True):
            dn = (layout, "HWIO", layout)
            h = lax.conv_general_dilated(h, p["w"].astype(dt), (s, s), "SAME", dimension_numbers=dn)
            h = jax.nn.relu(norm(h, p["g"], p["b"]))
        h = h.astype(jnp.float32).mean(tuple(a for a in red if a != 0))
        return optax.softmax_cross_entropy_with_integer_labels(h @ params["fc"], y).mean()

    keys = jax.random.split(jax.random.key(0), len(chans) + 1)
    params = {
        "convs": [
            {
                "w": jax.random.normal(k, (3, 3, ci, co)) * (2 / (9 * ci)) ** 0.5,
                "g": jnp.ones(co),
                "b": jnp.zeros(co),
            }
            for k, (ci, co, _) in zip(keys, chans, strict=False)
        ],
        "fc": jax.random.normal(keys[-1], (128, 10)) * 0.05,
    }
    tx = optax.chain(
        optax.clip_by_global_norm(5.0), optax.add_decayed_weights(1e-4), optax.sgd(0.1, 0.9)
    )

    def step(state, x, y):
        params, opt = state
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt = tx.update(grads, opt, params)
        return (optax.apply_updates(params, updates), opt), loss

    shape = (batch, 32, 32, 3) if layout == "NHWC" else (batch, 3, 32, 32)
    x = jax.random.normal(jax.random.key(1), shape)
    y = jnp.zeros((batch,), jnp.int32)
    holder = {"state": (params, tx.init(params))}
    f = jax.jit(step, donate_argnums=(0,))
    for _ in range(2):
        holder["state"], loss = f(holder["state"], x, y)
    loss.block_until_ready()

    def timed_step() -> None:
        holder["state"], loss = f(holder["state"], x, y)
        loss.block_until_ready()

    name = f"probe {layout} {dtype}" + (f" ghost{ghost}" if ghost else "")
    return Variant(name, functools.partial(timing.time_calls, timed_step), {})


def probe_torch(batch: int, channels_last: bool) -> Variant:
    """The probe conv net in PyTorch (NCHW or channels_last), for the gap ratio."""
    import torch
    from torch import nn

    chans = [(3, 32, 1), (32, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2), (128, 128, 1)]
    layers: list[nn.Module] = []
    for ci, co, s in chans:
        layers += [nn.Conv2d(ci, co, 3, s, 1, bias=False), nn.BatchNorm2d(co), nn.ReLU()]
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))
    x = torch.randn(batch, 3, 32, 32)
    y = torch.zeros(batch, dtype=torch.long)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()

    step()
    step()
    name = "probe torch " + ("channels_last" if channels_last else "NCHW")
    return Variant(name, functools.partial(timing.time_calls, step), {})


def xla_sweep(args: argparse.Namespace) -> None:
    import jax

    stem = args.out or str(RESULTS_DIR / "bench_train_xla_sweep")
    env = provenance.environment(MODULE, args)
    model_name = args.models.split(",")[0]
    batch = args.batch or DEFAULT_BATCH[model_name]
    variants = []
    table = XLA_GPU_SWEEP if args.platform == "gpu" else XLA_SWEEP
    requested = (args.sweep_options or ",".join(table)).split(",")
    labels = ["default"] + [k for k in requested if k and k != "default"]
    for label in tqdm(labels, desc="compile XLA options"):
        options = table[label]
        try:
            compiled, state, data, key, _ = project_step(
                model_name, "ghost", batch, args.ghost, args.dtype, options
            )
        except Exception as e:  # an option this jaxlib does not know: report, go on
            print(f"skipping {label}: {e}")
            continue
        holder = {"state": state}

        def step(compiled=compiled, holder=holder, data=data, key=key) -> None:
            holder["state"], m = compiled(holder["state"], data, key)
            jax.block_until_ready(m["loss"])

        run = functools.partial(timing.time_calls, step)
        run(2)
        variants.append(Variant(f"{model_name} jax_gbn: {label}", run, {"options": options}))
    if not args.no_torch:
        import torch

        torch.set_num_threads(args.threads)
        variants.append(torch_variant("torch_bn", model_name, args, batch))
        variants[-1].name = f"{model_name} torch_bn"
        variants.append(torch_variant("torch_chunk_accum", model_name, args, batch))
        variants[-1].name = f"{model_name} torch_chunk_accum"
    if not args.no_torch and not args.no_probe and model_name == "resnet44":
        probe_batch = batch
        for layout in ("NHWC", "NCHW"):
            variants.append(probe_convnet(layout, "float32", probe_batch, None))
        # At least 4 ghost batches, so the probe's grouped statistics are not the BN ones.
        probe_ghost = args.ghost if args.ghost * 4 <= probe_batch else probe_batch // 4
        variants.append(probe_convnet("NHWC", "float32", probe_batch, probe_ghost))
        variants.append(probe_convnet("NHWC", "bfloat16", probe_batch, None))
        variants.append(probe_torch(probe_batch, False))
        variants.append(probe_torch(probe_batch, True))
    times = timing.interleave(variants, args.repeats, args.steps, "XLA sweep")
    base = f"{model_name} jax_gbn: default"
    rows = []
    for name, rounds in times.items():
        med = statistics.median(t for r in rounds for t in r)
        ref = base if not name.startswith("probe") else "probe NHWC float32"
        ratio = statistics.median(
            statistics.median(a) / statistics.median(b)
            for a, b in zip(times[ref], rounds, strict=True)
        )
        rows.append([name, f"{med * 1e3:.0f}", f"{batch / med:.0f}", f"{ratio:.2f}"])
    env["load_average_end"] = os.getloadavg()
    md = tables.document(
        f"# XLA:{args.platform.upper()} options and layouts against the conv-net gap "
        f"({model_name}, batch {batch}, {args.dtype})",
        tables.environment_line(env),
        f"Command: `{env['command']}`. {args.repeats} interleaved rounds x {args.steps} "
        "steps. Speed-up: median over rounds of (reference time / variant time); the "
        f"reference is `{base}` for the project's step and `probe NHWC float32` for "
        "the probe conv net rows (6 conv3x3 layers, lax.conv, no flax).",
        tables.markdown_table(["variant", "step (ms)", "examples/s", "speed-up"], rows),
    )
    tables.write_outputs(stem, {"environment": env, "times": times}, md)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.platform == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.omp_wait_policy:
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy
    import jax

    jax.config.update("jax_platforms", "cuda" if args.platform == "gpu" else "cpu")
    if not args.no_torch:
        import torch

        torch.set_num_threads(args.threads)
    if args.xla_sweep:
        xla_sweep(args)
    else:
        main_benchmark(args)


if __name__ == "__main__":
    main()
