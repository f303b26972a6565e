"""Where the conv net's train step spends its wall time, op by op, per normalization layer.

Profiles (``jax.profiler``) the train step of ``ghost_norm_overhead``'s conv net (batch
1024) at XLA's default options with donated buffers, built with nn.BatchNorm, with
GhostBatchNorm (ghost 128) and with the control (GhostBatchNorm, one ghost batch), the
three interleaved round by round. From the trace of each step it takes the wall time, the
time during which exactly one op of the step ran (one core working, the other idle or
busy elsewhere), and, for each convolution's weight gradient, its run time and the part
of it that no other op of the step overlapped. It also lists where XLA's schedule put
each weight-gradient convolution (the ops of the entry computation just before and after
it): the thunk runtime of XLA:CPU runs the ops of a step in that order on the thread that
finished their inputs, so an op scheduled right behind a long single-threaded one waits
for it.

Usage (from the repository root):
  .venv/bin/python -m experiments.bench.conv_step_profile            # writes results
  .venv/bin/python -m experiments.bench.conv_step_profile --rounds 2 --no-write

Writes experiments/results/bench_conv_step_profile.{md,json} (``--name`` changes the stem).
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from experiments.bench import ghost_norm_overhead as overhead
from experiments.harness import provenance, tables
from experiments.harness.provenance import RESULTS_DIR

MODULE = "experiments.bench.conv_step_profile"
RESULTS_STEM = str(RESULTS_DIR / "bench_conv_step_profile")
KINDS = {"bn": "nn.BatchNorm", "gbn": "GhostBatchNorm", "gbn_one": "one ghost batch"}
STEP = "train_step"  # the trace annotation around each step


def entry_ops(hlo: str) -> list[tuple[str, str, str]]:
    """(name, output shape, what it calls or its opcode) of the entry computation's ops,
    in the order XLA scheduled them."""
    ops = []
    for line in overhead.entry_computation(hlo).splitlines():
        op = re.match(r"\s*(?:ROOT )?%(\S+) = (\S+\[[\d,]*\])\S* ([\w-]+)\(", line)
        if op:
            calls = re.search(r"calls=%([\w.\-]+)", line)
            ops.append((op[1], op[2], calls[1] if calls else op[3]))
    return ops


def weight_gradients(hlo: str, kernels: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """Layer name -> the entry op that computes its kernel's gradient: a convolution (or a
    fusion calling one) whose output has the kernel's dimensions in some order."""
    bodies = dict(re.findall(r"^%([\w.\-]+) .*?\{\n(.*?)\n\}", hlo, re.M | re.S))
    found = {}
    for name, shape, calls in entry_ops(hlo):
        dims = sorted(int(d) for d in shape[shape.index("[") + 1 : -1].split(",") if d)
        convolves = calls == "convolution" or " convolution(" in bodies.get(calls, "")
        for layer, kernel in kernels.items():
            if convolves and dims == sorted(kernel):
                found[layer] = name
    return found


def schedule_neighbours(hlo: str, op: str) -> str:
    """The entry ops scheduled just before and after ``op``, with their output shapes
    (parameters and bitcasts left out)."""
    ops = [(n, shape) for n, shape, kind in entry_ops(hlo) if kind not in ("parameter", "bitcast")]
    i = [n for n, _ in ops].index(op)
    return " -> ".join(f"{n} {shape}" for n, shape in ops[max(i - 1, 0) : i + 2])


def step_profile(events: list[dict], ops: set[str], wgrads: dict[str, str]) -> list[dict]:
    """Per traced step: wall ms, ms with exactly one op running, and per weight gradient
    its ms and the ms no other op overlapped."""
    steps = sorted((e for e in events if e["name"] == STEP), key=lambda e: e["ts"])
    spans = [e for e in events if e["name"] in ops]
    out = []
    for s in steps:
        t0, t1 = s["ts"], s["ts"] + s["dur"]
        mine = [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in spans if t0 <= e["ts"] < t1]
        cuts = sorted({t0, t1, *(a for a, _, _ in mine), *(b for _, b, _ in mine)})
        alone: dict[str, float] = {}
        one = 0.0
        for a, b in itertools.pairwise(cuts):
            running = [n for lo, hi, n in mine if lo <= (a + b) / 2 < hi]
            if len(running) == 1:
                one += b - a
                alone[running[0]] = alone.get(running[0], 0.0) + b - a
        busy = {n: sum(hi - lo for lo, hi, m in mine if m == n) for n in wgrads.values()}
        out.append(
            {
                "wall_ms": s["dur"] / 1e3,
                "one_op_ms": one / 1e3,
                "op_ms_per_wall_ms": sum(hi - lo for lo, hi, _ in mine) / s["dur"],
                "weight_gradients_ms": sum(busy.values()) / 1e3,
                "weight_gradients_alone_ms": sum(alone.get(n, 0.0) for n in busy) / 1e3,
                "weight_gradients": {
                    layer: {"ms": busy[op] / 1e3, "alone_ms": alone.get(op, 0.0) / 1e3}
                    for layer, op in wgrads.items()
                },
            }
        )
    return out


def traced_steps(runner: overhead.Runner, n: int) -> list[dict]:
    """The trace events of ``n`` steps of ``runner``."""
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        for _ in range(n):
            with jax.profiler.TraceAnnotation(STEP):
                runner.call()
        jax.profiler.stop_trace()
        (trace,) = Path(d).rglob("*perfetto_trace.json.gz")
        with gzip.open(trace) as f:
            data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X"]


def bench(rounds: int, steps: int, warmup: int) -> list[dict]:
    build, batch, ghost, shape = overhead.MODELS["conv"]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, *shape)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, size=batch).astype(np.int32))
    variants = {}
    for kind in KINDS:
        runner = overhead.Runner(build(kind, batch if kind == "gbn_one" else ghost), x, y, {}, True)
        hlo = runner.hlo_text
        kernels = {
            "/".join(str(getattr(k, "key", k)) for k in path[:-1]): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(runner.state[0])
            if str(getattr(path[-1], "key", "")) == "kernel" and leaf.ndim == 4
        }
        wgrads = weight_gradients(hlo, kernels)
        for _ in range(warmup):
            runner.call()
        ops = {name for name, _, _ in entry_ops(hlo)}
        variants[kind] = (runner, hlo, ops, wgrads, [])
    kinds = list(KINDS)
    for r in tqdm(range(rounds), desc="conv step profile"):
        for kind in kinds[r % len(kinds) :] + kinds[: r % len(kinds)]:
            runner, _, ops, wgrads, profiles = variants[kind]
            profiles += step_profile(traced_steps(runner, steps), ops, wgrads)
    rows = []
    for kind, (_, hlo, _, wgrads, profiles) in variants.items():
        med = lambda key, p=profiles: statistics.median(s[key] for s in p)
        layers = {
            layer: {
                "op": op,
                "scheduled": schedule_neighbours(hlo, op),
                "ms": statistics.median(s["weight_gradients"][layer]["ms"] for s in profiles),
                "alone_ms": statistics.median(
                    s["weight_gradients"][layer]["alone_ms"] for s in profiles
                ),
            }
            for layer, op in wgrads.items()
        }
        rows.append(
            {
                "kind": kind,
                "wall_ms": med("wall_ms"),
                "one_op_ms": med("one_op_ms"),
                "op_ms_per_wall_ms": med("op_ms_per_wall_ms"),
                "weight_gradients_ms": med("weight_gradients_ms"),
                "weight_gradients_alone_ms": med("weight_gradients_alone_ms"),
                "weight_gradients": layers,
                "steps": profiles,
            }
        )
    return rows


def summary_table(rows: list[dict]) -> str:
    cells = [
        [
            KINDS[r["kind"]],
            f"{r['wall_ms']:.1f}",
            f"{r['one_op_ms']:.1f}",
            f"{r['op_ms_per_wall_ms']:.2f}",
            f"{r['weight_gradients_ms']:.1f}",
            f"{r['weight_gradients_alone_ms']:.1f}",
        ]
        for r in rows
    ]
    header = [
        *("layer", "step ms", "ms with one op running", "op ms per wall ms"),
        *("weight-gradient convs: ms", "of which no other op ran"),
    ]
    return tables.markdown_table(header, cells)


def schedule_table(rows: list[dict]) -> str:
    cells = [
        [KINDS[r["kind"]], layer, f"{w['ms']:.1f}", f"{w['alone_ms']:.1f}", f"`{w['scheduled']}`"]
        for r in rows
        for layer, w in sorted(r["weight_gradients"].items())
    ]
    header = ["layer", "convolution", "weight gradient ms", "no other op ran", "scheduled"]
    return tables.markdown_table(header, cells)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per variant and round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--name", default=Path(RESULTS_STEM).name, help="the record's file stem")
    args = parser.parse_args(argv)
    env = provenance.environment(MODULE, args)
    start = time.time()
    rows = bench(args.rounds, args.steps, args.warmup)
    env["load_average_end"] = os.getloadavg()
    env["wall_s"] = time.time() - start
    text = "\n\n".join((summary_table(rows), schedule_table(rows)))
    if args.no_write:
        print(text)
        return
    markdown = tables.document(
        "# The conv net's train step, op by op",
        f"Command: `{env['command']}`  \n{tables.environment_line(env)}  \n"
        f"Date: {env['date']}; commit {env.get('commit')}.",
        "The train step of the conv net of `ghost_norm_overhead` (batch 1024, ghost 128; "
        "plain `jax.jit`, XLA's default options, donated buffers), profiled with "
        "`jax.profiler`, the three layers interleaved round by round. Medians over the "
        f"{args.rounds * args.steps} profiled steps of each layer. 'Ms with one op "
        "running': the part of the step during which exactly one op of it ran; 'op ms per "
        "wall ms': the ops' summed run time over the step's wall time (2 on two busy "
        "cores). Profiling adds its own overhead, so the step times run longer than "
        "unprofiled ones.",
        summary_table(rows),
        "Each convolution's weight gradient (a single-threaded YNNPACK convolution at "
        "these options), the part of it that no other op overlapped, and the entry ops "
        "XLA scheduled just before and after it:",
        schedule_table(rows),
    )
    tables.write_outputs(str(RESULTS_DIR / args.name), {"environment": env, "rows": rows}, markdown)


if __name__ == "__main__":
    main()
