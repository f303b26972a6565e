"""Cost of logging the gradient noise scale: the train step with B_simple against without.

McCandlish et al. (2018) estimate the noise scale during data-parallel training from
the squared norms of each device's gradient next to the all-reduced one. This times

* ``plain``: the trainer's step, ``gbn_jax.trainer.steps.make_train_step``, jitted as the
  trainer jits it (replicated state donated, batch sharded over a 1-D "data" mesh,
  ``train.compiler_options``), and
* ``noise_m<k>``: the same step with its ``jax.value_and_grad`` replaced by
  ``gbn_jax.trainer.noise_scale.sharded_value_and_grad`` (``micro_batches=k`` shards per
  device, so B_small = B / (devices x k)), the shards' running statistics merged by
  ``noise_scale.combine_running_stats``, and the two estimates (|G|^2 and tr(Sigma))
  added to the step's metrics (``make_noise_scale_train_step`` below is the wiring):
  an estimate at every step, inside it. The trainer does not do this: its
  ``config.noise_scale`` measures every N steps in a program of its own so that the
  training stays bit-identical (``gbn_jax.trainer.steps.make_noise_scale_measurement``); its
  cost is timed by ``experiments/bench/trainer_throughput.py --noise-scale-rounds``.

Before timing, one step of each variant from the same state and batch is compared: the
parameters and running statistics must agree to float32 rounding (recorded).

Protocol (as experiments/bench/step_speed.py): each variant is compiled and warmed up
first; then ``--repeats`` rounds of ``--steps`` steps of each variant, the variants
alternating step by step in an order that rotates every round (blocking on each
step). Each step is timed
twice: wall clock, and the CPU time of this process (all its threads,
``time.process_time``). Reported: median step times, and per round the ratio of the
medians, noise/plain; the overhead is the median of those ratios minus one, with
their range. On this shared 2-core machine other jobs take a varying share of the
cores, which moves the wall clock of a step by tens of percent within a round; the
CPU time counts the step's own work and is the steadier measure of the overhead. The
load average is recorded at the start and end.

Usage (CPU, the trainer's single device; F1 +GBN at |B_L| = 4096, ghost 128):
  .venv/bin/python -m experiments.bench.noise_scale_cost
  .venv/bin/python -m experiments.bench.noise_scale_cost --micro_batches 2,4

Writes experiments/results/bench_noise_scale.{json,md}.

References:
  McCandlish, Kaplan, Amodei et al., "An empirical model of large-batch training"
  (2018), appendix A.1; Hoffer, Hubara & Soudry (2017), section 4 (GBN).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from tqdm import tqdm

from experiments.bench import step_speed
from experiments.harness import provenance, tables
from experiments.harness.provenance import RESULTS_DIR

MODULE = "experiments.bench.noise_scale_cost"
INPUT_SHAPE = {"f1": (28, 28, 1), "resnet44": (32, 32, 3)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="f1", choices=sorted(INPUT_SHAPE))
    p.add_argument("--batch", type=int, default=4096, help="global batch |B_L|")
    p.add_argument("--ghost", type=int, default=128, help="ghost batch size |B_S|")
    p.add_argument("--running_update", default="sequential", choices=("sequential", "mean"))
    p.add_argument("--micro_batches", default="2", help="comma list of shards per device")
    p.add_argument("--repeats", type=int, default=15, help="interleaved rounds")
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument(
        "--devices",
        type=int,
        default=None,
        help="fake CPU devices (XLA_FLAGS); with several, micro_batches=1 is the "
        "data-parallel case, each device's shard a small batch",
    )
    p.add_argument("--out", default=None, help="output stem (default results/bench_noise_scale)")
    return p.parse_args(argv)


def make_noise_scale_train_step(
    model: Any,
    tx: Any,
    learning_rate_fn: Callable[[Any], Any],
    mesh: Any,
    *,
    micro_batches: int,
    bn_momentum: float,
    ghost_batch_size: int,
    running_update: str,
    batch_size: int,
) -> Callable:
    """``train.make_train_step`` with the noise-scale estimates in its metrics.

    The same loss, optimizer update and metrics as the trainer's step, plus
    ``noise_grad_sq`` and ``noise_trace_sigma`` (sum them over a logging interval and
    divide: B_simple = sum tr(Sigma) / sum |G|^2). Exact for ghost batch norm whose
    ghost batches divide the shard, B / (devices x micro_batches).
    """
    import jax.numpy as jnp
    import optax

    from gbn_jax.trainer import noise_scale

    shards = mesh.shape["data"] * micro_batches

    from gbn_jax.trainer import steps

    def loss_fn(params, batch, batch_stats, *, rng):
        # The trainer's own loss (steps.train_loss), with the statistics as aux.
        loss, (logits, new_vars) = steps.train_loss(model, params, batch_stats, batch, rng)
        return loss, (logits, new_vars["batch_stats"])

    grad_fn = noise_scale.sharded_value_and_grad(
        loss_fn, mesh, micro_batches=micro_batches, has_aux=True
    )

    def train_step(state, batch, rng):
        if "mask" in batch:
            raise ValueError(
                "a batch with padding (keep_last_batch's partial batch) has shards of "
                "different real sizes; run the plain train step on it."
            )
        (loss, (logits, shard_stats)), grads, estimate = grad_fn(
            state.params, batch, state.batch_stats, rng=rng
        )
        batch_stats = noise_scale.combine_running_stats(
            shard_stats,
            state.batch_stats,
            rule=running_update,
            momentum=bn_momentum,
            updates_per_shard=batch_size // shards // ghost_batch_size,
        )
        logits = logits.reshape(-1, logits.shape[-1])
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32),
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": jnp.asarray(learning_rate_fn(state.step), jnp.float32),
            "noise_grad_sq": estimate.grad_sq,
            "noise_trace_sigma": estimate.trace_sigma,
        }
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
        )
        return new_state, metrics

    return train_step


def build(args: argparse.Namespace) -> tuple[dict[str, Callable], Any, Any, Any, dict]:
    """Compiled steps by variant name, a fresh state, a batch and a key."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from gbn_jax import models
    from gbn_jax.trainer.steps import create_train_state, make_train_step

    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    zoo_name = "resnet_cifar" if args.model == "resnet44" else args.model
    model = models.get_model(
        zoo_name,
        num_classes=10,
        norm="ghost",
        ghost_batch_size=args.ghost,
        running_update=args.running_update,
    )
    regime = step_speed.paper_regime(args.ghost, args.batch)
    tx = regime.optimizer()
    shape = INPUT_SHAPE[args.model]
    state = jax.jit(
        lambda rng: create_train_state(rng, model, tx, shape), out_shardings=replicated
    )(jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = jax.device_put(
        {
            "image": rng.standard_normal((args.batch, *shape)).astype(np.float32),
            "label": rng.integers(0, 10, args.batch).astype(np.int32),
        },
        batch_sharding,
    )
    key = jax.device_put(jax.random.key(1), replicated)
    steps = {"plain": make_train_step(model, tx, regime.learning_rate)}
    for k in (int(m) for m in args.micro_batches.split(",")):
        steps[f"noise_m{k}"] = make_noise_scale_train_step(
            model,
            tx,
            regime.learning_rate,
            mesh,
            micro_batches=k,
            bn_momentum=0.9,
            ghost_batch_size=args.ghost,
            running_update=args.running_update,
            batch_size=args.batch,
        )
    options = step_speed.XLA_PRESETS["fast"]  # == train.XLA_CPU_FAST_OPTIONS on the CPU
    options = options if jax.default_backend() == "cpu" else {}
    from gbn_jax.trainer.steps import tracing  # the barriers the options keep, as the trainer

    compiled, info = {}, {}
    for name, step in steps.items():
        t0 = time.perf_counter()
        with tracing(options):
            lowered = jax.jit(
                step,
                in_shardings=(replicated, batch_sharding, replicated),
                out_shardings=(replicated, replicated),
                donate_argnums=(0,),
            ).lower(state, batch, key)
        compiled[name] = lowered.compile(compiler_options=options)
        # (XLA's cost analysis counts a loop body once, so its FLOPs of the
        # micro-batched steps mean nothing; their work is the plain step's plus
        # O(parameters). The temporary memory is exact.)
        memory = compiled[name].memory_analysis()
        info[name] = {
            "compile_s": time.perf_counter() - t0,
            "temp_bytes": getattr(memory, "temp_size_in_bytes", None),
        }
    return compiled, state, batch, key, info


def check_agreement(compiled: dict[str, Callable], state: Any, batch: Any, key: Any) -> dict:
    """One step of each variant from the same state: largest differences to plain."""
    import jax

    copy = lambda: jax.tree.map(lambda x: x.copy(), state)
    reference, ref_metrics = compiled["plain"](copy(), batch, key)
    out = {}
    for name, step in compiled.items():
        if name == "plain":
            continue
        got, metrics = step(copy(), batch, key)
        diff = lambda a, b: max(
            float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        )
        out[name] = {
            "max_abs_diff_params": diff(got.params, reference.params),
            "max_abs_diff_batch_stats": diff(got.batch_stats, reference.batch_stats),
            "loss_diff": abs(float(metrics["loss"]) - float(ref_metrics["loss"])),
            "noise_grad_sq": float(metrics["noise_grad_sq"]),
            "noise_trace_sigma": float(metrics["noise_trace_sigma"]),
        }
    return out


def _ratio_cell(result: dict[str, Any], prefix: str) -> str:
    """'median [min, max] (overhead)' of the per-round ratios with this key prefix."""
    median = result[f"{prefix}ratio_median"]
    return (
        f"{median:.3f} [{result[f'{prefix}ratio_min']:.3f}, "
        f"{result[f'{prefix}ratio_max']:.3f}] ({100 * (median - 1):+.1f}%)"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.devices:  # Before JAX starts its CPU backend.
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={args.devices}"
        ).strip()
    import jax

    env = provenance.environment(MODULE, args)
    compiled, state, batch, key, info = build(args)
    agreement = check_agreement(compiled, state, batch, key)
    holders = {name: jax.tree.map(lambda x: x.copy(), state) for name in compiled}
    for name, step in compiled.items():
        for _ in range(args.warmup):
            holders[name], metrics = step(holders[name], batch, key)
        jax.block_until_ready(metrics)

    names = list(compiled)
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu_times: dict[str, list[float]] = {name: [] for name in names}
    ratios: dict[str, list[float]] = {name: [] for name in names if name != "plain"}
    cpu_ratios: dict[str, list[float]] = {name: [] for name in ratios}
    progress = tqdm(total=args.repeats * len(names) * args.steps, desc="steps", unit="step")
    for round_index in range(args.repeats):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        samples = {name: [] for name in names}
        cpu_samples = {name: [] for name in names}
        for _ in range(args.steps):
            # Variants alternate step by step, so that load changes hit them alike.
            for name in order:
                t, cpu = time.perf_counter(), time.process_time()
                holders[name], metrics = compiled[name](holders[name], batch, key)
                jax.block_until_ready(metrics["loss"])
                samples[name].append(time.perf_counter() - t)
                cpu_samples[name].append(time.process_time() - cpu)
                progress.update(1)
        this_round, this_round_cpu = {}, {}
        for name in names:
            times[name] += samples[name]
            cpu_times[name] += cpu_samples[name]
            this_round[name] = statistics.median(samples[name])
            this_round_cpu[name] = statistics.median(cpu_samples[name])
        for name in ratios:
            ratios[name].append(this_round[name] / this_round["plain"])
            cpu_ratios[name].append(this_round_cpu[name] / this_round_cpu["plain"])
    progress.close()
    env["load_average_end"] = os.getloadavg()

    rows, results = [], {}
    for name in names:
        median = statistics.median(times[name])
        cpu_median = statistics.median(cpu_times[name])
        result = {
            "median_step_s": median,
            "median_step_cpu_s": cpu_median,
            "examples_per_s": args.batch / median,
            "step_times_s": times[name],
            "step_cpu_times_s": cpu_times[name],
            **info[name],
        }
        if name != "plain":
            r, c = ratios[name], cpu_ratios[name]
            result.update(
                ratio_median=statistics.median(r),
                ratio_min=min(r),
                ratio_max=max(r),
                ratios=r,
                cpu_ratio_median=statistics.median(c),
                cpu_ratio_min=min(c),
                cpu_ratio_max=max(c),
                cpu_ratios=c,
                agreement=agreement[name],
            )
        results[name] = result
        shards = jax.device_count() * int(name[len("noise_m") :]) if name != "plain" else None

        rows.append(
            [
                name,
                "-" if shards is None else f"{args.batch // shards} / {args.batch}",
                f"{cpu_median * 1e3:.0f}",
                _ratio_cell(result, "cpu_") if name != "plain" else "1 (reference)",
                f"{median * 1e3:.0f}",
                _ratio_cell(result, "") if name != "plain" else "1 (reference)",
                "-" if name == "plain" else f"{agreement[name]['max_abs_diff_params']:.1e}",
            ]
        )
    table = tables.markdown_table(
        [
            "variant",
            "B_small / B_big",
            "CPU time per step (ms)",
            "CPU-time ratio to plain, median [min, max] over rounds (overhead)",
            "wall time per step (ms)",
            "wall-time ratio to plain, median [min, max] (overhead)",
            "max |params diff| after 1 step",
        ],
        rows,
    )
    load = lambda v: "/".join(f"{x:.1f}" for x in v)
    markdown = "\n".join(
        [
            "# Cost of logging the gradient noise scale (B_simple)",
            "",
            f"Command: `{env['command']}`  ",
            f"Machine: {env['cpu']} ({env['cpu_count']} CPUs), {len(env['devices'])} "
            f"{env['device_kind']} device(s); jax {env['jax']}. Load average at start "
            f"{load(env['load_average_start'])}, at end {load(env['load_average_end'])} "
            "(the machine is shared).",
            "",
            f"{args.model.upper()} with ghost batch norm (ghost {args.ghost}, "
            f"{args.running_update} running update), batch {args.batch}, the trainer's "
            f"jit and XLA:CPU options; {args.repeats} rounds x {args.steps} steps per "
            "variant, alternating step by step, order rotated each round, after "
            f"{args.warmup} warm-up steps. Temporary memory of the step: "
            + ", ".join(f"{n} {info[n]['temp_bytes'] / 2**20:.0f} MiB" for n in names)
            + ".",
            "",
            table,
            "",
            "Target: overhead under 2%. The parameter difference is the largest absolute "
            "difference after one step from the same state and batch (float32 "
            "reassociation: the shards' gradients are summed in another order).",
            "",
        ]
    )
    record = {"environment": env, "results": results}
    tables.write_outputs(args.out or str(RESULTS_DIR / "bench_noise_scale"), record, markdown)


if __name__ == "__main__":
    main()
