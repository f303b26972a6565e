"""Tests of gbn_jax/trainer/cadence.py against step lists worked out by hand."""

import ml_collections
import pytest

from gbn_jax.trainer import cadence as cadence_lib
from gbn_jax.trainer.cadence import Cadence, DispatchTimer


def steps_where(cadence, event):
    return [s for s in range(cadence.total_steps + 1) if s and cadence.itstime(event, s)]


def dispatch_ends(cadence, stop_step=lambda step, n: None, seconds_per_step=None):
    """The steps each dispatch of a whole run ends at."""
    step, ends = 0, []
    while step < cadence.total_steps:
        n, stop = cadence.next_dispatch(step, seconds_per_step, stop_step)
        step += n
        ends.append(step)
        if stop:
            break
    return ends


def make_config(**overrides):
    config = ml_collections.ConfigDict(
        {
            "log_every_steps": 50,
            "log_schedule": "linear",
            "eval_every_steps": None,
            "eval_every_epochs": 1.0,
            "checkpoint_every_steps": 1000,
            "steps_per_loop": None,
            "noise_scale": {"every_steps": None},
            "batch_size": 64,
            "keep_last_batch": False,
        }
    )
    config.update(overrides)
    return config


def test_linear_schedules():
    cadence = Cadence(total_steps=20, log_every=4, eval_every=8, checkpoint_every=6, loop_steps=4)
    assert steps_where(cadence, "log") == [4, 8, 12, 16, 20]
    assert steps_where(cadence, "eval") == [8, 16, 20]
    assert steps_where(cadence, "checkpoint") == [6, 12, 18, 20]
    assert steps_where(cadence, "noise") == []
    with pytest.raises(ValueError, match="unknown event"):
        cadence.itstime("save", 4)


def test_log_spaced_steps():
    # 10 ** (k / 5) for k = 0..7 is 1, 1.58, 2.51, 3.98, 6.31, 10, 15.8, 25.1 (39.8 > 30).
    assert log_spaced(30, 5) == [1, 2, 3, 4, 6, 10, 16, 25]
    assert log_spaced(0, 5) == []
    # 20 per decade: 10 ** (k / 20) for k = 20..28 is 10, 11.2, 12.6, 14.1, 15.8, 17.8,
    # 19.95, 22.4, 25.1: no 12; below 10 every step is hit.
    assert log_spaced(24, 20) == [*range(1, 12), 13, 14, 16, 18, 20, 22]


def log_spaced(total, per_decade):
    return sorted(cadence_lib.log_spaced_steps(total, per_decade=per_decade))


def test_log_schedule_from_config():
    config = make_config(log_every_steps=10, log_schedule="log", checkpoint_every_steps=25)
    cadence = Cadence.from_config(
        config, total_steps=30, steps_per_epoch=12, num_train_examples=640
    )
    # Every 10th step, the log-spaced steps of a 30-step run, and the last step.
    assert steps_where(cadence, "log") == [*range(1, 12), 13, 14, 16, 18, 20, 22, 25, 28, 30]
    assert steps_where(cadence, "eval") == [12, 24, 30]  # one epoch is 12 steps
    assert steps_where(cadence, "checkpoint") == [25, 30]
    assert cadence.loop_steps == 10  # the shortest cadence


def test_noise_steps_skip_the_step_before_a_padded_batch():
    # 2 steps per epoch; updates 2, 4, 6 train on the padded last batch of an epoch.
    kwargs = dict(total_steps=6, log_every=2, eval_every=2, checkpoint_every=6, loop_steps=1)
    plain = Cadence(**kwargs, noise_every=1, steps_per_epoch=2)
    padded = Cadence(**kwargs, noise_every=1, steps_per_epoch=2, padded_last_batch=True)
    assert [s for s in range(6) if plain.itstime("noise", s)] == [0, 1, 2, 3, 4, 5]
    assert [s for s in range(6) if padded.itstime("noise", s)] == [0, 2, 4]
    every_3 = Cadence(**kwargs, noise_every=3, steps_per_epoch=4, padded_last_batch=True)
    # Steps 3 and 7 precede updates 4 and 8 (padded): 3 is skipped.
    assert [s for s in range(6) if every_3.itstime("noise", s)] == [0]


def test_dispatches_end_at_every_boundary():
    cadence = Cadence(total_steps=20, log_every=4, eval_every=8, checkpoint_every=6, loop_steps=4)
    # From 0: 4 steps; then cut at the checkpoint 6, the log 8; 4 to 12 and to 16; cut
    # at the checkpoint 18; the last 2 steps.
    assert dispatch_ends(cadence) == [4, 6, 8, 12, 16, 18, 20]
    with_noise = Cadence(
        total_steps=20, log_every=4, eval_every=8, checkpoint_every=6, loop_steps=4, noise_every=5
    )
    assert dispatch_ends(with_noise) == [4, 5, 6, 8, 10, 12, 15, 16, 18, 20]


def test_timed_dispatches_keep_to_loop_seconds():
    cadence = Cadence(
        total_steps=100,
        log_every=50,
        eval_every=50,
        checkpoint_every=50,
        loop_steps=10,
        timed=True,
    )
    assert cadence_lib.LOOP_SECONDS == 1.0
    assert cadence.chunk_length(0, None) == 1  # not timed yet
    assert cadence.chunk_length(0, 0.3) == 3  # int(1 / 0.3)
    assert cadence.chunk_length(0, 2.0) == 1  # at least one step
    assert cadence.chunk_length(0, 0.001) == 10  # at most K
    assert cadence.chunk_length(45, 0.1) == 5  # cut at the boundary 50
    untimed = Cadence(
        total_steps=100, log_every=50, eval_every=50, checkpoint_every=50, loop_steps=10
    )
    assert untimed.chunk_length(0, None) == untimed.chunk_length(0, 2.0) == 10


def test_preemption_stop():
    cadence = Cadence(total_steps=20, log_every=4, eval_every=8, checkpoint_every=6, loop_steps=4)
    asked = []

    def stop_at(target):
        def stop_step(step, n):
            asked.append((step, n))
            return target if step < target <= step + n or step == target else None

        return stop_step

    # One process: stop at the step reached (no steps run).
    assert cadence.next_dispatch(8, None, lambda step, n: step) == (0, True)
    # Several: stop at the agreed step inside the coming dispatch.
    assert dispatch_ends(cadence, stop_at(10)) == [4, 6, 8, 10]
    assert asked == [(0, 4), (4, 2), (6, 2), (8, 4)]
    assert dispatch_ends(cadence, stop_at(6)) == [4, 6]


def test_steps_per_loop():
    assert cadence_lib.steps_per_loop(make_config(), eval_every=30, total_steps=500) == 30
    noise = make_config(noise_scale={"every_steps": 25})
    assert cadence_lib.steps_per_loop(noise, eval_every=30, total_steps=500) == 25
    assert cadence_lib.steps_per_loop(make_config(), eval_every=30, total_steps=7) == 7
    fixed = make_config(steps_per_loop=100)
    assert cadence_lib.steps_per_loop(fixed, eval_every=30, total_steps=7) == 100


def test_from_config():
    config = make_config(log_every_steps=20, eval_every_epochs=0.5, checkpoint_every_steps=40)
    cadence = Cadence.from_config(
        config, total_steps=200, steps_per_epoch=30, num_train_examples=640, max_loop_steps=8
    )
    assert (cadence.eval_every, cadence.loop_steps, cadence.timed) == (15, 8, True)
    two = Cadence.from_config(
        config, total_steps=200, steps_per_epoch=30, num_train_examples=640, process_count=2
    )
    assert (two.loop_steps, two.timed) == (15, False)
    fixed = Cadence.from_config(
        make_config(steps_per_loop=3, eval_every_steps=7),
        total_steps=200,
        steps_per_epoch=30,
        num_train_examples=640,
    )
    assert (fixed.eval_every, fixed.loop_steps, fixed.timed) == (7, 3, False)


def test_padded_last_batch_from_config():
    def padded(num_train_examples, keep_last_batch=True):
        config = make_config(keep_last_batch=keep_last_batch)
        return Cadence.from_config(
            config, total_steps=10, steps_per_epoch=16, num_train_examples=num_train_examples
        ).padded_last_batch

    # Batch 64: 1,000 examples leave 40 for a padded 16th batch; 1,024 leave none.
    assert padded(1000) and not padded(1024) and not padded(1000, keep_last_batch=False)


class FakeClock:
    def __init__(self, *times):
        self.times = list(times)

    def __call__(self):
        return self.times.pop(0)


def test_dispatch_timer():
    waited = []
    clock = FakeClock(0.0, 1.0, 2.0, 5.0, 6.0, 11.0, 12.0, 13.0)
    timer = DispatchTimer(waited.append, clock)
    assert timer.dispatched("a", 2) is None  # dispatched at 1; nothing before it
    assert timer.seconds_per_step is None
    # "b" at 2; "a" seen done at 5, 2 steps since its dispatch at 1.
    assert timer.dispatched("b", 3) == 5.0
    assert timer.seconds_per_step == 2.0
    # "c" at 6; "b" seen done at 11, queued behind "a" until 5: 3 steps in 6 s.
    assert timer.dispatched("c", 1) == 11.0
    assert timer.seconds_per_step == 2.0
    assert timer.wait("c") == 12.0  # everything done: nothing in flight
    assert timer.dispatched("d", 1) is None
    assert waited == ["a", "b", "c"]
