"""Tests of gbn_jax/trainer/metric_writer.py on temporary workdirs, with fake clocks."""

import os

import ml_collections
import numpy as np
import pytest

from gbn_jax.trainer import metric_writer, run_files
from gbn_jax.trainer.metric_writer import MetricWriter, TrainingRate


class FakeClock:
    def __init__(self, now=0.0):
        self.now = now

    def __call__(self):
        return self.now


def train_record(rng, step):
    return {
        "step": step,
        "epoch": step / 10,
        "train_loss": float(rng.uniform(0, 3)),
        "train_accuracy": float(rng.uniform()),
        "examples_per_sec": float(rng.uniform(100, 1000)),
    }


def open_writer(workdir, start_step=0, enabled=True, clock=None):
    return MetricWriter(
        str(workdir),
        start_step=start_step,
        total_steps=10,
        batch_size=4,
        enabled=enabled,
        clock=clock or FakeClock(),
    )


def test_records_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    records = [train_record(rng, s) for s in (1, 2, 5)]
    records.append({"step": 5, "epoch": 0.5, "eval_loss": 0.7, "eval_accuracy": 0.8})
    writer = open_writer(tmp_path)
    writer.advance(5)
    for r in records:
        writer.write(r["step"], r)
    writer.write_json(run_files.SUMMARY_FILE, {"final": 1.5})
    writer.close()
    assert run_files.read_json_lines(tmp_path / run_files.METRICS_FILE) == records
    assert writer.read() == records
    assert run_files.read_json(tmp_path / run_files.SUMMARY_FILE) == {"final": 1.5}
    events = os.listdir(tmp_path / run_files.TENSORBOARD_DIR)
    assert any(name.startswith("events.out.tfevents") for name in events)


def test_other_processes_write_nothing(tmp_path):
    writer = open_writer(tmp_path, enabled=False)
    writer.advance(3)
    writer.write(3, train_record(np.random.default_rng(1), 3))
    writer.write_json(run_files.SUMMARY_FILE, {"final": 1.0})
    with writer.paused():
        pass
    writer.close()
    assert os.listdir(tmp_path) == []
    assert writer.read() == []
    assert writer.rate.steps == 3  # the rate is kept alike on every process


def test_resume_cuts_metrics_back_to_the_restored_step(tmp_path):
    rng = np.random.default_rng(2)
    records = [train_record(rng, s) for s in range(1, 7)]
    # Step 4's B_simple was measured after its checkpoint: measured again on resume.
    noise = {"step": 4, "epoch": 0.4, metric_writer.NOISE_SCALE_FIELD: 12.5}
    writer = open_writer(tmp_path)
    for r in [*records[:4], noise, *records[4:]]:
        writer.write(r["step"], r)
    writer.close()
    again = open_writer(tmp_path, start_step=4)
    again.write(5, records[4])
    again.close()
    assert run_files.read_json_lines(tmp_path / run_files.METRICS_FILE) == records[:5]


def test_a_run_that_trains_on_removes_its_summary(tmp_path):
    summary = tmp_path / run_files.SUMMARY_FILE
    writer = open_writer(tmp_path)
    writer.write_json(run_files.SUMMARY_FILE, {"final": 1.0})
    writer.close()
    open_writer(tmp_path, start_step=10).close()  # restarted at its last step: finished
    assert summary.exists()
    open_writer(tmp_path, start_step=6).close()  # from an older checkpoint: trains on
    assert not summary.exists()


def test_fresh_run_starts_an_empty_metrics_file(tmp_path):
    open_writer(tmp_path).close()
    assert (tmp_path / run_files.METRICS_FILE).read_text() == ""


def test_training_rate_with_a_fake_clock():
    clock = FakeClock(100.0)
    rate = TrainingRate(batch_size=8, clock=clock)
    rate.steps += 5
    assert rate.take_steps() == 5 and rate.steps == 0
    # 5 steps of 8 examples in 10 s.
    assert rate.examples_per_sec(5, until=110.0) == pytest.approx(4.0)
    rate.pause(104.0, 106.0)  # 2 s left out
    assert rate.examples_per_sec(5, until=110.0) == pytest.approx(40 / 8)
    rate.pause(90.0, 101.0)  # clipped to the interval's start: 1 s more
    assert rate.examples_per_sec(5, until=110.0) == pytest.approx(40 / 7)
    rate.pause(107.0, 106.0)  # an empty interval leaves nothing out
    assert rate.examples_per_sec(5, until=110.0) == pytest.approx(40 / 7)
    rate.restart(120.0)
    assert rate.examples_per_sec(2, until=124.0) == pytest.approx(4.0)


def test_paused_leaves_a_save_out_of_the_rate(tmp_path):
    clock = FakeClock(10.0)
    writer = open_writer(tmp_path, clock=clock)
    with writer.paused():
        clock.now = 13.0
    clock.now = 20.0
    assert writer.rate.examples_per_sec(7, until=20.0) == pytest.approx(7 * 4 / 7)
    writer.close()


def test_summarize():
    records = [
        {"step": 1, "train_loss": 2.0, "weight_distance": 0.1, "examples_per_sec": 10.0},
        {"step": 2, "eval_loss": 1.0, "eval_accuracy": 0.5, "val_loss": 0.9, "val_accuracy": 0.6},
        {"step": 3, "train_loss": 1.5, "weight_distance": 0.3, "examples_per_sec": 30.0},
        {"step": 4, "eval_loss": 0.8, "eval_accuracy": 0.7, "val_loss": 0.95, "val_accuracy": 0.55},
        {"step": 5, "train_loss": 1.2, "examples_per_sec": 50.0},
    ]
    environment = {"devices": 8, "device_kind": "cpu", "platform": "cpu", "process_count": 1}
    summary = metric_writer.summarize(
        records,
        start_step=2,
        total_steps=5,
        wall_time=12.0,
        environment=environment,
        config={"batch_size": 4},
    )
    assert summary == {
        "final_eval_accuracy": 0.7,
        "final_eval_loss": 0.8,
        "best_eval_accuracy": 0.7,
        "best_eval_step": 4,
        "final_val_accuracy": 0.55,
        "final_val_loss": 0.95,
        "best_val_accuracy": 0.6,
        "best_val_step": 2,
        "eval_accuracy_at_best_val": 0.5,
        "final_train_loss": 1.2,
        "final_weight_distance": 0.3,
        "steps": 5,
        "resumed_from_step": 2,
        "wall_time_sec": 12.0,
        "examples_per_sec": 40.0,  # the median after the first interval
        **environment,
        "config": {"batch_size": 4},
    }
    empty = metric_writer.summarize(
        [], start_step=0, total_steps=5, wall_time=1.0, environment={}, config={}
    )
    assert empty["final_eval_accuracy"] is None and empty["examples_per_sec"] is None


def test_config_to_dict():
    config = ml_collections.ConfigDict({"batch_size": 4, "model": {"name": "f1"}})
    assert metric_writer.config_to_dict(config) == {"batch_size": 4, "model": {"name": "f1"}}
