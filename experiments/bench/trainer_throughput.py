"""Trainer throughput over the throughput of its isolated step.

For each case (a config of ``configs/`` at its default values, plus ``max_steps``):

* ``step``: ``gbn_jax.trainer.steps.make_train_step`` of the case's network and optimizer (its
  regime's, resolved as the trainer resolves it), jitted as the trainer jits it (its
  compiler options, the state donated, ``step_speed.compile_step``) and fed one fixed
  device batch; ``--step-seconds`` worth of steps dispatched back to back and timed to
  the last one's completion: the speed of the arithmetic alone.
* ``trainer``: the command line, ``python -m gbn_jax.main --config=<case>
  --config.max_steps=<steps>``, in a subprocess, fresh workdir; its examples/s is the
  median of its logged intervals after the first (which holds the compilation), as its
  summary.json reports it: evaluation and checkpoint saves are left out, everything
  else the loop does (data, dispatch, logging) is in.
* ``baseline`` (``--baseline ROOT``): the same command run from another checkout, e.g.
  an older commit, for a before/after in the same conditions.
* ``loop``: the trainer's own loop program (``steps.make_train_loop`` over the case's
  device-resident data, ``steps.compile_train_loop``), in this process, dispatched as
  the trainer dispatches it: up to K steps a dispatch (``cadence.steps_per_loop``, kept to
  ``cadence.LOOP_SECONDS``), each dispatch's rows from ``TrainFeed.next_chunk``, the host
  one dispatch ahead; on the CPU one program per step unless ``--device-loop true``
  (``steps.device_loop``). What it leaves out of the trainer: logs, evaluation,
  checkpoints.

* ``noise scale`` (``--noise-scale-rounds R``, instead of the above): the command line
  with B_simple logged (``--config.noise_scale.every_steps=N``, N from
  ``NOISE_SCALE_EVERY``: the cadence the experiments use) against without, alternating
  which runs first round by round; a run's rate is the harmonic mean of its logged
  intervals after the first (total examples over total time: every interval counts,
  with a measurement in it or not; evaluation and checkpoints left out). Reported: the
  median and range of the per-round ratio on/off; the overhead is one minus it.

* ``allocator`` (``--allocator-rounds R``, instead of the above): the isolated step and
  the command line, each in fresh subprocesses under glibc's default malloc and with
  huge pages (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``), in an order reversed every
  other round. Reported per case: huge pages over default for the step and for the
  trainer, the trainer over the step under the same malloc, and the trainer over a step
  under the default malloc (a step timed by a script outside this repository).

* ``workarounds`` (``--workaround-rounds R``, instead of the above): the command line
  with each CPU setting taken away in turn (``WORKAROUND_VARIANTS``: huge pages for
  malloc, the convolution-input barriers, the XLA:CPU options), fresh subprocesses in
  an order rotating round by round. Reported per case and setting: the trainer's
  examples/s with all of them over without that one. Rounds add to those already in
  the output file, so that several short invocations make one measurement.

CLI rounds interleave the variants (step, trainer[, baseline], step again); a round's
ratio is the trainer's rate over the mean of the two step rates around it. Paired rounds
(``--paired-rounds``) alternate step and loop every few seconds, in either order; the
machine's load, shared with other jobs, then hits both alike, where a CLI run lasts
long enough for the load to change under it. Reported: median and range of per-round
ratios, and the load average.

Usage (CPU: f1_b128, f1_b4096 and resnet44_b128, side by side; results/bench_trainer.*):
  .venv/bin/python -m experiments.bench.trainer_throughput --rounds 3 --paired-rounds 12
Huge pages against glibc's default malloc (writes results/bench_trainer_allocator.*):
  .venv/bin/python -m experiments.bench.trainer_throughput --allocator-rounds 3
Each CPU setting taken away (writes results/bench_trainer_workarounds.*; run once per case
and round, each adds its rounds):
  .venv/bin/python -m experiments.bench.trainer_throughput --cases resnet44_b128 \
      --workaround-rounds 1
Smoke (a minute of work): --cases f1_b128 --rounds 1 --paired-rounds 2 --steps 20
  --step-seconds 1 --out /tmp/bench_trainer_smoke
The cost of logging B_simple (writes results/bench_trainer_noise_scale.{json,md}):
  .venv/bin/python -m experiments.bench.trainer_throughput --cases f1_b128,f1_b4096 \
      --noise-scale-rounds 6
GPU (the device tool; experiments/gpu/trainer_throughput.sh runs it and the F1 table):
  python -m experiments.bench.trainer_throughput --platform gpu --cases f1_b128,f1_b4096
  python -m experiments.bench.trainer_throughput --table-walls <dir of the table's summaries>

References:
  Hoffer, Hubara & Soudry (2017), section 5 (the runs whose time this bounds).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from experiments.bench import step_speed
from experiments.harness import launch, provenance, tables
from experiments.harness.provenance import REPO_ROOT, RESULTS_DIR
from experiments.harness.timing import spread
from gbn_jax.trainer import run_files

MODULE = "experiments.bench.trainer_throughput"
ROOT = str(REPO_ROOT)
RESULTS = str(RESULTS_DIR)
# name -> (config file:arg, trainer steps per round, extra trainer overrides).
CASES: dict[str, tuple[str, int, dict[str, Any]]] = {
    "f1_b128": ("configs/fashion_mnist_f1.py:sb", 600, {}),
    "f1_b4096": ("configs/fashion_mnist_f1.py:lb_lr_gbn_ra", 200, {}),
    # ResNet-44 on 28x28 Fashion-MNIST (no CIFAR on this machine); a step takes seconds
    # here, so logs every 10 steps give the median a few intervals.
    "resnet44_b128": (
        "configs/fashion_mnist_f1.py:sb,model=resnet_cifar",
        40,
        {"log_every_steps": 10},
    ),
}


# name -> N, the B_simple cadence the experiments use (--noise-scale-rounds).
NOISE_SCALE_EVERY = {"f1_b128": 100, "f1_b4096": 25, "resnet44_b128": 10}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of {list(CASES)}")
    p.add_argument("--rounds", type=int, default=3, help="CLI rounds per case (0: none)")
    p.add_argument(
        "--paired-rounds", type=int, default=12, help="step/loop rounds per case (0: none)"
    )
    p.add_argument("--steps", type=int, default=None, help="override the trainer's steps")
    p.add_argument("--step-seconds", type=float, default=8.0, help="isolated-step timing")
    p.add_argument("--platform", default="cpu", choices=("cpu", "gpu"))
    p.add_argument("--baseline", default=None, help="checkout whose trainer to time too")
    p.add_argument("--data-dir", default=None, help="--config.data_dir for the trainer")
    p.add_argument(
        "--device-loop",
        default=None,
        choices=("true", "false"),
        help="--config.device_loop for the trainer and the loop (default: unset, the "
        "platform's default: off on the CPU)",
    )
    p.add_argument("--out", default=None, help="output stem (default results/bench_trainer)")
    p.add_argument(
        "--noise-scale-rounds",
        type=int,
        default=0,
        help="instead: CLI rounds with B_simple logged against without (0: none)",
    )
    p.add_argument(
        "--allocator-rounds",
        type=int,
        default=0,
        help="instead: the isolated step and the trainer CLI, each under glibc's default "
        "malloc and with huge pages, as subprocesses (0: none)",
    )
    p.add_argument(
        "--workaround-rounds",
        type=int,
        default=0,
        help="instead: the trainer CLI with each CPU workaround taken away in turn "
        "(WORKAROUND_VARIANTS), rounds added to those already in the output (0: none)",
    )
    p.add_argument(
        "--variants",
        default=None,
        help="--workaround-rounds: comma list of WORKAROUND_VARIANTS, spaces as "
        "underscores (default: all)",
    )
    # Internal (--allocator-rounds): print the isolated step's rate of one case, in this
    # process as the environment sets it up, and exit.
    p.add_argument("--isolated-step", default=None, metavar="CASE", help=argparse.SUPPRESS)
    p.add_argument(
        "--table-walls",
        default=None,
        metavar="DIR",
        help="instead: the wall times of the F1 table runs in DIR (experiments/gpu/f1_unscaled.sh "
        "summaries) against the committed ones",
    )
    return p.parse_args(argv)


def load_config(spec: str) -> Any:
    """The ConfigDict of ``file.py[:arg]`` (relative to the repository root)."""
    path, _, arg = spec.partition(":")
    return launch.load_config_module(path).get_config(arg or None)


class _Rate:
    """Examples/s of ``_time(n)``, n steps of ``batch_size`` examples, sized to last about
    `seconds` from the last measurement's time per step."""

    batch_size: int
    per_step: float

    def _time(self, n: int) -> float:
        raise NotImplementedError

    def rate(self, seconds: float) -> float:
        n = max(3, round(seconds / self.per_step))
        elapsed = self._time(n)
        self.per_step = elapsed / n
        return n * self.batch_size / elapsed


class IsolatedStep(_Rate):
    """The case's step alone, compiled once; ``rate(seconds)`` times it back to back."""

    def __init__(self, config: Any):
        import jax

        from gbn_jax import models
        from gbn_jax.trainer import input_pipeline, regimes, steps

        info = input_pipeline.get_dataset_info(config.dataset, config.get("data_dir"))
        regime = regimes.resolve(config, info.num_train)
        model = models.get_model(
            config.model.name,
            num_classes=info.num_classes,
            **{k: v for k, v in config.model.to_dict().items() if k != "name"},
        )
        self.batch_size = config.batch_size
        options = steps.compiler_options(config)  # compile_step traces in steps.tracing
        self.compiled, self.state, self.batch, self.key, _ = step_speed.compile_step(
            model, regime, tuple(info.image_shape), config.batch_size, options
        )
        self._jax = jax
        self.per_step = self._time(2) / 2  # compile-free warm-up, sizes the timed runs

    def _time(self, n: int) -> float:
        start = time.perf_counter()
        state = self.state
        for _ in range(n):
            state, _ = self.compiled(state, self.batch, self.key)
        self._jax.block_until_ready(state)
        self.state = state
        return time.perf_counter() - start


class TrainerLoop(_Rate):
    """The trainer's loop program alone; ``rate(seconds)`` dispatches it as the trainer."""

    def __init__(self, config: Any):
        import jax
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from gbn_jax import models
        from gbn_jax.trainer import cadence, input_pipeline, regimes, steps
        from gbn_jax.trainer.data import feed

        self._jax, self._loop_seconds = jax, cadence.LOOP_SECONDS
        mesh = jax.sharding.Mesh(jax.devices()[:1], ("data",))
        replicated = NamedSharding(mesh, P())
        info = input_pipeline.get_dataset_info(config.dataset, config.get("data_dir"))
        regime = regimes.resolve(config, info.num_train)
        model = models.get_model(
            config.model.name,
            num_classes=info.num_classes,
            **{k: v for k, v in config.model.to_dict().items() if k != "name"},
        )
        tx = regime.optimizer()
        iterator = input_pipeline.create_train_iterator(
            config.dataset,
            global_batch_size=config.batch_size,
            seed=config.seed,
            sharding=NamedSharding(mesh, P("data")),
            data_dir=config.get("data_dir"),
        )
        self.feed = feed.TrainFeed(iterator, mesh, resident=True)
        init = jax.jit(
            lambda rng: steps.create_train_state(rng, model, tx, tuple(info.image_shape)),
            out_shardings=replicated,
        )
        self.state = init(jax.random.key(0))
        self.acc = jax.jit(steps.zero_metrics, out_shardings=replicated)()
        eval_every = config.eval_every_steps or max(
            1, round(config.eval_every_epochs * regime.steps_per_epoch)
        )
        self.k = cadence.steps_per_loop(
            config, eval_every=eval_every, total_steps=regime.total_steps
        )
        loop = steps.make_train_loop(
            steps.make_train_step(model, tx, regime.learning_rate),
            self.feed.batch,
            jax.random.key(1),
        )
        shapes = jax.eval_shape(lambda: (self.state, self.acc))
        shapes = jax.tree.map(
            lambda s, a: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=a.sharding),
            shapes,
            (self.state, self.acc),
        )
        self.device_loop = steps.device_loop(config)
        self.run = steps.compile_train_loop(
            loop,
            *shapes,
            self.feed.arrays,
            self.feed.chunk_shapes(self.k),
            compiler_options=steps.compiler_options(config),
            device_loop=self.device_loop,
            scan=jax.default_backend() != "cpu",
        )
        self.batch_size = config.batch_size
        self.per_step = self._loop_seconds  # one step a dispatch until timed
        self.per_step = self._time(2) / 2

    def _time(self, num_steps: int) -> float:
        start = time.perf_counter()
        previous, done_steps = None, 0
        while done_steps < num_steps:
            # As train.py: K steps a dispatch, kept to LOOP_SECONDS; wait one behind.
            n = max(1, int(self._loop_seconds / self.per_step))
            n = min(self.k, num_steps - done_steps, n)
            xs = self.feed.next_chunk(n, self.k)
            self.state, self.acc, done = self.run(self.state, self.acc, self.feed.arrays, xs, n)
            if previous is not None:
                self._jax.block_until_ready(previous)
            previous, done_steps = done, done_steps + n
        self._jax.block_until_ready(previous)
        return time.perf_counter() - start


def run_trainer(
    root: str,
    spec: str,
    steps: int,
    overrides: dict[str, Any],
    args: argparse.Namespace,
    extra_env: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One CLI run from checkout ``root`` in ``env`` (default: this process's, updated
    with ``extra_env``); returns its rates and wall times."""
    workdir = tempfile.mkdtemp(prefix="bench_trainer_")
    command = [
        sys.executable,
        "-m",
        "gbn_jax.main",
        f"--config={os.path.join(root, spec)}",
        f"--workdir={workdir}",
        f"--config.max_steps={steps}",
        *(f"--config.{k}={v}" for k, v in overrides.items()),
    ]
    if args.data_dir:
        command.append(f"--config.data_dir={args.data_dir}")
    if args.device_loop:
        command.append(f"--config.device_loop={args.device_loop.capitalize()}")
    env = dict(os.environ if env is None else env, PYTHONPATH=root, **(extra_env or {}))
    env["JAX_PLATFORMS"] = "cuda" if args.platform == "gpu" else "cpu"
    start = time.time()
    proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    wall = time.time() - start
    try:
        if proc.returncode != 0:
            raise RuntimeError(f"trainer failed ({' '.join(command)}):\n{proc.stderr[-3000:]}")
        summary = run_files.read_json(run_files.path(workdir, run_files.SUMMARY_FILE))
        records = run_files.read_json_lines(run_files.path(workdir, run_files.METRICS_FILE))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "examples_per_sec": summary["examples_per_sec"],
        "interval_rates": [r["examples_per_sec"] for r in records if "examples_per_sec" in r],
        "process_wall_s": wall,
        "run_wall_s": summary["wall_time_sec"],
    }


def bench_case(name: str, args: argparse.Namespace) -> dict[str, Any]:
    spec, steps, overrides = CASES[name]
    steps = args.steps or steps
    config = case_config(name, args)
    if args.device_loop:
        config.device_loop = args.device_loop == "true"
    step = IsolatedStep(config)
    out = {"case": name, "config": spec, "overrides": overrides, "steps": steps}
    out["batch_size"] = config.batch_size
    rounds = []
    for r in range(args.rounds):
        row: dict[str, Any] = {"load_before": os.getloadavg()}
        before = step.rate(args.step_seconds)
        row["trainer"] = run_trainer(ROOT, spec, steps, overrides, args)
        if args.baseline:
            row["baseline"] = run_trainer(args.baseline, spec, steps, overrides, args)
        after = step.rate(args.step_seconds)
        row["step_examples_per_sec"] = (before + after) / 2
        row["step_before_after"] = (before, after)
        for variant in ("trainer", "baseline"):
            if variant in row:
                row[f"{variant}_ratio"] = (
                    row[variant]["examples_per_sec"] / row["step_examples_per_sec"]
                )
        row["load_after"] = os.getloadavg()
        rounds.append(row)
        print(
            f"{name} round {r}: step {row['step_examples_per_sec']:.0f} img/s, trainer "
            f"{row['trainer']['examples_per_sec']:.0f} ({row['trainer_ratio']:.3f})"
            + (
                f", baseline {row['baseline']['examples_per_sec']:.0f} "
                f"({row['baseline_ratio']:.3f})"
                if args.baseline
                else ""
            )
            + f"; load {row['load_after'][0]:.1f}",
            flush=True,
        )
    out["rounds"] = rounds
    for variant in ("trainer", "baseline"):
        ratios = [r[f"{variant}_ratio"] for r in rounds if f"{variant}_ratio" in r]
        if ratios:
            out[f"{variant}_ratio"] = spread(ratios)
            out[f"{variant}_examples_per_sec"] = statistics.median(
                r[variant]["examples_per_sec"] for r in rounds
            )
            out["step_examples_per_sec"] = statistics.median(
                r["step_examples_per_sec"] for r in rounds
            )
    if args.paired_rounds:
        loop = TrainerLoop(config)
        paired = []
        for r in range(args.paired_rounds):
            if r % 2:
                loop_rate, step_rate = loop.rate(args.step_seconds), step.rate(args.step_seconds)
            else:
                step_rate, loop_rate = step.rate(args.step_seconds), loop.rate(args.step_seconds)
            paired.append({"step": step_rate, "loop": loop_rate, "load": os.getloadavg()})
        print(f"{name} paired: loop/step {[round(p['loop'] / p['step'], 3) for p in paired]}")
        out["paired"] = paired
        out["steps_per_loop"] = loop.k
        out["device_loop"] = loop.device_loop
        out["loop_ratio"] = spread([p["loop"] / p["step"] for p in paired])
        out["loop_examples_per_sec"] = statistics.median(p["loop"] for p in paired)
        out["paired_step_examples_per_sec"] = statistics.median(p["step"] for p in paired)
    return out


def bench_noise_scale_case(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The trainer with B_simple logged every N steps against without, per round."""
    spec, steps, overrides = CASES[name]
    steps = args.steps or steps
    every = NOISE_SCALE_EVERY[name]
    with_noise = {**overrides, "noise_scale.every_steps": every}
    out = {"case": name, "config": spec, "overrides": overrides, "steps": steps}
    out["noise_scale_every"] = every
    rounds = []
    for r in range(args.noise_scale_rounds):
        row: dict[str, Any] = {"load_before": os.getloadavg(), "noise_first": bool(r % 2)}
        order = (("on", with_noise), ("off", overrides))
        for variant, variant_overrides in order if r % 2 else order[::-1]:
            run = run_trainer(ROOT, spec, steps, variant_overrides, args)
            # Total examples over total time of the intervals after the first.
            run["rate"] = statistics.harmonic_mean(run["interval_rates"][1:] or [0.0])
            row[variant] = run
        row["ratio"] = row["on"]["rate"] / row["off"]["rate"]
        row["load_after"] = os.getloadavg()
        rounds.append(row)
        print(
            f"{name} round {r}: off {row['off']['rate']:.0f} img/s, on (N={every}) "
            f"{row['on']['rate']:.0f} ({row['ratio']:.3f}); load {row['load_after'][0]:.1f}",
            flush=True,
        )
    out["rounds"] = rounds
    out["ratio"] = spread([r["ratio"] for r in rounds])
    for variant in ("off", "on"):
        out[f"{variant}_examples_per_sec"] = statistics.median(r[variant]["rate"] for r in rounds)
    return out


def case_config(name: str, args: argparse.Namespace) -> Any:
    """The case's config with its overrides and the command line's data dir."""
    spec, _, overrides = CASES[name]
    config = load_config(spec)
    config.update_from_flattened_dict(overrides)
    if args.data_dir:
        config.data_dir = args.data_dir
    return config


# Huge pages for malloc: glibc's tunable, read when a process starts.
HUGE_PAGES = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
# Malloc setups of --allocator-rounds: the environment a subprocess starts with, this
# process's less any GLIBC_TUNABLES.
ALLOCATORS = {"default": {}, "huge pages": HUGE_PAGES}


def _allocator_env(name: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    return {**env, **ALLOCATORS[name]}


def run_isolated_step(name: str, allocator: str, args: argparse.Namespace) -> float:
    """The isolated step's examples/s in a fresh subprocess under ``allocator``."""
    command = [
        sys.executable,
        "-m",
        MODULE,
        f"--isolated-step={name}",
        f"--step-seconds={args.step_seconds}",
        f"--platform={args.platform}",
    ]
    if args.data_dir:
        command.append(f"--data-dir={args.data_dir}")
    env = _allocator_env(allocator)
    env["JAX_PLATFORMS"] = "cuda" if args.platform == "gpu" else "cpu"
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"isolated step failed ({' '.join(command)}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["examples_per_sec"]


def bench_allocator_case(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Per round, in subprocesses: the step and the CLI, each under glibc's default
    malloc and with huge pages, in an order reversed every other round."""
    spec, steps, overrides = CASES[name]
    steps = args.steps or steps
    out = {"case": name, "config": spec, "overrides": overrides, "steps": steps}
    out["batch_size"] = case_config(name, args).batch_size
    order = [(kind, alloc) for kind in ("step", "trainer") for alloc in ALLOCATORS]
    rounds = []
    for r in range(args.allocator_rounds):
        row: dict[str, Any] = {"load_before": os.getloadavg()}
        for kind, alloc in order[::-1] if r % 2 else order:
            if kind == "step":
                row[f"step {alloc}"] = run_isolated_step(name, alloc, args)
            else:
                run = run_trainer(ROOT, spec, steps, overrides, args, _allocator_env(alloc))
                row[f"trainer {alloc}"] = run["examples_per_sec"]
        row["load_after"] = os.getloadavg()
        rounds.append(row)
        print(
            f"{name} round {r}: "
            + ", ".join(f"{k} {v:.0f}" for k, v in row.items() if not k.startswith("load")),
            flush=True,
        )
    out["rounds"] = rounds
    ratios = {
        "step: huge pages / default": ("step huge pages", "step default"),
        "trainer: huge pages / default": ("trainer huge pages", "trainer default"),
        "trainer (huge pages) / step (huge pages)": ("trainer huge pages", "step huge pages"),
        "trainer (huge pages) / step (default)": ("trainer huge pages", "step default"),
    }
    out["ratios"] = {
        label: spread([row[a] / row[b] for row in rounds]) for label, (a, b) in ratios.items()
    }
    out["examples_per_sec"] = {
        key: statistics.median(row[key] for row in rounds)
        for key in rounds[0]
        if not key.startswith("load")
    }
    return out


def _spread_cells(ratio: dict[str, Any]) -> list[str]:
    """A ratio's median (bold), quartiles and range, as table cells."""
    return [
        f"**{ratio['median']:.3f}**",
        f"{ratio['q1']:.3f}-{ratio['q3']:.3f}",
        f"{ratio['min']:.3f}-{ratio['max']:.3f}",
    ]


def per_case_markdown(
    title: str, method: str, header: list[str], records: list[dict[str, Any]], rows: list[list]
) -> str:
    """A report of ``_measure_and_merge``'s records: the title, each case's command and
    environment (its own: cases may come from different invocations), the method
    paragraph, the table."""
    runs = [
        f"- {rec['case']}: `{rec['environment']['command']}`. "
        + tables.environment_line(rec["environment"])
        for rec in records
    ]
    return "\n".join([title, "", *runs, "", method, "", tables.markdown_table(header, rows), ""])


def allocator_markdown(records: list[dict[str, Any]]) -> str:
    rows = []
    for rec in records:
        label = f"{rec['case']} (`{rec['config'].split(':', 1)[1]}`)"
        for ratio_label, ratio in rec["ratios"].items():
            rows.append([label, ratio_label, ratio["n"], *_spread_cells(ratio)])
        rates = ", ".join(f"{k} {v:.0f}" for k, v in rec["examples_per_sec"].items())
        rows.append([label, f"img/s (medians): {rates}", "", "", "", ""])
    return per_case_markdown(
        "# Huge pages for malloc: the isolated step and the trainer CLI",
        "Per round, four fresh subprocesses: the isolated "
        "step (`make_train_step` of the case, one fixed device batch, "
        "`--step-seconds` after a warm-up) and the trainer CLI (its "
        "logged intervals after the first), each under glibc's default malloc "
        "and with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, in an order reversed every "
        "other round. The last ratio is the trainer as it runs against a step written "
        "outside this repository, under the default malloc. Median, quartiles and "
        "range over rounds.",
        ["case", "ratio", "rounds", "median", "quartiles", "range"],
        records,
        rows,
    )


# Variants of --workaround-rounds: name -> (environment, config overrides) of the CLI.
# Huge pages are glibc's tunable set in the environment. The convolution-input barriers
# survive only with the optimization-barrier expander off, so "no barrier" compiles
# with the other option alone, set through XLA_FLAGS.
YNN_REDUCE_ONLY = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE"
WORKAROUND_VARIANTS: dict[str, tuple[dict[str, str], dict[str, Any]]] = {
    "all": (HUGE_PAGES, {}),
    "no huge pages": ({}, {}),
    "no barrier": (
        {**HUGE_PAGES, "XLA_FLAGS": YNN_REDUCE_ONLY},
        {"xla_cpu_fast_options": False},
    ),
    "no XLA options": (HUGE_PAGES, {"xla_cpu_fast_options": False}),
}


def workaround_variants(args: argparse.Namespace) -> list[str]:
    """The variants of --workaround-rounds, ``all`` first."""
    chosen = args.variants.replace("_", " ").split(",") if args.variants else WORKAROUND_VARIANTS
    return [v for v in WORKAROUND_VARIANTS if v == "all" or v in chosen]


def _workaround_env(name: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "XLA_FLAGS")}
    return {**env, **WORKAROUND_VARIANTS[name][0]}


def bench_workaround_case(
    name: str, args: argparse.Namespace, previous: dict[str, list] | None = None
) -> dict[str, Any]:
    """Per round, the CLI under every variant of WORKAROUND_VARIANTS in fresh
    subprocesses, the order rotating round by round; rounds of an earlier invocation
    (``previous``: case -> rounds) are kept and added to."""
    spec, steps, overrides = CASES[name]
    steps = args.steps or steps
    variants = workaround_variants(args)
    rounds = list((previous or {}).get(name, []))
    for r in range(len(rounds), len(rounds) + args.workaround_rounds):
        row: dict[str, Any] = {"load_before": os.getloadavg(), "time": time.time()}
        shift = r % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            run = run_trainer(
                ROOT,
                spec,
                steps,
                {**overrides, **WORKAROUND_VARIANTS[variant][1]},
                args,
                extra_env=None,
                env=_workaround_env(variant),
            )
            row[variant] = run["examples_per_sec"]
        row["load_after"] = os.getloadavg()
        rounds.append(row)
        print(
            f"{name} round {r}: " + ", ".join(f"{v} {row[v]:.0f}" for v in variants),
            flush=True,
        )
    return {
        "case": name,
        "config": spec,
        "overrides": overrides,
        "steps": steps,
        "batch_size": case_config(name, args).batch_size,
        "variants": {
            v: {"env": e, "overrides": o}
            for v, (e, o) in WORKAROUND_VARIANTS.items()
            if v in variants
        },
        "rounds": rounds,
        "gain": {
            v: spread([row["all"] / row[v] for row in rounds]) for v in variants if v != "all"
        },
        "examples_per_sec": {v: statistics.median(row[v] for row in rounds) for v in variants},
    }


def workaround_markdown(records: list[dict[str, Any]]) -> str:
    rows = []
    for rec in records:
        label = f"{rec['case']} (`{rec['config'].split(':', 1)[1]}`, batch {rec['batch_size']})"
        for variant, gain in rec["gain"].items():
            rows.append(
                [
                    label,
                    variant.removeprefix("no "),
                    gain["n"],
                    f"{rec['examples_per_sec']['all']:.0f}",
                    f"{rec['examples_per_sec'][variant]:.0f}",
                    *_spread_cells(gain),
                ]
            )
    return per_case_markdown(
        "# The CPU workarounds, each taken away: trainer throughput",
        "Per round, the trainer CLI (examples/s: median of its logged intervals after "
        "the first; evaluation and checkpoints left out) in a fresh subprocess under "
        "every variant, the order rotating round by round. `all`: "
        "`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` and the XLA:CPU options "
        "(`xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE`, "
        "`xla_disable_hlo_passes=cse_barrier_expander`, which keeps the "
        "convolution-input barriers). Without huge pages: glibc's default malloc. "
        "Without the barrier: the YNNPACK option alone (the barriers expanded away). "
        "Without the XLA options: XLA's defaults (no barrier either). Gain: `all` over "
        "the variant, per round; median, quartiles and range over rounds.",
        [
            "case",
            "workaround",
            "rounds",
            "all img/s",
            "without img/s",
            "gain (median)",
            "quartiles",
            "range",
        ],
        records,
        rows,
    )


def noise_scale_markdown(records: list[dict[str, Any]]) -> str:
    rows = [
        [
            f"{rec['case']} (`{rec['config'].split(':', 1)[1]}`)",
            rec["noise_scale_every"],
            rec["steps"],
            rec["ratio"]["n"],
            f"{rec['off_examples_per_sec']:.0f}",
            f"{rec['on_examples_per_sec']:.0f}",
            *_spread_cells(rec["ratio"]),
        ]
        for rec in records
    ]
    return per_case_markdown(
        "# Trainer throughput with B_simple logged, over without",
        "Per round, the trainer CLI with "
        "`--config.noise_scale.every_steps=N` and without, in alternating order; a "
        "run's rate is total examples over total time of its logged intervals after "
        "the first (evaluation and checkpoints left out). Ratio: on over off; the "
        "overhead is 1 - ratio. Median, quartiles and range over rounds.",
        [
            "case",
            "N",
            "steps",
            "rounds",
            "off img/s",
            "on img/s",
            "ratio (median)",
            "quartiles",
            "range",
        ],
        records,
        rows,
    )


def markdown(env: dict[str, Any], records: list[dict[str, Any]], args) -> str:
    rows = []
    for rec in records:
        label = f"{rec['case']} (`{rec['config'].split(':', 1)[1]}`)"
        for variant, step_key in (
            ("trainer", "step_examples_per_sec"),
            ("baseline", "step_examples_per_sec"),
            ("loop", "paired_step_examples_per_sec"),
        ):
            if f"{variant}_ratio" not in rec:
                continue
            ratio = rec[f"{variant}_ratio"]
            rows.append(
                [
                    label,
                    {"trainer": "trainer CLI", "baseline": "baseline CLI"}.get(
                        variant,
                        f"loop, K = {rec.get('steps_per_loop')}"
                        + ("" if rec.get("device_loop") else ", a program per step"),
                    ),
                    ratio["n"],
                    f"{rec[step_key]:.0f}",
                    f"{rec[f'{variant}_examples_per_sec']:.0f}",
                    *_spread_cells(ratio),
                ]
            )
    return "\n".join(
        [
            "# Trainer throughput over its isolated step",
            "",
            tables.environment_line(env),
            "",
            f"Command: `{env['command']}`. Ratio: examples/s over the isolated step's "
            "(`make_train_step` of the same network, optimizer and batch, one fixed device "
            "batch). CLI rows: the trainer's examples/s (median of its logged intervals, the "
            "first dropped; evaluation and checkpoint saves left out) over the mean of the "
            "step's rate measured before and after the run, per round. Loop rows: the "
            "trainer's loop program dispatched as the trainer does, alternated with the step "
            f"every {args.step_seconds:g} s. Median, quartiles and range over rounds.",
            "",
            tables.markdown_table(
                [
                    "case",
                    "variant",
                    "rounds",
                    "step img/s",
                    "img/s",
                    "ratio (median)",
                    "quartiles",
                    "range",
                ],
                rows,
            ),
            "",
        ]
    )


# The unscaled F1 table's committed runs (jax 0.11.2 on an H100).
COMMITTED_TABLE = os.path.join(RESULTS, "f1_unscaled_gpu")
TABLE_COLUMNS = ("sb", "lb", "lb_lr", "lb_lr_gbn", "lb_lr_gbn_ra")


def table_walls(run_dir: str, out_stem: str) -> None:
    """Wall time per column of the unscaled F1 table: runs in ``run_dir`` against the
    committed ones (summary.json ``wall_time_sec``: the whole run, start-up and
    compilation included; a column that did not finish has no summary)."""

    def wall(directory: str, column: str) -> float | None:
        path = os.path.join(directory, f"{column}.json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)["wall_time_sec"]

    rows, record = [], {}
    for column in TABLE_COLUMNS:
        before, after = wall(COMMITTED_TABLE, column), wall(run_dir, column)
        record[column] = {"committed_s": before, "now_s": after}
        rows.append(
            [
                column,
                "-" if before is None else f"{before:.0f}",
                "-" if after is None else f"{after:.0f}",
                "-" if None in (before, after) else f"{before / after:.2f}",
            ]
        )
    done = [c for c in TABLE_COLUMNS if None not in record[c].values()]
    total = [sum(record[c][k] for c in done) for k in ("committed_s", "now_s")]
    rows.append(["all finished in both", f"{total[0]:.0f}", f"{total[1]:.0f}", "-"])
    text = tables.document(
        "# The unscaled F1 table (seed 0): wall time per column",
        f"Runs in `{run_dir}` against `{os.path.relpath(COMMITTED_TABLE, ROOT)}` "
        "(summary.json wall_time_sec, start-up and compilation included).",
        tables.markdown_table(["column", "committed (s)", "now (s)", "x faster"], rows),
    )
    tables.write_outputs(out_stem, {"run_dir": run_dir, "columns": record}, text)


def _measure_and_merge(stem, cases, env, args, bench, markdown_fn) -> None:
    """Measures ``cases`` with ``bench``; their rows replace theirs in ``stem``.{json,md}
    and the file keeps the other cases' rows. Each row records its own environment
    (command, hardware, load); rows of a file written before that get its top-level one."""
    kept = {}
    if os.path.exists(stem + ".json"):
        with open(stem + ".json") as f:
            old = json.load(f)
        for rec in old["results"]:
            kept[rec["case"]] = {"environment": old.get("environment"), **rec}
    for name in cases:
        env["load_average_start"] = os.getloadavg()
        record = bench(name, args)
        env["load_average_end"] = os.getloadavg()
        kept[name] = {**record, "environment": dict(env)}
    records = [kept[name] for name in CASES if name in kept]
    tables.write_outputs(stem, {"results": records}, markdown_fn(records))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.table_walls:
        stem = args.out or os.path.join(RESULTS, "f1_unscaled_walls")
        table_walls(args.table_walls, stem)
        return
    os.environ.setdefault("JAX_PLATFORMS", "cuda" if args.platform == "gpu" else "cpu")
    if args.platform == "gpu":
        # The CLI shares the card with this process.
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.4")
    import jax

    if jax.config.jax_platforms != os.environ["JAX_PLATFORMS"]:  # JAX read it at import.
        jax.config.update("jax_platforms", os.environ["JAX_PLATFORMS"])
    if args.isolated_step:
        step = IsolatedStep(case_config(args.isolated_step, args))
        rate = step.rate(args.step_seconds)
        print(
            json.dumps(
                {"examples_per_sec": rate, "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}
            )
        )
        return
    env = provenance.environment(MODULE, args)
    cases = [name for name in args.cases.split(",") if name]
    if args.allocator_rounds:
        stem = args.out or os.path.join(RESULTS, "bench_trainer_allocator")
        _measure_and_merge(stem, cases, env, args, bench_allocator_case, allocator_markdown)
        return
    if args.workaround_rounds:
        stem = args.out or os.path.join(RESULTS, "bench_trainer_workarounds")
        # Rounds of earlier invocations with the same variants and steps are added to.
        variants = {
            v: {"env": e, "overrides": o}
            for v, (e, o) in WORKAROUND_VARIANTS.items()
            if v in workaround_variants(args)
        }
        previous = {}
        if os.path.exists(stem + ".json"):
            with open(stem + ".json") as f:
                for rec in json.load(f)["results"]:
                    steps = args.steps or CASES[rec["case"]][1]
                    if rec["variants"] == variants and rec["steps"] == steps:
                        previous[rec["case"]] = rec["rounds"]

        def bench(name: str, args: argparse.Namespace) -> dict[str, Any]:
            return bench_workaround_case(name, args, previous)

        _measure_and_merge(stem, cases, env, args, bench, workaround_markdown)
        return
    if args.noise_scale_rounds:
        stem = args.out or os.path.join(RESULTS, "bench_trainer_noise_scale")
        _measure_and_merge(stem, cases, env, args, bench_noise_scale_case, noise_scale_markdown)
        return
    records = [bench_case(name, args) for name in cases]
    env["load_average_end"] = os.getloadavg()
    stem = args.out or os.path.join(RESULTS, "bench_trainer")
    tables.write_outputs(
        stem, {"environment": env, "results": records}, markdown(env, records, args)
    )


if __name__ == "__main__":
    main()
