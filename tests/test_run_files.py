"""gbn_jax.trainer.run_files: the one rule for a run's metrics.jsonl, on hand-written files."""

import json
import random

import pytest

from gbn_jax.trainer import run_files


def _records(rng, n):
    return [{"step": s, "loss": rng.random(), "lr": rng.random()} for s in range(1, n + 1)]


def test_round_trip_and_missing_file(tmp_path):
    rng = random.Random(0)
    records = _records(rng, 7)
    path = tmp_path / run_files.METRICS_FILE
    assert run_files.read_json_lines(path) == []
    run_files.append_metrics(path, records[:3])
    run_files.append_metrics(path, records[3:])
    assert run_files.read_json_lines(path) == records
    run_files.rewrite_metrics(path, records[:2])
    assert run_files.read_json_lines(path) == records[:2]
    assert not (tmp_path / (run_files.METRICS_FILE + ".tmp")).exists()


@pytest.mark.parametrize("cut", [1, 5, 17])
def test_a_cut_short_last_line_is_dropped_with_a_warning(tmp_path, cut):
    rng = random.Random(cut)
    records = _records(rng, 5)
    path = tmp_path / run_files.METRICS_FILE
    text = "".join(json.dumps(r) + "\n" for r in records)
    last = json.dumps({"step": 6, "loss": rng.random()})
    path.write_text(text + last[:cut])
    with pytest.warns(UserWarning, match=r"line 6, cut short"):
        assert run_files.read_json_lines(path) == records


@pytest.mark.parametrize("bad_line", [1, 3])
def test_corruption_before_the_last_line_names_file_and_line(tmp_path, bad_line):
    rng = random.Random(bad_line)
    lines = [json.dumps(r) for r in _records(rng, 4)]
    lines[bad_line - 1] = lines[bad_line - 1][:-4]
    path = tmp_path / run_files.METRICS_FILE
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(run_files.CorruptRunFileError, match=rf"metrics.jsonl, line {bad_line}:"):
        run_files.read_json_lines(path)


def test_a_json_value_that_is_not_an_object_is_corruption(tmp_path):
    path = tmp_path / run_files.METRICS_FILE
    path.write_text('{"step": 1}\n[1, 2]\n{"step": 3}\n')
    with pytest.raises(run_files.CorruptRunFileError, match="line 2"):
        run_files.read_json_lines(path)


def test_json_files_are_atomic_and_damage_is_an_error(tmp_path):
    path = tmp_path / run_files.SUMMARY_FILE
    assert run_files.read_json(path) is None
    run_files.write_json(path, {"steps": 3, "accuracy": 0.5})
    assert run_files.read_json(path) == {"steps": 3, "accuracy": 0.5}
    path.write_text('{"steps": 3, "acc')
    with pytest.raises(run_files.CorruptRunFileError, match=r"summary\.json: not valid JSON"):
        run_files.read_json(path)
