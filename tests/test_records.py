"""Tests of gbn_jax/trainer/records.py: records started at a step, written on a flush."""

import math
import types

import numpy as np
import pytest

from gbn_jax.trainer import run_files
from gbn_jax.trainer.metric_writer import MetricWriter
from gbn_jax.trainer.records import (
    NonFiniteLossError,
    RecordQueue,
    check_finite,
    finish_evaluation,
)


class FakeClock:
    def __init__(self, now=0.0):
        self.now = now

    def __call__(self):
        return self.now


def checkpoints(latest=None):
    return types.SimpleNamespace(latest_step=lambda: latest, directory="/runs/x/checkpoints")


def sums(rng, count):
    """Train-metric sums over `count` steps, as `steps.zero_metrics` lays them out."""
    return {
        "loss": np.float32(rng.uniform(1, 3) * count),
        "accuracy": np.float32(rng.uniform() * count),
        "grad_norm": np.float32(rng.uniform(1, 5) * count),
        "count": np.int32(count),
        "learning_rate": np.float32(rng.uniform(0.01, 0.1)),
        "first_bad_step": np.int32(-1),
    }


def eval_sums(rng, count):
    return {
        "loss": np.float32(rng.uniform(0.5, 1) * count),
        "correct": np.float32(rng.integers(0, count)),
        "count": np.float32(count),
    }


@pytest.fixture
def queue(tmp_path):
    clock = FakeClock(100.0)
    writer = MetricWriter(
        str(tmp_path), start_step=0, total_steps=20, batch_size=4, enabled=True, clock=clock
    )
    yield RecordQueue(writer, steps_per_epoch=8, checkpoints=checkpoints()), clock
    writer.close()


def written(queue):
    return run_files.read_json_lines(queue.writer.metrics_path)


def test_a_boundary_is_written_on_the_next_flush(queue):
    queue, clock = queue
    rng = np.random.default_rng(0)
    acc, evaluation = sums(rng, 4), {"eval": eval_sums(rng, 100), "val": eval_sums(rng, 50)}
    queue.writer.advance(4)
    queue.start(4, train=(acc, np.float32(1.25)), evaluation=evaluation)
    assert written(queue) == [] and queue.writer.rate.steps == 0
    clock.now = 104.0
    queue.flush(done_at=102.0)
    assert queue.started == []
    [record] = written(queue)
    assert list(record) == [
        *("step", "epoch", "train_loss", "train_accuracy", "learning_rate", "grad_norm"),
        *("weight_distance", "examples_per_sec", "eval_loss", "eval_accuracy"),
        *("val_loss", "val_accuracy"),
    ]
    assert (record["step"], record["epoch"]) == (4, 0.5)
    assert record["train_loss"] == pytest.approx(float(acc["loss"]) / 4)
    assert record["grad_norm"] == pytest.approx(float(acc["grad_norm"]) / 4)
    assert record["learning_rate"] == pytest.approx(float(acc["learning_rate"]))
    assert record["weight_distance"] == 1.25
    # 4 steps of 4 examples, from the writer's start at 100 to the dispatch's end at 102.
    assert record["examples_per_sec"] == pytest.approx(8.0)
    val = evaluation["val"]
    assert record["val_accuracy"] == pytest.approx(float(val["correct"] / val["count"]))
    # Reading the evaluation kept the host busy until 104: the next interval starts there.
    assert queue.writer.rate.start == 104.0


def test_noise_joins_the_record_of_its_step(queue):
    queue, _ = queue
    rng = np.random.default_rng(1)
    noise = {"noise_b_simple": np.float32(300.0), "noise_grad_sq": np.float32(2.0)}
    queue.add_noise(0, dict(noise))  # a record of its own
    queue.start(3, train=(sums(rng, 3), np.float32(0.5)))
    queue.add_noise(3, dict(noise))  # joins step 3's log
    queue.add_noise(4, dict(noise))
    queue.flush(done_at=101.0)
    records = written(queue)
    assert [(r["step"], "train_loss" in r, "noise_b_simple" in r) for r in records] == [
        (0, False, True),
        (3, True, True),
        (4, False, True),
    ]
    assert list(records[0]) == ["step", "epoch", "noise_b_simple", "noise_grad_sq"]
    assert records[1]["noise_b_simple"] == 300.0


def test_a_record_without_train_metrics_pauses_the_rate(queue):
    queue, clock = queue
    rng = np.random.default_rng(2)
    queue.start(8, evaluation={"eval": eval_sums(rng, 10)})
    clock.now = 107.0
    queue.flush(done_at=103.0)
    # Reading it took the host from 103 to 107: left out of the interval begun at 100.
    assert queue.writer.rate.paused == pytest.approx(4.0)
    assert written(queue)[0]["eval_loss"] > 0


def test_finish_evaluation_against_numpy():
    rng = np.random.default_rng(3)
    split = eval_sums(rng, 37)
    record = finish_evaluation({"eval": split})
    assert record == {
        "eval_loss": pytest.approx(float(split["loss"]) / 37),
        "eval_accuracy": pytest.approx(float(split["correct"]) / 37),
    }


def test_non_finite_loss_names_the_last_good_checkpoint(queue):
    queue, _ = queue
    acc = sums(np.random.default_rng(4), 4)
    acc["first_bad_step"] = np.int32(7)
    queue.checkpoints = checkpoints(latest=6)
    queue.start(8, train=(acc, np.float32(1.0)))
    with pytest.raises(NonFiniteLossError, match=r"at step 7 .*checkpoint \(step 6\)"):
        queue.flush(done_at=101.0)
    fine = sums(np.random.default_rng(5), 4)
    with pytest.raises(NonFiniteLossError, match=r"parameters by step 9.*No checkpoint"):
        check_finite(fine, math.inf, 9, checkpoints())
    check_finite(fine, 3.0, 9, checkpoints())
