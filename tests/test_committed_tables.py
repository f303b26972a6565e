"""Every committed table of the F1 study is what its run records render to today.

The tables are rebuilt by their own `--report_only` commands from the committed records
(experiments/results/ablation_f1/runs, same_cpu_reruns, gap_explanations/,
bench_ghost_size.json). A record that lands without the tables being rebuilt, or a
change to the code that renders them, shows up here as a difference.
"""

import json
import shutil

import pytest

from experiments.harness.provenance import RESULTS_DIR
from experiments.paper import ablation, claims, gap_explanations, ghost_size


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """A results folder holding copies of the committed records only."""
    out = tmp_path_factory.mktemp("results")
    shutil.copytree(RESULTS_DIR / "ablation_f1", out / "ablation_f1")
    shutil.copy(RESULTS_DIR / "bench_ghost_size.json", out / "bench_ghost_size.json")
    return out


def committed_json(name):
    return json.loads((RESULTS_DIR / name).read_text())


def test_ablation_tables(records):
    rebuilt = ablation.report(records)
    assert (records / "ablation_f1.md").read_text() == (RESULTS_DIR / "ablation_f1.md").read_text()
    assert json.loads(json.dumps(rebuilt)) == committed_json("ablation_f1.json")


def test_claims_tables(records):
    rebuilt = claims.report(records)
    assert (records / "claims.md").read_text() == (RESULTS_DIR / "claims.md").read_text()
    assert json.loads(json.dumps(rebuilt)) == committed_json("claims.json")


def test_ghost_size_table(records):
    data = ghost_size.study(records)
    assert ghost_size.markdown(data) == (RESULTS_DIR / "ghost_size.md").read_text()
    assert json.loads(json.dumps(data, default=str)) == committed_json("ghost_size.json")


def test_gap_explanations_table():
    report = gap_explanations.collect(ablation.headline_group())
    want = (RESULTS_DIR / "gap_explanations.md").read_text()
    assert gap_explanations.markdown(report) == want
    assert json.loads(json.dumps(report)) == committed_json("gap_explanations.json")
