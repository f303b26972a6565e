"""The ablation driver's choices (experiments/paper/ablation.py, gap_explanations.py).

No training: results are made up with known numbers, and the rules are checked against
numpy and against the regimes the trainer resolves.
"""

import math

import numpy as np
import pytest
from run_results import run_result

from experiments.harness import launch
from experiments.paper import ablation, gap_explanations
from gbn_jax.trainer import regimes


def _results(rng, val_bias, test_bias):
    """Both protocols, seeds 0-2, LB/+LR/+GBN; each protocol shifted by its bias."""
    out = {}
    for group in ablation.PROTOCOLS:
        for column in ablation.COLUMNS:
            for seed in ablation.SELECTION_SEEDS:
                val = 88 + val_bias[group] + rng.normal(0, 0.1)
                test = 88 + test_bias[group] + rng.normal(0, 0.1)
                out[(group, column, seed)] = run_result(group, column, seed, val, test)
    return out


def test_headline_group_is_chosen_on_validation_only():
    rng = np.random.default_rng(0)
    # Validation favours "authors", the test split favours "default": validation wins.
    results = _results(rng, {"default": 0.0, "authors": 1.0}, {"default": 2.0, "authors": 0.0})
    assert ablation.headline_group(results) == "authors"
    results = _results(rng, {"default": 1.0, "authors": 0.0}, {"default": 0.0, "authors": 2.0})
    assert ablation.headline_group(results) == "default"
    # The rule is the mean over +LR and +GBN only: a better LB does not count.
    for seed in ablation.SELECTION_SEEDS:
        results[("authors", "lb", seed)]["summary"]["final_val_accuracy"] = 0.99
    assert ablation.headline_group(results) == "default"
    # Mean by hand.
    means = {
        g: np.mean(
            [
                100 * results[(g, c, s)]["summary"]["final_val_accuracy"]
                for c in ablation.SELECTION_COLUMNS
                for s in ablation.SELECTION_SEEDS
            ]
        )
        for g in ablation.PROTOCOLS
    }
    assert ablation.headline_group(results) == max(means, key=means.get)


def test_headline_group_waits_for_every_selection_run():
    rng = np.random.default_rng(1)
    results = _results(rng, {"default": 0.0, "authors": 1.0}, {"default": 0.0, "authors": 0.0})
    del results[("default", "lb_lr_gbn", 2)]
    assert ablation.headline_group(results) is None


def test_plan_adds_the_headline_runs_once_chosen(monkeypatch):
    rng = np.random.default_rng(2)
    results = _results(rng, {"default": 0.0, "authors": 1.0}, {"default": 0.0, "authors": 0.0})
    monkeypatch.setattr(ablation, "load_results", lambda: {})
    assert not [r for r in ablation.plan(3) if r.column in ("sb", "lb_lr_gbn_ra") and r.seed]
    monkeypatch.setattr(ablation, "load_results", lambda: results)
    runs = ablation.plan(3)
    tail = [r.name for r in runs[-4:]]
    assert tail == [
        "authors__sb__seed0",
        "authors__sb__seed1",
        "authors__sb__seed2",
        "authors__lb_lr_gbn_ra__seed0",
    ]
    assert len(set(runs)) == len(runs)
    # Stage 5 adds the other protocol's SB, never the chosen one's twice.
    five = ablation.plan(5)
    assert ablation.Planned("default", "sb", 1) in five
    assert len(set(five)) == len(five)


@pytest.mark.parametrize("group", ablation.PROTOCOLS)
@pytest.mark.parametrize("column", ["sb", "lb", "lb_lr", "lb_lr_gbn", "lb_lr_gbn_ra"])
def test_noise_scale_cadence_never_measures_a_padded_batch(group, column):
    run = ablation.Planned(group, column, 1)
    config = launch.load_config_module(ablation.CONFIG_FILE).get_config(run.arg)
    every = config.noise_scale.every_steps
    resolved = regimes.resolve(config, 60_000 - ablation.VALIDATION_SIZE)
    # A measurement at step t uses the batch of update t + 1, i.e. 0-based step t.
    # With the partial batch kept, that batch is padded at t = k * steps_per_epoch - 1.
    if config.keep_last_batch:
        measured = np.arange(0, resolved.total_steps, every)
        assert not np.any(measured % resolved.steps_per_epoch == resolved.steps_per_epoch - 1)
    assert 0 < every <= resolved.total_steps // 10


def test_noise_curve_pools_a_ratio_of_sums():
    rng = np.random.default_rng(3)
    n = 40
    epochs = np.linspace(0, 50, n)
    trace = rng.uniform(100, 1000, n)
    grad = rng.uniform(0.01, 1, n)
    grad[5] = -3.0  # One window's |G|^2 estimate sums below zero: no B_simple there.
    result = {
        "noise_curve": {
            "epoch": epochs.tolist(),
            "noise_trace_sigma": trace.tolist(),
            "noise_grad_sq": grad.tolist(),
        }
    }
    x, y = gap_explanations.noise_curve(result, points=8)
    windows = np.array_split(np.arange(n), 8)
    for i, w in enumerate(windows):
        assert x[i] == pytest.approx(epochs[w].mean())
        expected = trace[w].sum() / grad[w].sum() if grad[w].sum() > 0 else math.nan
        if math.isnan(expected):
            assert math.isnan(y[i])
        else:
            assert y[i] == pytest.approx(expected)
    keep = (epochs >= 10) & (epochs < 30)
    pooled = gap_explanations.pooled_noise_scale(result, 10, 30)
    assert pooled == pytest.approx(trace[keep].sum() / grad[keep].sum())
    assert gap_explanations.pooled_noise_scale(result, 60, 70) is None
    assert gap_explanations.noise_curve({"noise_curve": None}) is None


def test_gpu_plan_runs_the_headline_commands_then_resnet44_into_its_own_dir(tmp_path, monkeypatch):
    """--plan gpu through the one driver, the trainer faked: the F1 rows are the CPU
    headline's own config arguments (seed by seed), then ResNet-44 on the framed
    Fashion-MNIST at the authors' settings; results and tables go to --results_dir."""
    import json

    from experiments.paper import plots

    launched = []
    rng = np.random.default_rng(7)

    def fake_run_one(argv, workdir, *, total_steps, batch_size, bar, show_output=False):
        launched.append(list(argv))
        workdir.mkdir(parents=True, exist_ok=True)
        val, test = rng.uniform(0.8, 0.9, 2)
        summary = dict(
            final_val_accuracy=val,
            final_eval_accuracy=test,
            best_eval_accuracy=test + 0.01,
            eval_accuracy_at_best_val=test,
        )
        regime = dict(batch_size=batch_size, total_steps=total_steps, lr_boundaries=[[0, 0.1]])
        (workdir / plots.SUMMARY_FILE).write_text(json.dumps(summary))
        (workdir / plots.REGIME_FILE).write_text(json.dumps(regime))
        (workdir / launch.METRICS_FILE).write_text("")
        return 0, 1.0

    monkeypatch.setattr(launch, "run_one", fake_run_one)
    committed = (ablation.RESULTS_DIR / "ablation_f1.md").read_text()
    out = tmp_path / "out"
    argv = ["--plan", "gpu", f"--results_dir={out}", f"--runs_dir={tmp_path / 'runs'}"]
    assert ablation.main([*argv, "--data_dir=/data/fmnist"]) == 0
    plan = ablation.gpu_plan()
    assert len(launched) == len(plan) == 3 * 5 + 3
    # Seed by seed, the headline's five columns, each with the CPU run's config argument.
    f1 = [r for r in plan if r.group == "authors"]
    assert [(r.seed, r.column) for r in f1] == [(s, c) for s in (0, 1, 2) for c in ablation.LABELS]
    for run, cmd in zip(plan, launched, strict=True):
        assert cmd[-1] == "--config.data_dir=/data/fmnist"
        assert cmd[3] == f"--config={run.config_file}:{run.arg}"
        committed_run = ablation.result_path(run)
        if committed_run.exists():
            # Seed 0 ran before B_simple was logged, which changes no training result.
            def without_noise(arg):
                return [o for o in arg.split(",") if not o.startswith("noise_scale_every=")]

            recorded = json.loads(committed_run.read_text())["config_arg"]
            assert without_noise(recorded) == without_noise(run.arg)
    assert all(ablation.result_path(r, out).exists() for r in plan)
    # ResNet-44: the authors' batch 2048, ghost 256 for +GBN, 100 epochs with the drop at
    # 81, on 32x32 Fashion-MNIST, validation held out as in the F1 runs.
    resnet = [r for r in plan if r.group == "resnet44_fmnist32"]
    assert [r.column for r in resnet] == list(ablation.COLUMNS)
    module = launch.load_config_module("configs/cifar10_resnet44.py")
    for run in resnet:
        config = module.get_config(run.arg)
        assert (config.dataset, config.batch_size, config.validation_size) == (
            "fashion_mnist_32",
            2048,
            ablation.VALIDATION_SIZE,
        )
        assert config.model.name == "resnet_cifar" and config.model.depth == 44
        assert config.protocol == "authors"
        assert config.model.norm == ("ghost" if run.column == "lb_lr_gbn" else "batch")
        if run.column == "lb_lr_gbn":
            assert config.model.ghost_batch_size == 256
        resolved = regimes.resolve(config, 60_000 - ablation.VALIDATION_SIZE)
        # The authors' LR rule: x sqrt(2048 / 256) for +LR (main_normal.py) and
        # x sqrt(2048 / ghost 256) for +GBN (main_gbn.py); LB keeps 0.1.
        lr0 = 0.1 * (1.0 if run.column == "lb" else math.sqrt(2048 / 256))
        assert resolved.lr_boundaries[0][1] == pytest.approx(lr0)
        steps_per_epoch = math.ceil(50_000 / 2048)  # the authors keep the partial batch
        assert resolved.total_steps == 100 * steps_per_epoch
        assert [b for b, _ in resolved.lr_boundaries] == [0, 81 * steps_per_epoch]
    # The tables of this directory: ResNet's section with LB-paired test differences.
    table = json.loads((out / "ablation_f1.json").read_text())
    row = table["other_models"]["resnet44_fmnist32"]
    for column in ("lb_lr", "lb_lr_gbn"):
        want = row[column]["eval"]["mean"] - row["lb"]["eval"]["mean"]
        assert row[column]["eval_vs_lb"]["mean"] == pytest.approx(want)
    assert row["lb"]["eval_vs_lb"]["mean"] is None
    assert "## resnet44_fmnist32" in (out / "ablation_f1.md").read_text()
    assert (ablation.RESULTS_DIR / "ablation_f1.md").read_text() == committed
    # A second call finds every run done and launches nothing.
    launched.clear()
    assert ablation.main(argv) == 0 and launched == []
