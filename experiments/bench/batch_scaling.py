"""Cost growth with the batch size, and time to a target accuracy with and without RA.

Part A (cost growth): the project's F1 train step (GhostBatchNorm, ghost 128, and
nn.BatchNorm for reference) at batch 128 ... 8192: median step time, examples/s and
XLA's compiled memory footprint (arguments + outputs + temporaries, and the generated
code) from ``compiled.memory_analysis()``. The batch sizes are timed interleaved.

Part B (a small Shallue-style curve): F1 on Fashion-MNIST with the paper's large-batch
recipe (sqrt LR scaling + GBN ghost 128) at several batch sizes, with and without
regime adaptation, run until the test accuracy reaches ``--target``. The base (|B_S| =
128) regime is a shortened F1 regime: LR 0.1 for one epoch, then 0.01 for one more,
momentum 0.9, weight decay 1e-4, clipping at 5. Without RA a batch of B keeps the 2
epochs (fewer steps); with RA it gets (B/128) x 2 epochs and the LR drop moves to the
same step as in the SB run. Reported: steps, examples seen and training wall time
(evaluation excluded) until the target, or "not reached" within the run's budget or
the wall-time cap ``--max-seconds``. Test accuracy is measured every quarter epoch.

Usage (the README numbers; ~12 minutes on the 2-core CPU machine):
  .venv/bin/python -m experiments.bench.batch_scaling

References:
  Hoffer, Hubara & Soudry (2017), sections 4-5; Shallue et al. (2019), "Measuring
  the effects of data parallelism on neural network training" (steps to target).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from typing import Any

import numpy as np
from tqdm import tqdm

from experiments.harness import provenance, tables, timing
from experiments.harness.provenance import RESULTS_DIR

BATCHES_A = (128, 256, 512, 1024, 2048, 4096, 8192)
BATCHES_B = (128, 512, 2048, 8192)
BASE_REGIME = dict(
    reference_batch_size=128,
    epochs=2,
    lr_schedule=((0, 0.1), (1, 0.01)),
    momentum=0.9,
    weight_decay=1e-4,
    grad_clip_norm=5.0,
    lr_scaling="sqrt",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ghost", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds (part A)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per round (part A)")
    p.add_argument("--target", type=float, default=0.85, help="test accuracy to reach")
    p.add_argument("--max-seconds", type=float, default=75.0, help="training cap per run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-a", action="store_true")
    p.add_argument("--skip-b", action="store_true")
    p.add_argument("--out", default=str(RESULTS_DIR / "bench_scaling"))
    return p.parse_args(argv)


def mesh_shardings():
    """(replicated, batch) NamedShardings on a 1-D "data" mesh of every device."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    return NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))


def build(norm: str, regime_config: dict, num_train: int, ghost: int) -> dict[str, Any]:
    """Model, regime, initial state and jitted train/eval steps, as the trainer builds them."""
    import jax

    from gbn_jax import models
    from gbn_jax.trainer import regimes, steps

    replicated, batch_sharding = mesh_shardings()
    model = models.get_model(
        "f1", num_classes=10, norm=norm, ghost_batch_size=ghost if norm == "ghost" else None
    )
    regime = regimes.resolve(regime_config, num_train)
    tx = regime.optimizer()
    init = jax.jit(
        lambda rng: steps.create_train_state(rng, model, tx, (28, 28, 1)),
        out_shardings=replicated,
    )
    step = jax.jit(
        steps.make_train_step(model, tx, regime.learning_rate),
        in_shardings=(replicated, batch_sharding, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
    )
    eval_step = jax.jit(steps.make_eval_step(model))
    return dict(model=model, regime=regime, init=init, step=step, eval_step=eval_step)


# ---------------------------------------------------------------------------------------
# Part A: step time and memory against the batch size.
# ---------------------------------------------------------------------------------------


def part_a(args: argparse.Namespace) -> dict[str, Any]:
    import jax

    replicated, batch_sharding = mesh_shardings()
    runners = {}
    rng = np.random.default_rng(args.seed)
    for norm in ("ghost", "batch"):
        for batch in tqdm(BATCHES_A, desc=f"part A compile ({norm})"):
            cfg = dict(BASE_REGIME, batch_size=batch, reference_batch_size=args.ghost)
            parts = build(norm, cfg, max(60_000, batch), args.ghost)
            state = parts["init"](jax.random.key(args.seed))
            data = jax.device_put(
                {
                    "image": rng.standard_normal((batch, 28, 28, 1), np.float32),
                    "label": rng.integers(0, 10, batch).astype(np.int32),
                },
                batch_sharding,
            )
            key = jax.device_put(jax.random.key(1), replicated)
            compiled = parts["step"].lower(state, data, key).compile()
            mem = compiled.memory_analysis()
            holder = {"state": state}
            for _ in range(2):
                holder["state"], m = compiled(holder["state"], data, key)
            jax.block_until_ready(m)
            runners[(norm, batch)] = dict(
                compiled=compiled,
                holder=holder,
                data=data,
                key=key,
                memory={
                    "argument_bytes": mem.argument_size_in_bytes,
                    "output_bytes": mem.output_size_in_bytes,
                    "alias_bytes": mem.alias_size_in_bytes,
                    "temp_bytes": mem.temp_size_in_bytes,
                    "generated_code_bytes": mem.generated_code_size_in_bytes,
                },
                times=[],
            )

    def step(run: dict[str, Any]) -> None:
        run["holder"]["state"], m = run["compiled"](run["holder"]["state"], run["data"], run["key"])
        jax.block_until_ready(m["loss"])

    variants = [
        timing.Variant(
            str(k), functools.partial(timing.time_calls, functools.partial(step, run)), {}
        )
        for k, run in runners.items()
    ]
    times = timing.interleave(variants, args.repeats, args.steps, "part A timing")
    for k, run in runners.items():
        run["times"] = [t for round_times in times[str(k)] for t in round_times]
    rows = []
    for (norm, batch), run in runners.items():
        med = statistics.median(run["times"])
        mem = run["memory"]
        # Donated state aliases its output: count those bytes once.
        peak = mem["argument_bytes"] + mem["output_bytes"] - mem["alias_bytes"]
        peak += mem["temp_bytes"]
        rows.append(
            dict(
                norm=norm,
                batch=batch,
                median_step_s=med,
                examples_per_s=batch / med,
                us_per_example=med / batch * 1e6,
                peak_bytes=peak,
                **mem,
                times=run["times"],
            )
        )
    return {"rows": rows}


# ---------------------------------------------------------------------------------------
# Part B: time to a target test accuracy on Fashion-MNIST.
# ---------------------------------------------------------------------------------------


def part_b(args: argparse.Namespace) -> dict[str, Any]:
    import jax

    from gbn_jax.trainer import input_pipeline

    replicated, batch_sharding = mesh_shardings()
    info = input_pipeline.get_dataset_info("fashion_mnist")
    test = list(
        input_pipeline.create_eval_iterator(
            "fashion_mnist", global_batch_size=10_000, sharding=batch_sharding
        )
    )
    runs = []
    plan = [(b, ra) for b in BATCHES_B for ra in ((False,) if b == 128 else (False, True))]
    for batch, ra in tqdm(plan, desc="part B runs"):
        cfg = dict(BASE_REGIME, batch_size=batch, regime_adaptation=ra)
        parts = build("ghost", cfg, info.num_train, args.ghost)
        regime = parts["regime"]
        state = parts["init"](jax.random.key(args.seed))
        train_iter = input_pipeline.create_train_iterator(
            "fashion_mnist", global_batch_size=batch, seed=args.seed, sharding=batch_sharding
        )
        eval_every = max(1, regime.steps_per_epoch // 4)
        dropout_key = jax.device_put(jax.random.key(args.seed + 1), replicated)
        train_s, reached, curve, step = 0.0, None, [], 0
        while step < regime.total_steps and train_s < args.max_seconds:
            batch_data = next(train_iter)
            t = time.perf_counter()
            state, metrics = parts["step"](state, batch_data, dropout_key)
            jax.block_until_ready(metrics["loss"])
            train_s += time.perf_counter() - t
            step += 1
            if step % eval_every == 0 or step == regime.total_steps:
                sums = [parts["eval_step"](state, b) for b in test]
                correct = sum(float(s["correct"]) for s in sums)
                acc = correct / sum(float(s["count"]) for s in sums)
                curve.append(dict(step=step, train_s=train_s, test_accuracy=acc))
                if acc >= args.target:
                    reached = curve[-1]
                    break
        runs.append(
            dict(
                batch=batch,
                regime_adaptation=ra,
                lr=regime.lr_boundaries[0][1],
                total_steps=regime.total_steps,
                epochs_budget=regime.epochs,
                reached=reached,
                steps_run=step,
                train_s=train_s,
                final_accuracy=curve[-1]["test_accuracy"] if curve else None,
                curve=curve,
            )
        )
    return {"target": args.target, "runs": runs}


# ---------------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------------


def plot(record: dict[str, Any], stem: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("a", "b") if k in record]
    fig, axes = plt.subplots(1, 2 * len(panels), figsize=(6 * len(panels) * 2, 4))
    axes = list(np.atleast_1d(axes))
    if "a" in record:
        ax_t, ax_m = axes.pop(0), axes.pop(0)
        for norm, label in (("ghost", "GhostBatchNorm (128)"), ("batch", "nn.BatchNorm")):
            rows = [r for r in record["a"]["rows"] if r["norm"] == norm]
            b = [r["batch"] for r in rows]
            ax_t.plot(b, [r["us_per_example"] for r in rows], "o-", label=label)
            ax_m.plot(b, [r["peak_bytes"] / 2**20 for r in rows], "o-", label=label)
        ax_t.set(xscale="log", xlabel="batch size", ylabel="step time per example (us)")
        ax_t.set_title("F1 train step: cost per example")
        ax_m.set(xscale="log", yscale="log", xlabel="batch size", ylabel="XLA footprint (MiB)")
        ax_m.set_title("F1 train step: compiled memory")
        ax_t.legend()
        ax_m.legend()
    if "b" in record:
        ax_s, ax_w = axes.pop(0), axes.pop(0)
        for ra, marker in ((False, "o--"), (True, "s-")):
            runs = [
                r for r in record["b"]["runs"] if r["regime_adaptation"] == ra or r["batch"] == 128
            ]
            runs = [r for r in runs if r["reached"]]
            label = "+LR +GBN +RA" if ra else "+LR +GBN (2 epochs)"
            ax_s.plot(
                [r["batch"] for r in runs],
                [r["reached"]["step"] for r in runs],
                marker,
                label=label,
            )
            ax_w.plot(
                [r["batch"] for r in runs],
                [r["reached"]["train_s"] for r in runs],
                marker,
                label=label,
            )
        target = record["b"]["target"]
        ax_s.set(xscale="log", yscale="log", xlabel="batch size", ylabel="steps to target")
        ax_s.set_title(f"Fashion-MNIST F1: steps to {target:.0%} test acc.")
        ax_w.set(xscale="log", yscale="log", xlabel="batch size", ylabel="training seconds")
        ax_w.set_title(f"wall time to {target:.0%} (this CPU)")
        ax_s.legend()
        ax_w.legend()
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=100)


def markdown(record: dict[str, Any], env: dict[str, Any]) -> str:
    lines = [
        "# Cost growth with the batch size and time to accuracy (F1)",
        "",
        f"Hardware: {env['cpu']} ({env['cpu_count']} cores); jax {env['jax']}. Load average "
        f"at start {env['load_average_start']}, at end {env['load_average_end']}. "
        f"Command: `{env['command']}` (seed {env['args']['seed']}). Figure: bench_scaling.png.",
        "",
    ]
    if "a" in record:
        lines += [
            "## A. Step time and compiled memory against the batch size (F1, ghost 128)",
            "",
            "Random inputs; the project's jitted step with donated state; "
            f"{env['args']['repeats']} interleaved rounds x {env['args']['steps']} steps, "
            "median. Footprint = arguments + outputs - donated aliases + temporaries "
            "(`compiled.memory_analysis()`).",
            "",
        ]
        rows = [
            [
                "GBN" if r["norm"] == "ghost" else "BN",
                r["batch"],
                f"{r['median_step_s'] * 1e3:.1f}",
                f"{r['examples_per_s']:.0f}",
                f"{r['us_per_example']:.0f}",
                f"{r['peak_bytes'] / 2**20:.1f}",
                f"{r['temp_bytes'] / 2**20:.1f}",
            ]
            for r in record["a"]["rows"]
        ]
        header = ["norm", "batch", "step (ms)", "examples/s", "us/example", "footprint (MiB)"]
        lines += [tables.markdown_table([*header, "temps (MiB)"], rows), ""]
    if "b" in record:
        b = record["b"]
        lines += [
            f"## B. Time to {b['target']:.0%} test accuracy on Fashion-MNIST (F1, +LR +GBN)",
            "",
            "Base regime (|B_S| = 128): LR 0.1 for 1 epoch, 0.01 for 1 more; momentum 0.9, "
            "weight decay 1e-4, clipping 5; LR x sqrt(B/128); GBN ghost 128. RA: (B/128) x "
            "the epochs. Test accuracy every quarter epoch; wall time counts training "
            f"steps only; each run capped at {env['args']['max_seconds']:.0f} s of training.",
            "",
        ]
        rows = []
        for r in b["runs"]:
            hit = r["reached"]
            if hit:
                to_target = [
                    str(hit["step"]),
                    str(hit["step"] * r["batch"]),
                    f"{hit['train_s']:.1f}",
                ]
            else:
                to_target = [
                    f"not reached ({r['steps_run']} run)",
                    "-",
                    f"- ({r['train_s']:.0f} s run)",
                ]
            best = max((c["test_accuracy"] for c in r["curve"]), default=float("nan"))
            cells = [
                str(r["batch"]),
                "yes" if r["regime_adaptation"] else "no",
                f"{r['lr']:.3g}",
                str(r["total_steps"]),
                *to_target,
                f"{best:.4f} / {r['final_accuracy'] or float('nan'):.4f}",
            ]
            rows.append(cells)
        header = [
            *("batch", "RA", "LR", "step budget", "steps to target", "examples to target"),
            *("train s to target", "best/last test acc."),
        ]
        lines += [tables.markdown_table(header, rows), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    env = provenance.environment("experiments.bench.batch_scaling", args)
    record: dict[str, Any] = {}
    if not args.skip_a:
        record["a"] = part_a(args)
    if not args.skip_b:
        record["b"] = part_b(args)
    env["load_average_end"] = tuple(round(x, 1) for x in os.getloadavg())
    env["load_average_start"] = tuple(round(x, 1) for x in env["load_average_start"])
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"environment": env, **record}, f, indent=1, default=str)
    md = markdown(record, env)
    with open(args.out + ".md", "w") as f:
        f.write(md)
    plot(record, args.out)
    print(md)


if __name__ == "__main__":
    main()
