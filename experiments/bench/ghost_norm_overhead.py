"""Train-step time of GhostBatchNorm vs flax.linen.BatchNorm, side by side in one run.

Each model is built twice, identical except for its normalization layer (nn.BatchNorm,
or GhostBatchNorm). One jitted train step (forward, backward, SGD with momentum,
buffers donated) is timed per variant, under XLA's default compiler options and under
the trainer's CPU options (``gbn_jax.train.XLA_CPU_FAST_OPTIONS``; run as a script,
the process first restarts with huge pages for malloc, as the CLI does:
``gbn_jax.host_memory``). The two variants of a (model, options) pair are interleaved
in a fresh random order every repeat, so that load from other jobs hits both alike;
the table reports the median step times, the ratio of medians, and the median and
quartiles of the per-repeat GBN/BN ratios.

Models:
  f1:       MNIST-sized MLP, 784 -> 5 x [Dense 512, BN, ReLU] -> Dense 10, batch 4096,
            ghost 128 (Keskar et al.'s F1, the paper's Table 1 first row); defined here.
  conv:     32x32x3 -> 3 x [Conv3x3, BN, ReLU, (pool)] -> Dense 10, batch 1024, ghost
            128; defined here.
  resnet44: the model zoo's ResNet-44 (gbn_jax.models, norm="batch" / "ghost"),
            batch 256, ghost 32.
  wrn16_4:  the model zoo's WRN-16-4, batch 64, ghost 16.

Usage (from the repository root):
  .venv/bin/python -m experiments.bench.ghost_norm_overhead            # full run, writes results
  .venv/bin/python -m experiments.bench.ghost_norm_overhead --repeats 3 --no-write   # smoke run
  .venv/bin/python -m experiments.bench.ghost_norm_overhead --models resnet44 --options trainer

Writes experiments/results/bench_ghost_norm.{md,json}.

References:
  Hoffer et al. 2017, Section 4 (Ghost Batch Normalization), Section 5 (F1, batch 4096,
  ghost batch 128).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import statistics
import time
from collections.abc import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from experiments.harness import provenance, tables, timing
from experiments.harness.provenance import RESULTS_DIR
from gbn_jax.ghost_norm import GhostBatchNorm

MODULE = "experiments.bench.ghost_norm_overhead"
RESULTS = RESULTS_DIR

NOTES = """\
## Reading the numbers

The machine is a 2-core VM shared with other engineers' jobs and a training sweep (the
"load avg" column), so absolute times are up to several times those of an idle machine
and single repeats vary by 20% or more. The two variants of a row are interleaved repeat
by repeat, so the paired ratios are what to read; the CPU-time columns (this process's
CPU time, all threads) are not inflated by waiting for a core.

## Where the time goes (scratch measurements beside this script)

- Normalization is not what separates the variants. Per-op traces (`jax.profiler`, BN
  and GBN steps interleaved over 6 rounds, pinned to one core, XLA's default options) of
  WRN-16-4 at batch 64, ghost 16: every op other than the convolutions took 337 ms (BN)
  and 360 ms (GBN) per step, 0.3% of a ~7.5 s step; the convolutions, the same HLO in
  both models, took 7.33 s and 6.77 s, and 5.35 s against 5.91 s for the stage-1
  weight-gradient convolutions alone in an earlier run: these YNNPACK kernels move by
  about 10% from run to run on this machine, in either direction. GBN's compiled step
  writes less memory in full-size ops than BN's (1.12 GB against 1.25 GB, 134 against
  147 ops) and has fewer large reductions (53 against 66: autodiff of nn.BatchNorm's
  backward reduces more often than the custom rule's transpose).
- Grouped reductions cost what whole-batch ones do. The sum and sum of squares per
  ghost batch of (4096, 512) in 32 ghost batches, (64, 32, 32, 64) in 4 and
  (1024, 32, 32, 16) in 8, in CPU time on one pinned core over 200 interleaved calls, are
  within 6% of nn.BatchNorm's whole-batch reductions under both option sets (YNNPACK
  runs both on one thread). Squaring before the reshape into ghost batches instead of
  after it keeps XLA from fusing the square into the reduction and doubles the cost; the
  module reshapes first.
- History: a first reshape-and-autodiff version measured 1.063 (F1) and 1.032 (conv);
  a hand-written backward (one reduction of (dy, x - mean) per ghost batch, one
  elementwise pass for dx) brought both to par. That backward is now JAX's transpose of
  a custom JVP rule (which also gives forward-mode AD) and compiles to the same kernels:
  20 F1 train steps are bit-identical to the custom-VJP version.
"""


class F1(nn.Module):
    """784 -> 5 x [Dense 512, BN, ReLU] -> Dense 10 (Keskar et al. 2017, F1)."""

    norm: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x, train: bool):
        x = x.reshape(x.shape[0], -1)
        for _ in range(5):
            x = nn.Dense(512)(x)
            x = nn.relu(self.norm(use_running_average=not train)(x))
        return nn.Dense(10)(x)


class SmallConv(nn.Module):
    """32x32x3 -> conv16 -> pool -> conv32 -> pool -> conv64 -> mean -> Dense 10."""

    norm: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x, train: bool):
        for i, width in enumerate((16, 32, 64)):
            x = nn.Conv(width, (3, 3), use_bias=False)(x)
            x = nn.relu(self.norm(use_running_average=not train)(x))
            if i < 2:
                x = nn.max_pool(x, (2, 2), (2, 2))
        return nn.Dense(10)(x.mean(axis=(1, 2)))


def make_step(model: nn.Module, compiler_options: dict):
    """A jitted SGD train step with donated parameters, statistics and optimizer state."""
    tx = optax.sgd(0.1, momentum=0.9)

    def step(params, batch_stats, opt_state, x, y):
        def loss_fn(p):
            logits, updates = model.apply(
                {"params": p, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, updates["batch_stats"]

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    return tx, jax.jit(step, donate_argnums=(0, 1, 2), compiler_options=compiler_options or None)


class Runner:
    """Holds one variant's state and runs (and times) one train step at a time."""

    def __init__(self, model: nn.Module, x: jax.Array, y: jax.Array, compiler_options: dict):
        variables = model.init(jax.random.key(0), x[:2], train=False)
        tx, self.step = make_step(model, compiler_options)
        self.state = (variables["params"], variables["batch_stats"])
        self.state += (tx.init(variables["params"]),)
        self.x, self.y = x, y
        self.hlo = self.step.lower(*self.state, x, y).compile().as_text()

    def run(self) -> tuple[float, float]:
        """One step: (wall seconds, CPU seconds of this process, all threads)."""
        start, cpu_start = time.perf_counter(), time.process_time()
        params, stats, opt, loss = self.step(*self.state, self.x, self.y)
        loss.block_until_ready()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        self.state = (params, stats, opt)
        return elapsed, cpu


def hlo_summary(hlo: str) -> dict:
    """Counts of fusions and reductions in an optimized HLO module (entry + fusions)."""
    return {
        "fusions": hlo.count(" fusion("),
        "reduce_ops": hlo.count(" reduce("),
        "convert_ops": hlo.count(" convert("),
    }


def zoo_model(name: str) -> Callable[[str, int], nn.Module]:
    """The model zoo's network with norm "batch" (kind "bn") or "ghost" (kind "gbn")."""
    from gbn_jax import models

    def build(kind: str, ghost: int) -> nn.Module:
        norm = "batch" if kind == "bn" else "ghost"
        return models.get_model(name, num_classes=10, norm=norm, ghost_batch_size=ghost)

    return build


def local_model(cls: type[nn.Module]) -> Callable[[str, int], nn.Module]:
    """A model of this file with nn.BatchNorm ("bn") or GhostBatchNorm ("gbn")."""

    def build(kind: str, ghost: int) -> nn.Module:
        if kind == "bn":
            return cls(norm=functools.partial(nn.BatchNorm, momentum=0.9))
        return cls(norm=functools.partial(GhostBatchNorm, momentum=0.9, ghost_batch_size=ghost))

    return build


MODELS = {  # name: (builder, batch, ghost, example shape)
    "f1": (local_model(F1), 4096, 128, (784,)),
    "conv": (local_model(SmallConv), 1024, 128, (32, 32, 3)),
    "resnet44": (zoo_model("resnet_cifar"), 256, 32, (32, 32, 3)),
    "wrn16_4": (zoo_model("wide_resnet"), 64, 16, (32, 32, 3)),
}


def options_sets() -> dict[str, dict]:
    from gbn_jax.steps import XLA_CPU_FAST_OPTIONS

    return {"default": {}, "trainer": dict(XLA_CPU_FAST_OPTIONS)}


def bench(name: str, options_name: str, options: dict, repeats: int, warmup: int) -> dict:
    build, batch, ghost, shape = MODELS[name]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, *shape)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, size=batch).astype(np.int32))
    runners = {kind: Runner(build(kind, ghost), x, y, options) for kind in ("bn", "gbn")}
    for _ in range(warmup):
        for r in runners.values():
            r.run()
    load_before = os.getloadavg()[0]
    times = {kind: [] for kind in runners}
    cpu_times = {kind: [] for kind in runners}
    desc = f"{name} {options_name} (batch {batch}, ghost {ghost})"
    for _ in tqdm(range(repeats), desc=desc, leave=False):
        order = list(runners)
        random.shuffle(order)
        for kind in order:
            wall, cpu = runners[kind].run()
            times[kind].append(wall)
            cpu_times[kind].append(cpu)
    bn_ms = 1e3 * statistics.median(times["bn"])
    gbn_ms = 1e3 * statistics.median(times["gbn"])
    paired = [g / b for g, b in zip(times["gbn"], times["bn"], strict=True)]
    paired_cpu = [g / b for g, b in zip(cpu_times["gbn"], cpu_times["bn"], strict=True)]
    return {
        "model": name,
        "options": options_name,
        "compiler_options": options,
        "batch": batch,
        "ghost": ghost,
        "bn_ms": bn_ms,
        "gbn_ms": gbn_ms,
        "ratio": gbn_ms / bn_ms,
        "median_paired_ratio": statistics.median(paired),
        "paired_ratio_quartiles": timing.quartiles(paired),
        "cpu_ratio": statistics.median(cpu_times["gbn"]) / statistics.median(cpu_times["bn"]),
        "median_paired_cpu_ratio": statistics.median(paired_cpu),
        "paired_cpu_ratio_quartiles": timing.quartiles(paired_cpu),
        "repeats": repeats,
        "load_average_1min": (load_before, os.getloadavg()[0]),
        "hlo": {kind: hlo_summary(r.hlo) for kind, r in runners.items()},
        "bn_times_ms": [1e3 * t for t in times["bn"]],
        "gbn_times_ms": [1e3 * t for t in times["gbn"]],
        "bn_cpu_ms": [1e3 * t for t in cpu_times["bn"]],
        "gbn_cpu_ms": [1e3 * t for t in cpu_times["gbn"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--models", default="f1,conv,resnet44,wrn16_4")
    parser.add_argument("--options", default="default,trainer")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    random.seed(0)
    sets = options_sets()
    rows = [
        bench(name, opt, sets[opt], args.repeats, args.warmup)
        for name in args.models.split(",")
        for opt in args.options.split(",")
    ]
    cells = []
    for r in rows:
        q1, q3 = r["paired_ratio_quartiles"]
        c1, c3 = r["paired_cpu_ratio_quartiles"]
        cells.append(
            [
                *(r["model"], r["batch"], r["ghost"], r["options"]),
                f"{r['bn_ms']:.1f}",
                f"{r['gbn_ms']:.1f}",
                f"{r['ratio']:.3f}",
                f"{r['median_paired_ratio']:.3f} [{q1:.3f}, {q3:.3f}]",
                f"{r['cpu_ratio']:.3f}, {r['median_paired_cpu_ratio']:.3f} [{c1:.3f}, {c3:.3f}]",
                "-".join(f"{v:.1f}" for v in sorted(r["load_average_1min"])),
                r["repeats"],
            ]
        )
    header = [
        *("model", "batch", "ghost", "XLA options", "BN ms", "GBN ms", "GBN/BN"),
        *("paired median [quartiles]", "CPU-time GBN/BN, paired [quartiles]", "load avg"),
        "repeats",
    ]
    table = tables.markdown_table(header, cells)
    print(table)
    if args.no_write:
        return
    meta = {
        **provenance.provenance(),
        "command": provenance.module_command(MODULE),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "jax_devices": [str(d) for d in jax.devices()],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_ghost_norm.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    md = [
        "# GhostBatchNorm vs nn.BatchNorm: train-step time",
        "",
        f"Command: `{meta['command']}`  ",
        f"Hardware: {meta['hardware']['cpu']}, {meta['hardware']['cpu_count']} CPU cores "
        f"({meta['hardware']['platform']}); jax {jax.__version__}, flax {flax.__version__}.",
        "",
        "Median wall time of one jitted train step (forward, backward, SGD update, donated "
        "buffers) over interleaved repeats; 'paired median' is the median of per-repeat "
        "GBN/BN ratios, with their quartiles; the CPU-time columns do the same with the "
        "process's CPU time (all threads), which waiting for a core under load does not "
        "inflate; 'load avg' is the 1-minute load average before and after the timed "
        "repeats (the machine is shared with other jobs).",
        "",
        table,
        "",
        NOTES,
    ]
    (RESULTS / "bench_ghost_norm.md").write_text("\n".join(md))


if __name__ == "__main__":
    from gbn_jax import host_memory

    host_memory.reexec_with_huge_pages()  # As the CLI does: huge pages for XLA's buffers.
    main()
