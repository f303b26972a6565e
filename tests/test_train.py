"""Tests of the trainer (gbn_jax/trainer/train.py) and its command line (gbn_jax/trainer/main.py).

One short reference run of F1 on the real Fashion-MNIST files (8 fake CPU devices,
in this process) is the yardstick: a run stopped by SIGTERM, restarted, killed with
SIGKILL and restarted, and runs with other numbers of steps per dispatch, with
host-fed batches or with the device loop must end with the same metrics and parameters,
bit for bit; a run split over two processes with the same metrics to float rounding.
"""

import importlib.util
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from gbn_jax.trainer import metric_writer, regimes, steps, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F1_CONFIG = os.path.join(ROOT, "configs", "fashion_mnist_f1.py")
# Batch 256 = 2 x |B_S|; 32 examples per device = one ghost batch per device. With
# epochs_scale=0.002 the RA regime drops the LR at steps int(10 * 0.002 * 468) = 9 and
# 18, inside the 24 steps run here.
F1_ARG = "lb_lr_gbn_ra,batch=256,ghost=32,epochs_scale=0.002"
F1_OVERRIDES = {
    "max_steps": 24,
    "log_every_steps": 4,
    "log_schedule": "log",
    "eval_every_steps": 8,
    "checkpoint_every_steps": 6,
    "eval_batch_size": 2000,
    # The F1 regime's LRs / 5 (boundaries as scaled above): rounding differences between
    # device layouts then stay near rounding level over 24 steps.
    "regime.lr_schedule": ((0.0, 0.02), (0.02, 0.002), (0.04, 2e-4), (0.06, 2e-5)),
}


def load_config(path, arg, overrides=None):
    spec = importlib.util.spec_from_file_location("experiment_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    config.update_from_flattened_dict(overrides or {})
    return config


def cli(workdir, arg, overrides, *extra):
    return [
        sys.executable,
        "-m",
        "gbn_jax.main",
        f"--config={F1_CONFIG}:{arg}",
        f"--workdir={workdir}",
        *(
            f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}"
            for k, v in overrides.items()
        ),
        *extra,
    ]


def cli_env(num_devices=8):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    return env


def read_metrics(workdir, drop=metric_writer.WALL_CLOCK_FIELDS):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k not in drop} for r in records]


def checkpoint_state(workdir, step=None):
    """A checkpoint's train state (the last one by default) as a tree, read with orbax."""
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    step = steps[-1] if step is None else step
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as checkpointer:
        # An explicit target: the checkpoint may come from another device topology.
        metadata = checkpointer.metadata(path).item_metadata
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata
        )
        return step, checkpointer.restore(path, target)


def final_state(workdir):
    """The last checkpoint's train state as numpy arrays keyed by path."""
    step, state = checkpoint_state(workdir)
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return step, {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, devices):
    """An uninterrupted in-process run: (workdir, config, summary)."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    config = load_config(F1_CONFIG, F1_ARG, F1_OVERRIDES)
    summary = train.train_and_evaluate(config, workdir)
    return workdir, config, summary


# ------------------------------------------------------------------ end to end


def test_fashion_mnist_end_to_end(reference):
    workdir, config, summary = reference
    with open(os.path.join(workdir, "regime.json")) as f:
        assert json.load(f) == json.loads(json.dumps(regimes.resolve(config, 60_000).to_dict()))

    records = read_metrics(workdir, drop=())
    logged = [r["step"] for r in records if "train_loss" in r]
    evals = [r["step"] for r in records if "eval_accuracy" in r]
    # Every 4th step, plus ~20 log-spaced steps per decade: 1, 2, ..., 13, 14, 16, 18, 20.
    log_spaced = {round(10 ** (k / 20)) for k in range(28)}
    assert logged == sorted({s for s in range(1, 25) if s % 4 == 0} | log_spaced)
    assert evals == [8, 16, 24]
    assert [r["step"] for r in records] == sorted(set(logged) | set(evals))

    # Learning rate of the update that reached the logged step: 0.02 * sqrt(256/128)
    # up to step 9, then / 10 up to step 18, then / 100.
    for r in records:
        if "learning_rate" in r:
            base = 0.02 if r["step"] <= 9 else 0.002 if r["step"] <= 18 else 0.0002
            assert r["learning_rate"] == pytest.approx(base * math.sqrt(2), rel=1e-6)
        assert r["epoch"] == pytest.approx(r["step"] / (60_000 // 256))
    train_losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert train_losses[-1] < 0.6 * train_losses[0]
    assert all(
        r["grad_norm"] > 0 and r["examples_per_sec"] > 0 for r in records if "grad_norm" in r
    )
    assert records[-1]["eval_accuracy"] > 0.6

    # weight_distance against numpy on the final checkpoint's params and params0.
    step, state = final_state(workdir)
    assert step == 24
    sq = sum(
        np.sum(
            (state[k].astype(np.float64) - state[k.replace("['params']", "['params0']", 1)]) ** 2
        )
        for k in state
        if k.startswith("['params']")
    )
    assert records[-1]["weight_distance"] == pytest.approx(math.sqrt(sq), rel=1e-5)

    with open(os.path.join(workdir, "summary.json")) as f:
        written = json.load(f)
    assert written["final_eval_accuracy"] == records[-1]["eval_accuracy"]
    assert written["best_eval_accuracy"] == max(
        r["eval_accuracy"] for r in records if "eval_accuracy" in r
    )
    assert (written["steps"], written["devices"], written["process_count"]) == (24, 8, 1)
    assert written["config"]["batch_size"] == 256
    assert summary["final_eval_accuracy"] == written["final_eval_accuracy"]
    assert any(
        name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(workdir, "tb"))
    )
    # Checkpoints every 6 steps, the last three kept.
    assert sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))) == [12, 18, 24]


def test_mock_cifar10_c1_end_to_end(tmp_path, devices):
    config = load_config(
        os.path.join(ROOT, "configs", "cifar10_c1.py"),
        "lb_lr_gbn,batch=64,ghost=8",
        {"max_steps": 3, "eval_batch_size": 64, "data_dir": str(tmp_path / "data")},
    )
    with tfds.testing.mock_data(num_examples=160):
        summary = train.train_and_evaluate(config, str(tmp_path / "run"))
    records = read_metrics(str(tmp_path / "run"))
    assert records[-1]["step"] == 3 and "train_loss" in records[-1]
    assert 0.0 <= summary["final_eval_accuracy"] <= 1.0
    assert all(math.isfinite(records[-1][k]) for k in ("train_loss", "weight_distance"))
    assert records[-1]["weight_distance"] > 0


# ------------------------------------------------------------------ resumption


def without_noise_scale(records):
    """The records with their B_simple fields left out, and records of nothing else."""
    records = [{k: v for k, v in r.items() if not k.startswith("noise_")} for r in records]
    return [r for r in records if r.keys() - {"step", "epoch"}]


def assert_same_run(workdir, ref_dir):
    """Same metrics (wall-clock fields aside) and bit-identical final parameters."""
    assert without_noise_scale(read_metrics(workdir)) == read_metrics(ref_dir)
    (step, state), (ref_step, ref_state) = final_state(workdir), final_state(ref_dir)
    assert step == ref_step == 24 and state.keys() == ref_state.keys()
    for key in ref_state:
        np.testing.assert_array_equal(state[key], ref_state[key], err_msg=key)


@pytest.mark.parametrize(
    "overrides",
    [
        {"steps_per_loop": 1},
        {"steps_per_loop": 3},
        {"device_resident_data": False},
        {"device_loop": True},
    ],
    ids=["one_step_per_dispatch", "three_steps_per_dispatch", "streamed_from_host", "device_loop"],
)
def test_steps_per_loop_and_data_path_change_nothing(reference, tmp_path, overrides):
    """K = 1, K = 3, host-fed batches and the device loop against the reference (K
    unset: up to 4 steps per dispatch, each dispatch cut at the logs of steps 1-13, 14,
    16, 18, 20, the evals and the checkpoints; on the CPU one program per step), bit for
    bit. K = 3 mixes full dispatches (steps 21-23) with cut ones (14-16, ...); the
    device loop runs each dispatch's steps in one fori_loop program."""
    ref_dir = reference[0]
    config = load_config(F1_CONFIG, F1_ARG, {**F1_OVERRIDES, **overrides})
    train.train_and_evaluate(config, str(tmp_path))
    assert_same_run(str(tmp_path), ref_dir)


def wait_for_step(proc, workdir, step):
    """Polls the run's metrics.jsonl until it logs a step >= ``step`` or ``proc`` ends."""
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    while proc.poll() is None:
        if os.path.exists(metrics_path):
            with open(metrics_path) as f:
                steps = [json.loads(line)["step"] for line in f if line.endswith("\n")]
            if steps and steps[-1] >= step:
                return
        time.sleep(0.01)


def test_sigterm_then_sigkill_and_resume_is_bit_exact(reference, tmp_path):
    """The command line stopped twice, then run to the end: the run ends as the
    uninterrupted one, bit for bit.

    1. A real SIGTERM with no periodic checkpoint due: the run saves the step it reached
       and exits 0 within seconds.
    2. The rerun (periodic checkpoints every 6 steps from here on, an allowed change)
       resumes from that step and is killed with SIGKILL at a random point after its
       first periodic checkpoint, possibly while a checkpoint is being written.
    3. The last rerun ignores and removes a half-written checkpoint (orbax's tmp suffix)
       and resumes from the newest whole checkpoint.
    """
    ref_dir = reference[0]
    workdir = str(tmp_path / "stopped")
    rng = random.Random()

    # 1. SIGTERM.
    overrides = {**F1_OVERRIDES, "checkpoint_every_steps": 1000}
    signal_after = rng.randint(2, 10)
    proc = subprocess.Popen(
        cli(workdir, F1_ARG, overrides),
        cwd=ROOT,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_step(proc, workdir, signal_after)
    assert proc.poll() is None, f"run ended before the signal: {proc.stderr.read()[-2000:]}"
    proc.send_signal(signal.SIGTERM)
    sent = time.time()
    out, err = proc.communicate(timeout=120)
    assert time.time() - sent < 60 and proc.returncode == 0, err[-3000:]
    saved = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
    assert len(saved) == 1 and signal_after <= saved[0] < 24, (saved, out[-500:])
    assert f"preemption notice (SIGTERM): saved step {saved[0]}" in out
    assert not os.path.exists(os.path.join(workdir, "summary.json"))

    # 2. SIGKILL, somewhere after the first periodic checkpoint (step 6).
    kill_after = rng.randint(max(7, saved[0] + 1), max(20, saved[0] + 1))
    proc = subprocess.Popen(
        cli(workdir, F1_ARG, F1_OVERRIDES, "--allow_config_change"),
        cwd=ROOT,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_step(proc, workdir, kill_after)
    time.sleep(rng.uniform(0.0, 0.2))
    assert proc.poll() is None, f"run ended before the kill: {proc.stderr.read()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate()
    assert f"at step {saved[0]}" in out

    # 3. A half-written checkpoint must be ignored and cleaned up.
    fake = os.path.join(workdir, "checkpoints", "23.orbax-checkpoint-tmp-1234567890")
    os.makedirs(os.path.join(fake, "state"))
    with open(os.path.join(fake, "state", "garbage"), "w") as f:
        f.write("not a checkpoint")

    done = subprocess.run(
        cli(workdir, F1_ARG, F1_OVERRIDES), cwd=ROOT, env=cli_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout
    assert not os.path.exists(fake)
    assert_same_run(workdir, ref_dir)


def test_rerun_of_finished_run_changes_nothing(reference, tmp_path):
    """Restarting a finished run restores the last step and trains no further."""
    ref_dir, config, summary = reference
    before = read_metrics(ref_dir, drop=())
    again = train.train_and_evaluate(config, ref_dir)
    assert read_metrics(ref_dir, drop=()) == before
    assert again["resumed_from_step"] == 24
    assert again["final_eval_accuracy"] == summary["final_eval_accuracy"]


# ------------------------------------------------------------------ multi-process


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


TWO_PROCESS_OVERRIDES = {**F1_OVERRIDES, "xla_cpu_fast_options": False}


def two_processes(workdir, overrides):
    """The CLI as 2 processes x 4 CPU devices (jax.distributed), started, not waited for."""
    port = _free_port()
    return [
        subprocess.Popen(
            cli(
                workdir,
                F1_ARG,
                overrides,
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ),
            cwd=ROOT,
            env=cli_env(num_devices=4),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory, devices):
    """Workdirs of the reference config (XLA's default CPU options) run uninterrupted as
    2 processes x 4 devices (the command line) and as 1 process x 8 devices (this
    process, while the two run)."""
    ref_dir = str(tmp_path_factory.mktemp("one_process"))
    workdir = str(tmp_path_factory.mktemp("two_processes"))
    procs = two_processes(workdir, TWO_PROCESS_OVERRIDES)
    train.train_and_evaluate(load_config(F1_CONFIG, F1_ARG, TWO_PROCESS_OVERRIDES), ref_dir)
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return workdir, ref_dir


def test_two_processes_match_one(two_process_runs):
    """2 processes x 4 devices against 1 process x 8 devices, same config.

    Both with XLA's default CPU options, under which the per-device programs compute
    bit for bit alike and only the all-reduce order differs. Under
    steps.XLA_CPU_FAST_OPTIONS the first update already differs by float32 rounding
    (1e-7 in ||w_1 - w_0||; presumably the Eigen kernels split work by how many devices share
    a process's threads), which then grows as any kernel change does (compare
    test_xla_cpu_fast_options_train_the_same): 9e-5 in ||w_t - w_0|| and 7e-3 in the
    batch metrics by step 24, too much for this test's tolerances.
    """
    workdir, ref_dir = two_process_runs
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    assert (summary["process_count"], summary["devices"]) == (2, 8)
    mine, ref = read_metrics(workdir), read_metrics(ref_dir)
    assert [r.keys() for r in mine] == [r.keys() for r in ref]
    # Same data, init and first update: step 1 agrees to float32 rounding. Its metrics
    # are means over the 8 devices, summed 2 x 4 through gloo in one run and 8 in one
    # process in the other, so the order of the sum differs and the loss may differ in
    # its last bit (seen: 2.3974824 against 2.3974822). Afterwards the same holds for
    # the gradient all-reduce; the rounding differences (1e-7 at step 2) grow through
    # training, to ~1e-4 by step 24 at these learning rates (~1e-2 at the F1 regime's
    # five times larger ones), hence a tolerance of 1e-3 after step 1.
    assert mine[0] == pytest.approx(ref[0], rel=1e-6, abs=0)
    for a, b in zip(mine, ref, strict=True):
        for key in b:
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-6), (a["step"], key)
    (_, state), (_, ref_state) = final_state(workdir), final_state(ref_dir)
    diff = math.sqrt(
        sum(np.sum((state[k] - ref_state[k]) ** 2) for k in ref_state if "params'" in k)
    )
    assert diff < 1e-3 * ref[-1]["weight_distance"]


def test_xla_cpu_fast_options_train_the_same(reference, two_process_runs):
    """The CPU default (Eigen dots, kept barriers and host buffers) against XLA's own.

    The reference runs with the default options; this run turns them off.
    """
    ref_dir, config, _ = reference
    assert steps.compiler_options(config) == steps.XLA_CPU_FAST_OPTIONS
    config.xla_cpu_fast_options = False
    assert steps.compiler_options(config) == {}
    config.xla_cpu_fast_options = True
    # The one-process run of two_process_runs: this config with XLA's defaults, 8 devices.
    workdir = two_process_runs[1]
    mine, ref = read_metrics(workdir), read_metrics(ref_dir)
    assert [r.keys() for r in mine] == [r.keys() for r in ref]
    # Other matmul kernels round differently (grad_norm 6e-5 apart at step 1 with 32
    # examples per device; 1e-8 at batch 4096); over 24 steps at these LRs that grows
    # to ~1e-2 in the batch metrics but stays below 5e-4 in ||w_t - w_0||.
    assert mine[0]["train_loss"] == pytest.approx(ref[0]["train_loss"], rel=1e-5)
    assert mine[0]["grad_norm"] == pytest.approx(ref[0]["grad_norm"], rel=5e-4)
    for a, b in zip(mine, ref, strict=True):
        assert a["weight_distance"] == pytest.approx(b["weight_distance"], rel=1e-3)
        for key in b:
            assert a[key] == pytest.approx(b[key], rel=3e-2, abs=1e-6), (a["step"], key)


def test_sigterm_to_one_of_two_processes(two_process_runs, tmp_path):
    """SIGTERM to process 1 only: JAX's preemption service has both processes save the
    same step and exit 0; the rerun ends as the uninterrupted two-process run."""
    ref_dir = two_process_runs[0]
    workdir = str(tmp_path / "preempted")
    overrides = {**TWO_PROCESS_OVERRIDES, "checkpoint_every_steps": 1000}
    procs = two_processes(workdir, overrides)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    while all(p.poll() is None for p in procs):
        if os.path.exists(metrics_path):
            with open(metrics_path) as f:
                steps = [json.loads(line)["step"] for line in f if line.endswith("\n")]
            if steps and steps[-1] >= 4:
                break
        time.sleep(0.01)
    assert all(p.poll() is None for p in procs), procs[0].stderr.read()[-2000:]
    procs[1].send_signal(signal.SIGTERM)
    sent = time.time()
    outputs = [p.communicate(timeout=120) for p in procs]
    assert time.time() - sent < 60
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    saved = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
    assert len(saved) == 1 and 4 <= saved[0] < 24, saved
    assert f"saved step {saved[0]}" in outputs[0][0]

    outputs = [p.communicate(timeout=300) for p in two_processes(workdir, overrides)]
    assert f"at step {saved[0]}" in outputs[0][0]
    assert read_metrics(workdir) == read_metrics(ref_dir)
    (_, state), (_, ref_state) = final_state(workdir), final_state(ref_dir)
    for key in ref_state:
        np.testing.assert_array_equal(state[key], ref_state[key], err_msg=key)


# ------------------------------------------------------------------ noise scale

# B_simple every 3 steps in shards of b = 32 (one per device, ghost 32): merged into the
# log records of steps 3 and 9, records of their own at 0, 15, 21 and at the checkpoints
# 6, 12, 18 (whose log records are written before the checkpoint). K becomes 3.
NOISE_OVERRIDES = {"noise_scale.every_steps": 3, "noise_scale.small_batch_size": 32}


@pytest.fixture(scope="module")
def noise_scale_run(tmp_path_factory, devices):
    """The reference run with B_simple logged: (workdir, config)."""
    workdir = str(tmp_path_factory.mktemp("noise_scale"))
    config = load_config(F1_CONFIG, F1_ARG, {**F1_OVERRIDES, **NOISE_OVERRIDES})
    train.train_and_evaluate(config, workdir)
    return workdir, config


def test_noise_scale_logging_changes_no_training_result(reference, noise_scale_run):
    """Flag on against off: the same metrics and final state, bit for bit."""
    workdir, _ = noise_scale_run
    assert_same_run(workdir, reference[0])
    measured = [r for r in read_metrics(workdir) if metric_writer.NOISE_SCALE_FIELD in r]
    assert [r["step"] for r in measured] == list(range(0, 24, 3))
    for r in measured:
        assert r["noise_sq_norm_small"] > r["noise_sq_norm_big"] > 0
        assert r["noise_b_simple"] == pytest.approx(r["noise_trace_sigma"] / r["noise_grad_sq"])


def test_noise_scale_after_resume_is_measured_once(noise_scale_run, tmp_path):
    """A run stopped at step 12 (its checkpoint) and resumed: step 12's measurement,
    taken after that checkpoint, is taken again, not duplicated, and every B_simple
    record equals the uninterrupted run's."""
    workdir = str(tmp_path)
    overrides = {**F1_OVERRIDES, **NOISE_OVERRIDES}
    train.train_and_evaluate(
        load_config(F1_CONFIG, F1_ARG, {**overrides, "max_steps": 12}), workdir
    )
    # As if killed after step 12's measurement was written: the resume drops and redoes it.
    assert read_metrics(workdir)[-1]["step"] == 12
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write(
            json.dumps({"step": 12, "epoch": 0.05, metric_writer.NOISE_SCALE_FIELD: -1.0}) + "\n"
        )
    # Training on past max_steps is a change the workdir records (gbn_jax/trainer/workdir.py).
    train.train_and_evaluate(
        load_config(F1_CONFIG, F1_ARG, overrides), workdir, allow_config_change=True
    )

    def measured(records):
        return [
            {k: v for k, v in r.items() if k.startswith("noise_") or k == "step"}
            for r in records
            if metric_writer.NOISE_SCALE_FIELD in r
        ]

    assert measured(read_metrics(workdir)) == measured(read_metrics(noise_scale_run[0]))


def test_noise_scale_matches_per_shard_gradients_in_numpy(noise_scale_run):
    """The values logged at step 12 from the checkpointed state, recomputed with
    jax.grad shard by shard on the batch that update 13 trains on."""
    from gbn_jax import models
    from gbn_jax.trainer import input_pipeline

    workdir, config = noise_scale_run
    step, state = checkpoint_state(workdir, 12)
    logged = next(r for r in read_metrics(workdir) if r["step"] == 12 and "noise_b_simple" in r)
    it = input_pipeline.create_train_iterator(
        config.dataset,
        global_batch_size=config.batch_size,
        seed=config.seed,
        sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]),
        batch_groups=config.batch_size // config.model.ghost_batch_size,
    )
    for _ in range(step):
        next(it)
    batch = jax.device_get(next(it))
    model = models.get_model(
        "f1", num_classes=10, **{k: v for k, v in config.model.to_dict().items() if k != "name"}
    )

    def loss(params, image, label):
        logits, _ = model.apply(
            {"params": params, "batch_stats": state["batch_stats"]},
            image,
            train=True,
            mutable=["batch_stats"],
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, label).mean()

    grad = jax.jit(jax.grad(loss))
    b, big = config.noise_scale.small_batch_size, config.batch_size
    grads = np.stack(
        [
            np.concatenate(
                [
                    np.ravel(g)
                    for g in jax.tree.leaves(
                        grad(
                            state["params"],
                            batch["image"][s : s + b],
                            batch["label"][s : s + b],
                        )
                    )
                ]
            ).astype(np.float64)
            for s in range(0, big, b)
        ]
    )
    sq_small = np.mean(np.sum(grads**2, axis=1))
    sq_big = np.sum(grads.mean(axis=0) ** 2)
    grad_sq = (big * sq_big - b * sq_small) / (big - b)
    trace_sigma = (sq_small - sq_big) / (1 / b - 1 / big)
    np.testing.assert_allclose(logged["noise_sq_norm_small"], sq_small, rtol=1e-4)
    np.testing.assert_allclose(logged["noise_sq_norm_big"], sq_big, rtol=1e-4)
    np.testing.assert_allclose(logged["noise_grad_sq"], grad_sq, rtol=1e-3)
    np.testing.assert_allclose(logged["noise_trace_sigma"], trace_sigma, rtol=1e-3)
    np.testing.assert_allclose(logged["noise_b_simple"], trace_sigma / grad_sq, rtol=2e-3)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "arg, overrides, message",
    [
        ("lb,batch=100", {}, "batch_size=100 is not divisible by the 8 devices"),
        ("lb_lr_gbn,batch=256,ghost=48", {}, "not divisible by the ghost batch size 48"),
        ("lb,model=resnet7", {}, "unknown model 'resnet7'"),
        ("lb,dataset=no_such_dataset", {}, "no_such_dataset"),
        ("lb,dataset=mnist", {"data_dir": "EMPTY"}, "tfds build mnist"),
        ("lb", {"noise_scale.every_steps": 0}, r"noise_scale.every_steps=0 must be a positive"),
        (
            "lb_lr_gbn,batch=256,ghost=32,noise_scale_every=5",
            {"noise_scale.small_batch_size": 256},
            "small_batch_size=256 must divide batch_size=256 at least twice",
        ),
        (
            "lb_lr_gbn,batch=256,ghost=32,noise_scale_every=5",
            {"noise_scale.small_batch_size": 24},
            "small_batch_size=24 must divide batch_size=256",
        ),
        (
            "lb_lr_gbn,batch=256,ghost=32,noise_scale_every=5",
            {"noise_scale.small_batch_size": 64},
            "small_batch_size=64 does not divide the per-device batch 32",
        ),
        (
            "lb_lr_gbn,batch=256,ghost=32,noise_scale_every=5",
            {"noise_scale.small_batch_size": 16},
            "small_batch_size=16 is not a multiple of the ghost batch size 32",
        ),
    ],
    ids=[
        "batch_vs_devices",
        "ghost_vs_per_device",
        "model",
        "dataset",
        "missing_dataset",
        "noise_every",
        "noise_small_is_batch",
        "noise_small_vs_batch",
        "noise_small_vs_per_device",
        "noise_ghost_vs_small",
    ],
)
def test_bad_config_fails_before_compute(arg, overrides, message, tmp_path, devices):
    overrides = {k: str(tmp_path / "empty") if v == "EMPTY" else v for k, v in overrides.items()}
    config = load_config(F1_CONFIG, arg, overrides)
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.parametrize(
    "arg, message",
    [
        ("lb_huge", "unknown config variant 'lb_huge'"),
        ("lb,bacth=64", "unknown config option"),
        ("lb,noise_scale_every=0", "noise_scale_every=0 must be a positive number of steps"),
        ("lb,noise_scale_every=often", "noise_scale_every='often' is not a valid int"),
    ],
)
def test_bad_config_argument(arg, message):
    with pytest.raises(ValueError, match=message):
        load_config(F1_CONFIG, arg)


def test_nan_loss_exits_nonzero_and_keeps_last_good_checkpoint(tmp_path):
    """LR 1e38 from step 5 on overflows the weights; the CLI must stop and exit 1."""
    workdir = str(tmp_path / "nan")
    # Without RA, 234 steps per epoch: the LR jumps at int(0.02 * 234) = step 4, so
    # update 5 (which uses the LR of step 4) is the first to blow up.
    overrides = {
        "max_steps": 20,
        "checkpoint_every_steps": 2,
        "eval_every_steps": 100,
        "regime.lr_schedule": ((0.0, 0.01), (0.02, 1e38)),
    }
    args = cli(workdir, "lb,batch=256,epochs_scale=0.002", overrides)
    done = subprocess.run(args, cwd=ROOT, env=cli_env(), capture_output=True, text=True)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "non-finite training loss at step 6" in done.stderr
    assert "last good checkpoint (step 4)" in done.stderr
    step, state = final_state(workdir)
    assert step == 4
    assert all(np.isfinite(v).all() for v in state.values())
    assert not any(
        d.isdigit() and int(d) > 4 for d in os.listdir(os.path.join(workdir, "checkpoints"))
    )


# ------------------------------------------------------------ the authors' protocol


@pytest.mark.parametrize("norm", ["batch", "ghost"])
def test_padded_partial_batch_steps_like_the_compact_batch(norm):
    """A partial batch padded to 256 rows with a mask trains like the 200 real rows.

    With ghost norm (ghost 32: 8 groups) the 200 rows sit as 8 chunks of 25 (torch.chunk
    in the authors' main_gbn.py), so the reference is the compact batch with ghost 25.
    """
    from gbn_jax import models
    from gbn_jax.trainer.data import iterators

    rng = np.random.default_rng(6)
    n, batch, ghost = 200, 256, 32
    images = rng.normal(size=(n, 28, 28, 1)).astype(np.float32)
    labels = rng.integers(0, 10, n).astype(np.int32)
    slots = iterators.partial_batch_slots(
        np.arange(n), batch, batch // ghost if norm == "ghost" else 1
    )
    real = slots >= 0
    padded = {
        "image": np.where(real[:, None, None, None], images[np.maximum(slots, 0)], 0.0),
        "label": np.where(real, labels[np.maximum(slots, 0)], 0).astype(np.int32),
        "mask": real,
    }
    tx = optax.sgd(0.1, momentum=0.9)

    def one_step(ghost_size, batch_):
        model = models.get_model(
            "f1", num_classes=10, norm=norm, ghost_batch_size=ghost_size, width=32
        )
        create = lambda key: steps.create_train_state(key, model, tx, (28, 28, 1))
        state = jax.jit(create)(jax.random.key(0))
        step = jax.jit(steps.make_train_step(model, tx, lambda s: 0.1))
        return step(state, batch_, jax.random.key(1))

    got_state, got = one_step(ghost, padded)
    want_state, want = one_step(
        n // 8 if norm == "ghost" else ghost, {"image": images, "label": labels}
    )
    for key in ("loss", "accuracy", "grad_norm"):
        np.testing.assert_allclose(got[key], want[key], rtol=2e-5)
    for a, b in zip(
        jax.tree.leaves((got_state.params, got_state.batch_stats)),
        jax.tree.leaves((want_state.params, want_state.batch_stats)),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)


def test_authors_protocol_end_to_end_with_validation_split(tmp_path, devices):
    """protocol=authors through the trainer: 1,000 training images at batch 512 give
    2 steps per epoch, the second a partial batch of 488 (8 ghost chunks of 61); B_simple
    asked for at every step skips the steps before the partial batches."""
    workdir = str(tmp_path / "authors")
    config = load_config(
        F1_CONFIG,
        "lb_lr_gbn,protocol=authors,batch=512,ghost=64,validation=59000,epochs_scale=0.06"
        ",noise_scale_every=1",
        {"eval_batch_size": 2000, "noise_scale.small_batch_size": 64},
    )
    summary = train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "regime.json")) as f:
        regime = json.load(f)
    assert regime["steps_per_epoch"] == 2 and regime["total_steps"] == 6
    assert regime["momentum_reset"] and regime["keep_last_batch"]
    # main_gbn.py scales against the ghost size.
    assert math.isclose(regime["lr_boundaries"][0][1], 0.1 * math.sqrt(512 / 64))
    records = read_metrics(workdir)
    evals = [r for r in records if "val_accuracy" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert all(np.isfinite(r["val_loss"]) and np.isfinite(r["eval_loss"]) for r in evals)
    best_val = max(evals, key=lambda r: r["val_accuracy"])
    assert summary["best_val_accuracy"] == best_val["val_accuracy"]
    assert summary["eval_accuracy_at_best_val"] == best_val["eval_accuracy"]
    assert summary["best_eval_accuracy"] == max(r["eval_accuracy"] for r in evals)
    assert summary["final_eval_accuracy"] == evals[-1]["eval_accuracy"]
    # B_simple at every step but those whose next batch (update t + 1) is the padded one.
    assert [r["step"] for r in records if "noise_b_simple" in r] == [0, 2, 4]
    _, state = final_state(workdir)
    scales = [v for k, v in state.items() if "scale" in k and "params0" in k]
    # gamma ~ U[0, 1) at step 0 (the checkpoint keeps the step-0 parameters).
    assert len(scales) == 5 and all(np.all((s >= 0) & (s < 1)) for s in scales)
