"""Tests of a workdir as a run's record: the config that started it (gbn_jax/trainer/workdir.py),
checkpoints that cannot be read, and checkpoint writes that fail
(gbn_jax/trainer/checkpointing.py), through the real trainer on Fashion-MNIST.

One reference run of 6 steps (checkpoints every 2 steps, the last two kept: 4 and 6;
logs every 3 steps, so checkpoint 4 holds the train-metric sums of step 4) is the
yardstick: a run that resumes from checkpoint 4, because checkpoint 6 is damaged or
could not be written, must end with the same metrics and parameters, bit for bit.
"""

import errno
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gbn_jax.trainer import checkpointing, metric_writer, train, workdir

# Orbax's asynchronous tasks still queued when a read or write failed report "Event
# loop is closed" once their loop is gone: noise of the failures these tests cause.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F1_CONFIG = os.path.join(ROOT, "configs", "fashion_mnist_f1.py")
ARG = "lb,batch=256,epochs_scale=0.002"
OVERRIDES = {
    "max_steps": 6,
    "checkpoint_every_steps": 2,
    "keep_checkpoints": 2,
    "log_every_steps": 3,
    "eval_every_steps": 100,
    "eval_batch_size": 2000,
}


def load_config(overrides=None, arg=ARG):
    spec = importlib.util.spec_from_file_location("experiment_config", F1_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    config.update_from_flattened_dict({**OVERRIDES, **(overrides or {})})
    return config


def read_metrics(path):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [
        {k: v for k, v in r.items() if k not in metric_writer.WALL_CLOCK_FIELDS} for r in records
    ]


def saved_steps(path):
    return sorted(int(d) for d in os.listdir(os.path.join(path, "checkpoints")) if d.isdigit())


def final_state(path):
    """The last checkpoint's train state as numpy arrays keyed by path."""
    state_dir = os.path.join(path, "checkpoints", str(saved_steps(path)[-1]), "state")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(state_dir).item_metadata
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata
        )
        state = checkpointer.restore(state_dir, target)
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def assert_same_run(path, ref_dir):
    """Same metrics (wall-clock fields aside) and bit-identical final parameters."""
    assert read_metrics(path) == read_metrics(ref_dir)
    assert saved_steps(path)[-1] == saved_steps(ref_dir)[-1] == 6
    state, ref_state = final_state(path), final_state(ref_dir)
    assert state.keys() == ref_state.keys()
    for key in ref_state:
        np.testing.assert_array_equal(state[key], ref_state[key], err_msg=key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, devices):
    """An uninterrupted run of 6 steps: its workdir (checkpoints 4 and 6)."""
    path = str(tmp_path_factory.mktemp("reference"))
    train.train_and_evaluate(load_config(), path)
    assert saved_steps(path) == [4, 6]
    return path


def copy_of(ref_dir, path, without_step=None):
    """A copy of the reference workdir, optionally as if stopped before a checkpoint."""
    shutil.copytree(ref_dir, path)
    if without_step is not None:
        shutil.rmtree(os.path.join(path, "checkpoints", str(without_step)))
    return str(path)


# ------------------------------------------------------------------ config identity


@pytest.mark.parametrize(
    "overrides, field, old, new",
    [
        ({"model.dtype": "bfloat16"}, "model.dtype", "'float32'", "'bfloat16'"),
        ({"regime.momentum": 0.5}, "regime.momentum", "0.9", "0.5"),
        ({"validation_size": 1000}, "validation_size", "0", "1000"),
        ({"seed": 1}, "seed", "0", "1"),
    ],
    ids=["model", "regime", "data", "seed"],
)
def test_changed_config_stops_before_compute(
    reference, tmp_path, monkeypatch, overrides, field, old, new
):
    """A field that defines the run, changed: an error naming the workdir and the field
    with its old and new value, before anything is compiled, even with the flag."""
    path = copy_of(reference, tmp_path / "run")
    names = ("config.json", "metrics.jsonl")
    before = {name: pathlib.Path(path, name).read_text() for name in names}

    def no_compute(*args, **kwargs):
        raise AssertionError("compiled before the config check")

    monkeypatch.setattr(jax, "jit", no_compute)
    for allow in (False, True):
        with pytest.raises(workdir.ConfigChangeError) as info:
            train.train_and_evaluate(load_config(overrides), path, allow_config_change=allow)
        message = str(info.value)
        assert path in message and "new --workdir" in message
        assert f"{field}: {old} -> {new} (defines the run)" in message
    for name, text in before.items():
        assert pathlib.Path(path, name).read_text() == text
    assert not os.path.exists(os.path.join(path, workdir.CHANGES_FILE))


def test_allowed_change_needs_the_flag_and_is_recorded(reference, tmp_path):
    """More steps and another eval cadence: refused without the flag (saying how to
    proceed), applied with it from the restored step, and recorded beside config.json."""
    path = copy_of(reference, tmp_path / "run")
    changed = load_config({"max_steps": 8, "eval_every_steps": 4})
    with pytest.raises(workdir.ConfigChangeError, match="--allow_config_change") as info:
        train.train_and_evaluate(changed, path)
    assert "max_steps: 6 -> 8\n" in str(info.value)
    assert "eval_every_steps: 100 -> 4\n" in str(info.value)

    summary = train.train_and_evaluate(changed, path, allow_config_change=True)
    assert summary["resumed_from_step"] == 6 and saved_steps(path) == [6, 8]
    assert read_metrics(path)[: len(read_metrics(reference))] == read_metrics(reference)
    assert [r["step"] for r in read_metrics(path)][-2:] == [6, 8]
    with (
        open(os.path.join(path, "config.json")) as f,
        open(os.path.join(reference, "config.json")) as g,
    ):
        assert json.load(f) == json.load(g)  # the config that started the run
    with open(os.path.join(path, workdir.CHANGES_FILE)) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 1 and records[0]["step"] == 6 and records[0]["time"]
    assert records[0]["changes"] == {
        "eval_every_steps": {"old": 100, "new": 4},
        "max_steps": {"old": 6, "new": 8},
    }
    # The run now follows the changed config: rerunning it needs no flag.
    assert (
        workdir.check_restart(path, metric_writer.config_to_dict(changed), allow_change=False) == {}
    )
    with pytest.raises(workdir.ConfigChangeError, match="max_steps: 8 -> 6"):
        workdir.check_restart(path, metric_writer.config_to_dict(load_config()), allow_change=False)


def test_more_epochs_are_allowed_only_when_no_change_of_the_schedule_moves(reference):
    """regime.epochs may grow while every learning-rate drop stays at its step; the
    same growth through epochs_scale, which moves the drops, defines another run."""
    longer = load_config({"regime.epochs": 0.2})
    changes = workdir.check_restart(
        reference,
        metric_writer.config_to_dict(longer),
        allow_change=True,
        fixed=lambda c: train._schedule(c, 60_000),
    )
    assert changes == {"regime.epochs": (0.1, 0.2)}
    stretched = load_config(arg="lb,batch=256,epochs_scale=0.004")
    with pytest.raises(workdir.ConfigChangeError, match=r"regime\.lr_schedule"):
        workdir.check_restart(
            reference,
            metric_writer.config_to_dict(stretched),
            allow_change=True,
            fixed=lambda c: train._schedule(c, 60_000),
        )


def test_allowed_changes_leave_the_run_defined():
    """Nothing that defines the updates is in the allowed list."""
    defining = ("model.", "regime.", "batch_size", "dataset", "seed", "augment", "validation")
    for name in workdir.ALLOWED_CHANGES:
        if name != "regime.epochs":
            assert not name.startswith(defining), name
    assert "xla_cpu_fast_options" not in workdir.ALLOWED_CHANGES


# ------------------------------------------------------------------ damaged checkpoints


def damage(path, step, item, how):
    """Cuts short or deletes one file of one item of one checkpoint, or the whole item.

    The file is one that restoring reads: the largest array data file of ``state``,
    the b-tree of ``train_metrics`` (which holds its scalars inline) and the JSON of
    ``data``.
    """
    item_dir = os.path.join(path, "checkpoints", str(step), item)
    if how == "item_deleted":
        shutil.rmtree(item_dir)
        return
    if item == "data":
        target = os.path.join(item_dir, "metadata")
    else:
        data_dir = os.path.join(item_dir, *(("ocdbt.process_0",) if item == "state" else ()), "d")
        target = max((os.path.join(data_dir, f) for f in os.listdir(data_dir)), key=os.path.getsize)
    if how == "truncated":
        os.truncate(target, os.path.getsize(target) // 2)
    else:
        os.remove(target)


def restore(path):
    """``restore_latest`` on a workdir's checkpoints, with targets from their metadata."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    newest_whole = os.path.join(path, "checkpoints", "4")
    targets = []
    with ocp.StandardCheckpointer() as checkpointer:
        for item in ("state", "train_metrics"):
            metadata = checkpointer.metadata(os.path.join(newest_whole, item)).item_metadata
            abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), metadata)
            targets += [abstract, jax.tree.map(lambda _: device, abstract)]
    manager = checkpointing.make_manager(path, keep=2)
    try:
        return checkpointing.restore_latest(manager, *targets), manager.latest_step()
    finally:
        manager.close()


@pytest.mark.parametrize(
    "item, how",
    [
        ("state", "truncated"),
        ("state", "deleted"),
        ("data", "truncated"),
        ("data", "deleted"),
        ("train_metrics", "truncated"),
        ("train_metrics", "deleted"),
        ("train_metrics", "item_deleted"),
    ],
)
def test_damaged_newest_checkpoint_restores_the_one_before(reference, tmp_path, capfd, item, how):
    """Checkpoint 6 with one file cut short or lost: a warning naming step 6 and the
    reason, checkpoint 6 moved aside (not deleted), and exactly what a workdir stopped
    at checkpoint 4 restores: train state, data position and metric sums."""
    path = copy_of(reference, tmp_path / "damaged")
    damage(path, 6, item, how)
    (step, state, data, metrics), latest = restore(path)
    err = capfd.readouterr().err
    assert f"checkpoint 6 in {path}/checkpoints cannot be restored (" in err
    assert "resuming from checkpoint 4" in err and "6.damaged-1" in err
    assert step == latest == 4
    assert sorted(os.listdir(os.path.join(path, "checkpoints"))) == ["4", "6.damaged-1"]

    (want_step, *want), _ = restore(copy_of(reference, tmp_path / "stopped", without_step=6))
    assert want_step == 4 and data == want[1]
    for got, expected in ((state, want[0]), (metrics, want[2])):
        jax.tree.map(np.testing.assert_array_equal, got, expected)


def test_resume_after_a_damaged_checkpoint_is_bit_exact(reference, tmp_path, capfd):
    """The trainer with checkpoint 6's state cut short: it resumes from 4, drops the
    metrics logged after 4, saves step 6 anew beside the damaged one and ends as the
    uninterrupted run, bit for bit."""
    path = copy_of(reference, tmp_path / "damaged")
    damage(path, 6, "state", "truncated")
    summary = train.train_and_evaluate(load_config(), path)
    out = capfd.readouterr()
    assert "checkpoint 6" in out.err and "OUT_OF_RANGE" in out.err
    assert f"resumed from {path}/checkpoints at step 4" in out.out
    assert summary["resumed_from_step"] == 4
    assert sorted(os.listdir(os.path.join(path, "checkpoints"))) == ["4", "6", "6.damaged-1"]
    assert_same_run(path, reference)


def test_no_checkpoint_restores_gives_a_short_error(reference, tmp_path):
    """Every checkpoint damaged: a few lines naming each one and what is wrong, and
    nothing moved or deleted."""
    path = copy_of(reference, tmp_path / "damaged")
    damage(path, 6, "state", "truncated")
    damage(path, 4, "data", "deleted")
    with pytest.raises(checkpointing.CheckpointError) as info:
        restore(path)
    lines = str(info.value).splitlines()
    assert lines[0] == f"no checkpoint in {path}/checkpoints can be restored:"
    assert lines[1].startswith("  step 6: ") and "OUT_OF_RANGE" in lines[1]
    assert lines[2].startswith("  step 4: FileNotFoundError")
    assert len(lines) == 4 and all(len(line) < 400 for line in lines)
    assert saved_steps(path) == [4, 6]
    assert sorted(os.listdir(os.path.join(path, "checkpoints"))) == ["4", "6"]


# ------------------------------------------------------------------ failed writes


def test_failed_write_stops_the_run_and_the_rerun_is_bit_exact(reference, tmp_path, monkeypatch):
    """An injected write error (ENOSPC) in the background write of checkpoint 6: the
    run stops with what failed and how to resume, checkpoint 4 stays, and the rerun
    ends as the uninterrupted run."""
    path = copy_of(reference, tmp_path / "run", without_step=6)
    handler = ocp.handlers.JsonCheckpointHandler

    async def disk_full(self, x, directory):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))

    with monkeypatch.context() as patch:
        patch.setattr(handler, "_save_fn", disk_full)
        with pytest.raises(checkpointing.CheckpointError) as info:
            train.train_and_evaluate(load_config(), path)
    message = str(info.value)
    assert f"could not write the checkpoint of step 6 to {path}/checkpoints" in message
    assert "No space left on device" in message and "MiB free of" in message
    assert "(step 4) are intact" in message and "resume from step 4" in message
    assert saved_steps(path) == [4]
    # The reference's summary went when the run trained on from step 4.
    assert not os.path.exists(os.path.join(path, "summary.json"))
    train.train_and_evaluate(load_config(), path)
    assert saved_steps(path) == [4, 6]
    assert_same_run(path, reference)


@pytest.fixture
def small_disk(tmp_path):
    """A directory on a tmpfs of its own (root only); unmounted afterwards."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")

    def resize(size):
        opts = f"remount,size={size}"
        subprocess.run(["mount", "-o", opts, str(mount_point)], check=True)

    yield mount_point, resize
    subprocess.run(["umount", str(mount_point)], check=False)


def test_full_disk_keeps_the_checkpoints_and_the_rerun_is_bit_exact(
    reference, tmp_path, small_disk
):
    """A real full disk (a tmpfs with room for half a checkpoint) while checkpoint 6 is
    written, keeping one checkpoint (so a successful write would delete 4): the run
    stops with the free space and how to resume; checkpoint 4 stays; after the disk is
    enlarged, the rerun resumes from 4 and ends as the uninterrupted run."""
    mount_point, resize = small_disk
    staged = copy_of(reference, tmp_path / "staged", without_step=6)
    used = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(staged) for f in fs)
    checkpoint = sum(
        os.path.getsize(os.path.join(d, f))
        for d, _, fs in os.walk(os.path.join(reference, "checkpoints", "6"))
        for f in fs
    )
    resize(f"{(used + checkpoint // 2) // 4096 * 4096}")
    path = str(mount_point / "run")
    shutil.copytree(staged, path)
    config = load_config({"keep_checkpoints": 1})
    with pytest.raises(checkpointing.CheckpointError) as info:
        train.train_and_evaluate(config, path, allow_config_change=True)
    message = str(info.value)
    assert f"could not write the checkpoint of step 6 to {path}/checkpoints" in message
    assert "(step 4) are intact" in message and "MiB free of" in message
    assert saved_steps(path) == [4]

    resize("256m")
    # keep_checkpoints=1 was recorded when the run restored step 4: no flag needed now.
    train.train_and_evaluate(config, path)
    assert saved_steps(path) == [6]
    assert_same_run(path, reference)


def test_cli_reports_a_changed_config_in_a_few_lines(reference, tmp_path):
    """The command line: exit status 1 and the message, not a traceback."""
    path = copy_of(reference, tmp_path / "run")
    args = [
        sys.executable,
        "-m",
        "gbn_jax.main",
        f"--config={F1_CONFIG}:lb_lr,batch=256,epochs_scale=0.002",
        f"--workdir={path}",
        *(f"--config.{k}={v}" for k, v in OVERRIDES.items()),
    ]
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert f"error: {path} holds a run started with another config" in done.stderr
    assert "regime.lr_scaling: 'none' -> 'sqrt' (defines the run)" in done.stderr
