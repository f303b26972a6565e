"""Train-step time of GhostBatchNorm vs flax.linen.BatchNorm, side by side in one run.

Each model is built twice, identical except for its normalization layer (nn.BatchNorm,
or GhostBatchNorm), and its train step (forward, backward, SGD with momentum) is jitted
with plain ``jax.jit``, as a user's own training script would, in four cases: buffers
donated (``donate_argnums``) or not, under XLA's default compiler options or under the
trainer's CPU options (``gbn_jax.trainer.steps.XLA_CPU_FAST_OPTIONS``). The process keeps the
malloc it was started with (glibc's default, unless ``GLIBC_TUNABLES`` says otherwise;
the JSON records it) and sets up no huge pages of its own.

A third layer, the control, is GhostBatchNorm with one ghost batch (ghost size = the
batch): it separates what the grouping costs from what the rest of the layer's program
costs. All steps of a model (3 layers x the cases timed, 4 by default) are timed in
interleaved rounds, the order rotating every round, so that load from other jobs hits
every variant alike.
Per case the tables report the median step times, the GBN/BN ratio of each round (its
median, quartiles and range, for wall time and for the process's CPU time) and how many
cores each variant keeps busy.

Models:
  f1:       MNIST-sized MLP, 784 -> 5 x [Dense 512, BN, ReLU] -> Dense 10, batch 4096,
            ghost 128 (Keskar et al.'s F1, the paper's Table 1 first row); defined here.
  conv:     32x32x3 -> 3 x [Conv3x3, BN, ReLU, (pool)] -> Dense 10, batch 1024, ghost
            128; defined here.
  resnet44: the model zoo's ResNet-44 (gbn_jax.models, norm="batch" / "ghost"),
            batch 256, ghost 32.
  wrn16_4:  the model zoo's WRN-16-4, batch 64, ghost 16.

Usage (from the repository root):
  .venv/bin/python -m experiments.bench.ghost_norm_overhead            # f1, conv; writes results
  .venv/bin/python -m experiments.bench.ghost_norm_overhead --rounds 3 --no-write   # smoke run
  .venv/bin/python -m experiments.bench.ghost_norm_overhead --models resnet44,wrn16_4

  .venv/bin/python -m experiments.bench.ghost_norm_overhead --options default \
      --rounds 50 --steps 3 --name bench_ghost_norm_xla_defaults   # XLA's defaults only

Writes experiments/results/bench_ghost_norm.{md,json} (``--name`` changes the stem).

References:
  Hoffer et al. 2017, Section 4 (Ghost Batch Normalization), Section 5 (F1, batch 4096,
  ghost batch 128).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.harness import provenance, tables, timing
from experiments.harness.provenance import RESULTS_DIR
from gbn_jax.ghost_norm import GhostBatchNorm
from gbn_jax.trainer import steps

MODULE = "experiments.bench.ghost_norm_overhead"
RESULTS_STEM = str(RESULTS_DIR / "bench_ghost_norm")
OPTIONS = {"default": {}, "trainer": dict(steps.XLA_CPU_FAST_OPTIONS)}
CASES = tuple((donate, options) for donate in (True, False) for options in OPTIONS)
# "gbn_one" is the control: GhostBatchNorm with one ghost batch (ghost size = batch), the
# layer's program with nn.BatchNorm's whole-batch reductions; it tells what the grouping
# costs apart from the rest of the layer.
KINDS = ("bn", "gbn", "gbn_one")
# The rule, fixed before the runs, for the claim "GBN's step takes at most TARGET times
# BN's": it holds when the 95% confidence interval of the median per-round ratio lies at
# or below TARGET, is contradicted when it lies above, and is undetermined otherwise.
TARGET = 1.03

NOTES = """\
## Reading the numbers

The machine is a 2-core VM whose neighbours' load (and any job of ours, the load average
in the header) varies, so absolute times move from run to run and single steps vary by
20% or more. The variants of a model are
interleaved round by round, so the per-round GBN/BN ratios are what to read; CPU time
(this process's, all threads) is less inflated by waiting for a core than wall time.

## Where the cores go, and a control

'Cores busy' is a variant's median CPU time over its median wall time: a step that does
the same work as another in more wall time keeps fewer cores busy. The control is
GhostBatchNorm with one ghost batch (ghost size = batch): the layer's program (its
custom JVP rule and fusions) with whole-batch reductions, as nn.BatchNorm's. Where GBN
is slower than BN and the control is not, the grouping costs the time; where both are,
the rest of the layer's program does.

{control}

{where}
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


def make_step(model: nn.Module, compiler_options: dict, donate: bool):
    """A jitted SGD train step; ``donate`` donates parameters, statistics and optimizer state."""
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

    donated = (0, 1, 2) if donate else ()
    return tx, jax.jit(step, donate_argnums=donated, compiler_options=compiler_options or None)


class Runner:
    """One variant's state; ``call`` runs one train step and records its CPU time."""

    def __init__(
        self, model: nn.Module, x: jax.Array, y: jax.Array, compiler_options: dict, donate: bool
    ):
        variables = model.init(jax.random.key(0), x[:2], train=False)
        tx, self.step = make_step(model, compiler_options, donate)
        self.state = (variables["params"], variables["batch_stats"])
        self.state += (tx.init(variables["params"]),)
        self.x, self.y = x, y
        compiled = self.step.lower(*self.state, x, y).compile()
        self.hlo_text = compiled.as_text()
        self.hlo = hlo_summary(self.hlo_text, compiled.memory_analysis().temp_size_in_bytes)
        self.cpu_times: list[float] = []

    def call(self) -> None:
        cpu_start = time.process_time()
        params, stats, opt, loss = self.step(*self.state, self.x, self.y)
        loss.block_until_ready()
        self.cpu_times.append(time.process_time() - cpu_start)
        self.state = (params, stats, opt)


def entry_computation(hlo: str) -> str:
    """The entry computation of a compiled module's text (its ops in schedule order)."""
    entry = hlo[hlo.index("\nENTRY") :]
    return entry[: entry.index("\n}")]


def hlo_summary(hlo: str, temp_bytes: int, big: int = 2**20) -> dict:
    """What the compiled step does, counting arrays of at least ``big`` elements (an
    activation) as full-size: fusions and reductions; ops of the entry computation that
    write a full-size array (passes over activations); full-size copies and transposes
    anywhere, inside fusions too (data movement); the temporary bytes of one step
    (``temp_bytes``, from the compiled step's memory analysis)."""
    entry = entry_computation(hlo)
    op = re.compile(r"^\s*(?:ROOT )?%\S+ = \w+\[([\d,]*)\]\S* ([\w-]+)\(", re.M)

    def full_size(dims: str) -> bool:
        return math.prod(int(d) for d in dims.split(",") if d) >= big

    writes: dict[str, int] = {}
    for dims, kind in op.findall(entry):
        if kind not in ("bitcast", "parameter", "get-tuple-element") and full_size(dims):
            writes[kind] = writes.get(kind, 0) + 1
    moves = [k for dims, k in op.findall(hlo) if k in ("copy", "transpose") and full_size(dims)]
    return {
        "fusions": hlo.count(" fusion("),
        "reduce_ops": hlo.count(" reduce("),
        "full_size_writes": sum(writes.values()),
        "full_size_writes_by_op": writes,
        "full_size_copies": moves.count("copy"),
        "full_size_transposes": moves.count("transpose"),
        "temp_bytes": temp_bytes,
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


def case_name(donate: bool, options: str) -> str:
    return f"{'donated' if donate else 'not donated'}, {options}"


def paired_ratios(gbn: list[list[float]], bn: list[list[float]]) -> list[float]:
    """GBN/BN of each round, from the median step time of each variant in that round."""
    return [statistics.median(g) / statistics.median(b) for g, b in zip(gbn, bn, strict=True)]


def ratio_summary(ratios: list[float]) -> dict:
    """``timing.spread`` of per-round ratios, their median's 95% interval and the verdict."""
    low, high = timing.median_interval(ratios)
    verdict = "holds" if high <= TARGET else "contradicted" if low > TARGET else "undetermined"
    return {**timing.spread(ratios), "ci95": (low, high), "verdict": verdict}


def bench(
    name: str, rounds: int, steps_per_round: int, warmup: int, cases: tuple = CASES
) -> list[dict]:
    """Times one model's variants (3 layers x each of ``cases``) interleaved; one row per case."""
    build, batch, ghost, shape = MODELS[name]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, *shape)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, size=batch).astype(np.int32))
    runners, variants = {}, []
    for donate, options in cases:
        for kind in KINDS:
            key = (donate, options, kind)
            # Traced as the trainer traces its programs under these options (the
            # convolution-input barriers of models.base go with the trainer's options).
            with steps.tracing(OPTIONS[options]):
                size = batch if kind == "gbn_one" else ghost  # BN ignores it
                model = build("bn" if kind == "bn" else "gbn", size)
                runners[key] = runner = Runner(model, x, y, OPTIONS[options], donate)
                for _ in range(warmup):
                    runner.call()
            runner.cpu_times.clear()
            run = functools.partial(lambda r, n: timing.time_calls(r.call, n), runner)
            variants.append(timing.Variant(f"{case_name(donate, options)}/{kind}", run, {}))
    load = os.getloadavg()
    times = timing.interleave(variants, rounds, steps_per_round, f"{name} (batch {batch})")
    load_end = os.getloadavg()
    rows = []
    for donate, options in cases:
        case = case_name(donate, options)
        wall = {kind: times[f"{case}/{kind}"] for kind in KINDS}
        cpu = {}
        for kind in KINDS:
            flat, n = runners[(donate, options, kind)].cpu_times, steps_per_round
            cpu[kind] = [flat[i : i + n] for i in range(0, len(flat), n)]
        rows.append(
            {
                "model": name,
                "batch": batch,
                "ghost": ghost,
                "donated": donate,
                "options": options,
                "compiler_options": OPTIONS[options],
                "bn_ms": 1e3 * pooled_median(wall["bn"]),
                "gbn_ms": 1e3 * pooled_median(wall["gbn"]),
                "ratio": ratio_summary(paired_ratios(wall["gbn"], wall["bn"])),
                "cpu_ratio": ratio_summary(paired_ratios(cpu["gbn"], cpu["bn"])),
                "one_ghost_ms": 1e3 * pooled_median(wall["gbn_one"]),
                "one_ghost_ratio": ratio_summary(paired_ratios(wall["gbn_one"], wall["bn"])),
                "one_ghost_cpu_ratio": ratio_summary(paired_ratios(cpu["gbn_one"], cpu["bn"])),
                "cores_busy": {k: pooled_median(cpu[k]) / pooled_median(wall[k]) for k in KINDS},
                "rounds": rounds,
                "steps_per_round": steps_per_round,
                "load_average_start": load,
                "load_average_end": load_end,
                "hlo": {k: runners[(donate, options, k)].hlo for k in KINDS},
                "wall_ms": {k: [[1e3 * t for t in r] for r in wall[k]] for k in KINDS},
                "cpu_ms": {k: [[1e3 * t for t in r] for r in cpu[k]] for k in KINDS},
            }
        )
    return rows


def pooled_median(rounds: list[list[float]]) -> float:
    """The median of every step time of every round."""
    return statistics.median(t for r in rounds for t in r)


def interval_cell(s: dict) -> str:
    """A ``ratio_summary``'s 95% interval of the median and its verdict."""
    return "[{:.3f}, {:.3f}] {}".format(*s["ci95"], s["verdict"])


def case_cells(r: dict) -> list[str]:
    """The first three cells of every table's row: model (batch, ghost), donated, options."""
    return [
        f"{r['model']} ({r['batch']}, {r['ghost']})",
        "yes" if r["donated"] else "no",
        r["options"],
    ]


def table(rows: list[dict]) -> str:
    def ratio_cell(s: dict) -> str:
        return f"{s['median']:.3f} [{s['q1']:.3f}, {s['q3']:.3f}] ({s['min']:.2f}-{s['max']:.2f})"

    cells = [
        [
            *case_cells(r),
            f"{r['bn_ms']:.1f}",
            f"{r['gbn_ms']:.1f}",
            ratio_cell(r["ratio"]),
            interval_cell(r["ratio"]),
            ratio_cell(r["cpu_ratio"]),
            interval_cell(r["cpu_ratio"]),
            r["rounds"],
        ]
        for r in rows
    ]
    header = [
        *("model (batch, ghost)", "donated", "XLA options", "BN ms", "GBN ms"),
        "GBN/BN wall: median [quartiles] (range)",
        f"wall: median's 95% CI, GBN/BN <= {TARGET}",
        "GBN/BN CPU time",
        f"CPU: median's 95% CI, GBN/BN <= {TARGET}",
        "rounds",
    ]
    return tables.markdown_table(header, cells)


def control_table(rows: list[dict]) -> str:
    """Per case: the cores each variant keeps busy, and the control (one ghost batch) against BN."""

    def cell(s: dict) -> str:
        return f"{s['median']:.3f} {interval_cell(s)}"

    cells = [
        [
            *case_cells(r),
            " / ".join(f"{r['cores_busy'][k]:.2f}" for k in KINDS),
            f"{r['one_ghost_ms']:.1f}",
            cell(r["one_ghost_ratio"]),
            cell(r["one_ghost_cpu_ratio"]),
        ]
        for r in rows
    ]
    header = [
        *("model (batch, ghost)", "donated", "XLA options"),
        "cores busy: BN / GBN / GBN, one ghost batch",
        "GBN, one ghost batch: ms",
        "its ratio to BN, wall: median [95% CI]",
        "CPU time: median [95% CI]",
    ]
    return tables.markdown_table(header, cells)


def hlo_table(rows: list[dict]) -> str:
    """BN against GBN per case: what XLA compiled (from ``hlo_summary``)."""

    def pair(r: dict, key: str) -> str:
        return f"{r['hlo']['bn'][key]} / {r['hlo']['gbn'][key]}"

    cells = [
        [
            *case_cells(r),
            pair(r, "fusions"),
            pair(r, "full_size_writes"),
            pair(r, "reduce_ops"),
            f"{pair(r, 'full_size_copies')}; {pair(r, 'full_size_transposes')}",
            "{:.1f} / {:.1f}".format(*(r["hlo"][k]["temp_bytes"] / 1e6 for k in ("bn", "gbn"))),
        ]
        for r in rows
    ]
    header = [
        *("model (batch, ghost)", "donated", "XLA options", "fusions"),
        *("full-size writes", "reduce ops", "full-size copies; transposes", "temp MB"),
    ]
    return tables.markdown_table(header, cells)


WHERE_THE_TIME_GOES = """\
## Where the time goes

The compiled steps, BN / GBN ("full-size writes": ops of the step's entry computation
that write an array of at least 2**20 elements, i.e. one pass over an activation;
copies and transposes of arrays that size anywhere in the module, inside fusions too):

{hlo_table}

- The ghost batches cost no data movement. The sums read the input split into ghost
  batches, (B, ...) -> (k, B/k, ...), a reshape that keeps the row-major order and
  compiles to a bitcast; GBN's step has no copy or transpose that BN's lacks (the
  transposes of both are the weight-gradient layouts of the convolutions). The
  per-ghost-batch statistics are broadcast inside the elementwise fusions, as
  nn.BatchNorm's are; those passes run on the input's own layout, each example with its
  ghost batch's statistics (the layer's default, `layout="input"`).
- GBN's step makes fewer passes over activations than BN's. The derivative is a
  custom JVP rule whose transpose is one fused reduction of (dy, dy * (x - mean)) per
  ghost batch and one elementwise pass for dx; autodiff of nn.BatchNorm materializes
  more intermediates in its backward pass. The temporary memory of a step (last
  column) is what glibc's default malloc hands back to the system and faults in afresh
  every step (blocks above its mmap threshold), so a step with less of it touches fewer
  new pages.
- The rest of the step (dense layers, convolutions, pooling, the loss, the optimizer)
  is the same HLO in both variants; how XLA:CPU schedules it around the normalization
  (which independent ops run at the same time on the two cores) may differ:
  `python -m experiments.bench.conv_step_profile` profiles the conv net's step op by op.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=1, help="steps per variant and round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--models", default="f1,conv")
    parser.add_argument(
        "--options", default=",".join(OPTIONS), help="XLA option sets to time: default,trainer"
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--name", default=Path(RESULTS_STEM).name, help="the record's file stem")
    args = parser.parse_args(argv)
    unknown = set(args.options.split(",")) - set(OPTIONS)
    if unknown:
        parser.error(f"--options {args.options!r}: unknown {sorted(unknown)}; use {list(OPTIONS)}")
    cases = tuple(c for c in CASES if c[1] in args.options.split(","))
    env = provenance.environment(MODULE, args)
    rows = [
        row
        for name in args.models.split(",")
        for row in bench(name, args.rounds, args.steps, args.warmup, cases)
    ]
    if args.no_write:
        print(table(rows))
        return
    env["load_average_end"] = os.getloadavg()
    tables.write_outputs(
        str(RESULTS_DIR / args.name), {"environment": env, "rows": rows}, document(env, rows)
    )


def document(env: dict, rows: list[dict]) -> str:
    """The record's markdown, from its environment and rows (the JSON record)."""
    malloc = env["glibc_tunables"] or "glibc default (no GLIBC_TUNABLES)"
    return tables.document(
        "# GhostBatchNorm vs nn.BatchNorm: train-step time",
        f"Command: `{env['command']}`  \n{tables.environment_line(env)}  \n"
        f"Date: {env['date']}; malloc: {malloc}.",
        "One train step (forward, backward, SGD with momentum) jitted with plain `jax.jit`, "
        "per model and case: buffers donated or not, XLA's default options or the "
        "trainer's (`steps.XLA_CPU_FAST_OPTIONS`). 'BN ms' and 'GBN ms' are median step "
        "times; the ratio columns give the median of the per-round GBN/BN ratios, their "
        "quartiles and their range, for wall time and for the process's CPU time, and "
        "the distribution-free 95% confidence interval of that median (sign test) with "
        f"the verdict on GBN/BN <= {TARGET} by the rule fixed before the runs: holds if "
        "the interval lies at or below it, contradicted if above, else undetermined.",
        table(rows),
        NOTES.format(
            control=control_table(rows),
            where=WHERE_THE_TIME_GOES.format(hlo_table=hlo_table(rows)),
        ).strip(),
    )


if __name__ == "__main__":
    main()
