"""Tests of the experiment drivers' bookkeeping on synthetic workdirs (no training).

The workdirs are written here with known numbers, in the trainer's format
(regime.json, metrics.jsonl, summary.json), and the drivers' --report_only paths
aggregate and plot them: the table's means and standard deviations are checked
against numpy, the early-stopping points against the curves' known minima, the
weight-distance fits against the law the curves were drawn from.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from experiments.paper import diffusion, plots, reproduce_table

COLUMNS = reproduce_table.COLUMNS


def write_run(
    workdir: Path,
    *,
    steps_per_epoch: int,
    batch_size: int,
    eval_steps: np.ndarray,
    eval_accuracy: np.ndarray,
    eval_loss: np.ndarray,
    train_steps: np.ndarray | None = None,
    weight_distance: np.ndarray | None = None,
    finished: bool = True,
    learning_rate: float = 0.1,
) -> None:
    """Writes a workdir as the trainer would: regime.json, metrics.jsonl, summary.json."""
    workdir.mkdir(parents=True)
    total_steps = int(eval_steps[-1])
    regime = dict(
        batch_size=batch_size,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        epochs=total_steps / steps_per_epoch,
        lr_boundaries=[[0, learning_rate]],
    )
    (workdir / "regime.json").write_text(json.dumps(regime))
    lines = []
    if train_steps is not None:
        for step, distance in zip(train_steps, weight_distance, strict=True):
            lines.append(
                dict(step=int(step), epoch=step / steps_per_epoch, weight_distance=float(distance))
            )
    for step, accuracy, loss in zip(eval_steps, eval_accuracy, eval_loss, strict=True):
        lines.append(
            dict(
                step=int(step),
                epoch=step / steps_per_epoch,
                eval_accuracy=float(accuracy),
                eval_loss=float(loss),
            )
        )
    lines.sort(key=lambda r: r["step"])
    text = "".join(json.dumps(r) + "\n" for r in lines)
    (workdir / "metrics.jsonl").write_text(text)
    if finished:
        summary = dict(final_eval_accuracy=float(eval_accuracy[-1]), wall_time_sec=12.5)
        (workdir / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def table_runs(tmp_path):
    """Finished runs of every column for seeds 0-2 (the full preset's seeds).

    Returns:
      (runs_dir, final accuracies [column][seed], the +RA runs' loss-minimum steps).
    """
    rng = np.random.default_rng(0)
    runs_dir = tmp_path / "runs"
    accuracies, min_loss_steps = {}, {}
    for column in COLUMNS:
        ra = column == "lb_lr_gbn_ra"
        batch = 128 if column == "sb" else 2048
        steps_per_epoch = 60_000 // batch
        total = 468 * 5 if column in ("sb", "lb_lr_gbn_ra") else 29 * 5
        eval_steps = np.linspace(total / 20, total, 20).round().astype(int)
        for seed in range(3):
            final = rng.uniform(0.80, 0.90)
            accuracies.setdefault(column, {})[seed] = final
            # Error falls monotonically to 1 - final; loss has a minimum in the middle
            # (at a known evaluation) and rises afterwards, as in a long overfitting run.
            error = (1 - final) + 0.2 * (np.exp(-np.arange(20) / 4.0) - np.exp(-19 / 4.0))
            i_min = int(rng.integers(5, 15)) if ra else 19
            loss = 0.3 + 0.01 * (np.arange(20) - i_min) ** 2
            min_loss_steps.setdefault(column, {})[seed] = int(eval_steps[i_min])
            write_run(
                runs_dir / column / f"seed{seed}",
                steps_per_epoch=steps_per_epoch,
                batch_size=batch,
                eval_steps=eval_steps,
                eval_accuracy=1 - error,
                eval_loss=loss,
            )
    return runs_dir, accuracies, min_loss_steps


def test_table_aggregation_matches_numpy(table_runs, tmp_path):
    runs_dir, accuracies, min_loss_steps = table_runs
    out_dir = tmp_path / "results"
    status = reproduce_table.main(
        [
            "--preset",
            "full",
            "--report_only",
            "--runs_dir",
            str(runs_dir),
            "--out_dir",
            str(out_dir),
        ]
    )
    assert status == 0
    result = json.loads((out_dir / "table1_fashion_mnist.json").read_text())
    for column in COLUMNS:
        row = result["columns"][column]
        values = 100 * np.array([accuracies[column][s] for s in range(3)])
        sb = 100 * np.array([accuracies["sb"][s] for s in range(3)])
        np.testing.assert_allclose(row["accuracy_mean"], values.mean(), rtol=1e-6)
        np.testing.assert_allclose(row["accuracy_std"], values.std(ddof=1), rtol=1e-6)
        np.testing.assert_allclose(row["gap_to_sb_mean"], (values - sb).mean(), atol=1e-6)
        np.testing.assert_allclose(
            [row["accuracy_per_seed"][str(s)] for s in range(3)], values, rtol=1e-6
        )
        assert row["num_seeds"] == 3
        # No driver_wall_time.jsonl here: the summary's time of each of the 3 runs.
        assert row["wall_time_s_total"] == pytest.approx(3 * 12.5)
    assert result["columns"]["sb"]["gap_to_sb_std"] == pytest.approx(0.0)
    assert result["columns"]["lb_lr_gbn_ra"]["steps"] == 468 * 5
    # Early stopping on the +RA runs: the loss minimum where it was put, the error
    # minimum at the last evaluation, and the error still falling after the loss minimum.
    for seed in range(3):
        point = result["early_stopping"]["lb_lr_gbn_ra"][str(seed)]
        assert point["min_loss_step"] == min_loss_steps["lb_lr_gbn_ra"][seed]
        assert point["min_error_step"] == 468 * 5
        assert point["error_falls_while_loss_rises"]
    for name in (
        "table1_fashion_mnist.md",
        "figure1_fashion_mnist.png",
        "early_stopping_fashion_mnist.png",
    ):
        assert (out_dir / name).stat().st_size > 1000, name
    markdown = (out_dir / "table1_fashion_mnist.md").read_text()
    assert "98.27" in markdown  # The paper's row is printed beside ours.


def test_unfinished_runs_are_left_out(table_runs, tmp_path):
    runs_dir, accuracies, _ = table_runs
    (runs_dir / "lb" / "seed2" / "summary.json").unlink()
    result = reproduce_table.report(
        runs_dir, "full", reproduce_table.PRESETS["full"], tmp_path / "out"
    )
    row = result["columns"]["lb"]
    assert row["num_seeds"] == 2
    expected = 100 * np.array([accuracies["lb"][0], accuracies["lb"][1]])
    np.testing.assert_allclose(row["accuracy_mean"], expected.mean(), rtol=1e-6)


def test_early_stopping_points_resumed_run(tmp_path):
    """A resumed run logs steps twice; the later values are the ones that count."""
    steps = np.arange(1, 11) * 10
    error = np.linspace(0.3, 0.1, 10)
    loss = np.array([1.0, 0.8, 0.6, 0.5, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7])
    write_run(
        tmp_path / "run",
        steps_per_epoch=10,
        batch_size=128,
        eval_steps=steps,
        eval_accuracy=1 - error,
        eval_loss=loss,
    )
    # The first launch had logged step 30 with a lower loss before it was killed.
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        lines = f.readlines()
    stale = json.dumps(dict(step=30, epoch=3.0, eval_accuracy=0.5, eval_loss=0.1)) + "\n"
    (tmp_path / "run" / "metrics.jsonl").write_text("".join([stale, *lines]))
    point = plots.early_stopping_points(plots.load_run(str(tmp_path / "run")))
    assert point["min_loss_step"] == 50
    assert point["min_loss"] == pytest.approx(0.45)
    assert point["min_loss_epoch"] == pytest.approx(5.0)
    assert point["min_error_step"] == 100
    assert point["error_at_min_loss"] == pytest.approx(error[4])
    assert point["error_drop_after_min_loss"] == pytest.approx(error[4] - error[-1])
    assert point["loss_rise_after_min"] == pytest.approx(0.7 - 0.45)
    assert point["error_falls_while_loss_rises"]


def test_diffusion_fits_and_figure(tmp_path):
    runs_dir, out_dir = tmp_path / "runs", tmp_path / "results"
    rng = np.random.default_rng(1)
    sizes = (64, 512)
    for batch in sizes:
        steps_per_epoch = 60_000 // batch
        t = np.unique(np.geomspace(1, 3 * steps_per_epoch, 60).round().astype(int))
        # Distances drawn from a + b log t with a little noise.
        distance = 1.0 + 2.0 * np.log(t) + rng.normal(0, 0.01, t.size)
        total = int(t[-1])
        write_run(
            runs_dir / f"b{batch}",
            steps_per_epoch=steps_per_epoch,
            batch_size=batch,
            eval_steps=np.array([total]),
            eval_accuracy=np.array([0.85]),
            eval_loss=np.array([0.4]),
            train_steps=t,
            weight_distance=distance,
            learning_rate=0.1 * math.sqrt(batch / 128),
        )
    status = diffusion.main(
        [
            "--report_only",
            "--batch_sizes",
            ",".join(map(str, sizes)),
            "--runs_dir",
            str(runs_dir),
            "--out_dir",
            str(out_dir),
        ]
    )
    assert status == 0
    result = json.loads((out_dir / "diffusion.json").read_text())
    for batch in sizes:
        row = result["rows"][str(batch)]
        assert row["log"]["params"]["b"] == pytest.approx(2.0, abs=0.01)
        assert row["log"]["r_squared"] > 0.999
        assert row["sqrt"]["r_squared"] < row["log"]["r_squared"]
        assert row["log_beats_sqrt"]
        assert row["fit_range"][0] >= 10  # The default t_min.
        assert row["learning_rate"] == pytest.approx(0.1 * math.sqrt(batch / 128))
    assert (out_dir / "weight_distance.png").stat().st_size > 1000
    assert (out_dir / "diffusion.md").exists()


# ------------------------------------------------------------------ step_speed MFU


def test_model_flops_match_closed_forms():
    """step_speed's model FLOPs against hand counts: F1's five dense layers, and a
    strided convolution plus a dot inside a nested jit (the jaxpr recursion)."""
    import jax
    import jax.numpy as jnp

    from experiments.bench import step_speed
    from gbn_jax import models

    f1 = models.get_model("f1", num_classes=10)
    macs = 784 * 512 + 4 * 512 * 512 + 512 * 10
    assert step_speed.model_flops_per_example(f1, (28, 28, 1)) == 3 * 2 * macs

    def net(x, w, v):
        y = jax.lax.conv_general_dilated(
            x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jax.jit(lambda a: a.reshape(a.shape[0], -1) @ v)(y)

    x, w, v = jnp.ones((2, 9, 9, 3)), jnp.ones((3, 3, 3, 5)), jnp.ones((5 * 5 * 5, 7))
    jaxpr = jax.make_jaxpr(net)(x, w, v).jaxpr
    conv = 2 * (2 * 5 * 5 * 5) * (3 * 3 * 3)  # 2 x outputs x window
    dot = 2 * (2 * 7) * (5 * 5 * 5)
    assert step_speed.count_matmul_flops(jaxpr) == conv + dot


def test_step_speed_table_has_a_column_per_reference_that_ran():
    """Without the PyTorch variants the table compares with JAX's BatchNorm only, and a
    reference's own row reads 1.00."""
    from experiments.bench import step_speed

    def variant(step_s, **speedups):
        extra = {f"speedup_vs_{k}": v for k, v in speedups.items()}
        return {"median_step_s": step_s, "examples_per_s": 512 / step_s, **extra} | {
            "model_flops_per_s": 7e10,
            "mfu": 0.35,
        }

    text = step_speed.speed_table(
        {"jax_gbn": variant(4.5, jax_bn=0.98), "jax_bn": variant(4.4, jax_gbn=1.02)}
    )
    header, _, gbn, bn = text.splitlines()
    assert "torch" not in header and header.count("x vs") == 1 and "x vs jax_bn" in header
    assert gbn.split("|")[4].strip() == "0.98"
    assert bn.split("|")[4].strip() == "1.00"


def test_bench_sweep_trainer_entry_is_the_trainer_default():
    from experiments.bench import step_speed
    from gbn_jax.trainer import steps

    assert step_speed.XLA_SWEEP["trainer"] == steps.XLA_CPU_FAST_OPTIONS
    assert step_speed.XLA_PRESETS["fast"] == steps.XLA_CPU_FAST_OPTIONS


@pytest.mark.parametrize(
    "n, order_statistics",
    # Hand-computed from the binomial table with p = 1/2: the largest k with
    # P(X <= k - 1) <= 0.025 (n=6: 1/64; n=9: 10/512; n=25: P(X <= 7) = 0.0216 while
    # P(X <= 8) = 0.0539); with n=5 even P(X = 0) = 1/32 is too large: the whole range.
    [(5, (1, 5)), (6, (1, 6)), (9, (2, 8)), (25, (8, 18))],
)
def test_median_interval_is_the_sign_test_interval(n, order_statistics):
    from experiments.harness import timing

    values = np.random.default_rng(n).permutation(np.arange(1.0, n + 1.0)).tolist()
    assert timing.median_interval(values) == order_statistics


def test_ghost_size_rows_are_ratios_to_plain_bn_round_by_round():
    from experiments.bench import ghost_size_step

    rng = np.random.default_rng(0)
    times = {str(g): rng.uniform(0.1, 0.2, (7, 3)).tolist() for g in ghost_size_step.GHOST_SIZES}
    rows = ghost_size_step.summarize(times)
    plain = np.median(times["4096"], axis=1)
    for row in rows:
        ratios = np.median(times[str(row["ghost"])], axis=1) / plain
        assert row["ratio"]["median"] == pytest.approx(np.median(ratios))
        assert row["ms"] == pytest.approx(1e3 * np.median(times[str(row["ghost"])]))
    assert rows[-1]["ratio"]["median"] == 1.0
    assert "4096 (plain BN)" in ghost_size_step.table(rows)


def test_conv_step_profile_sweeps_each_step_by_hand():
    """Two steps of made-up trace events, the second the first shifted by 1000 µs: ops A
    (0-50), B (25-75) and the weight gradient W (50-100) in a step of 0-100, plus an
    event of another program: exactly one op runs in 0-25 (A) and 75-100 (W)."""
    from experiments.bench import conv_step_profile

    def x(name, ts, dur):
        return {"name": name, "ts": ts, "dur": dur, "ph": "X"}

    events = []
    for t in (0, 1000):
        events += [x(conv_step_profile.STEP, t, 100), x("A", t, 50), x("B", t + 25, 50)]
        events += [x("W", t + 50, 50), x("elsewhere", t + 10, 20)]
    steps = conv_step_profile.step_profile(events, {"A", "B", "W"}, {"Conv_0": "W"})
    assert len(steps) == 2
    for step in steps:
        assert step["wall_ms"] == pytest.approx(0.1)
        assert step["one_op_ms"] == pytest.approx(0.05)
        assert step["op_ms_per_wall_ms"] == pytest.approx(1.5)
        assert step["weight_gradients"]["Conv_0"] == pytest.approx({"ms": 0.05, "alone_ms": 0.025})


def test_conv_step_profile_finds_weight_gradients_and_their_neighbours():
    """In a made-up compiled module, the weight gradient is the convolution (called from
    a fusion) whose output has the kernel's dimensions; the activation-sized one is not."""
    from experiments.bench import conv_step_profile

    hlo = """HloModule m

%fused_dgrad (p0: f32[8,4,4,2], p1: f32[3,3,2,5]) -> f32[8,4,4,5] {
  ROOT %convolution.1 = f32[8,4,4,5]{3,2,1,0} convolution(%p0, %p1)
}

%fused_wgrad (p0: f32[2,4,4,8], p1: f32[4,4,8,5]) -> f32[2,3,3,5] {
  ROOT %convolution.2 = f32[2,3,3,5]{3,2,1,0} convolution(%p0, %p1)
}

ENTRY %main (k: f32[3,3,2,5], a: f32[8,4,4,2]) -> f32[2,3,3,5] {
  %k = f32[3,3,2,5]{3,2,1,0} parameter(0)
  %a = f32[8,4,4,2]{3,2,1,0} parameter(1)
  %dgrad = f32[8,4,4,5]{3,2,1,0} fusion(%a, %k), kind=kCustom, calls=%fused_dgrad
  %copy.1 = f32[3,3,2,5]{3,2,1,0} copy(%k)
  %wgrad = f32[2,3,3,5]{3,2,1,0} fusion(%a, %dgrad), kind=kCustom, calls=%fused_wgrad
  ROOT %next = f32[2,3,3,5]{3,2,1,0} add(%wgrad, %wgrad)
}
"""
    assert conv_step_profile.weight_gradients(hlo, {"Conv_0": (3, 3, 2, 5)}) == {"Conv_0": "wgrad"}
    assert conv_step_profile.schedule_neighbours(hlo, "wgrad") == (
        "copy.1 f32[3,3,2,5] -> wgrad f32[2,3,3,5] -> next f32[2,3,3,5]"
    )


def test_ghost_norm_overhead_rejects_an_unknown_option_set(capsys):
    from experiments.bench import ghost_norm_overhead

    with pytest.raises(SystemExit):
        ghost_norm_overhead.main(["--options", "defaults", "--no-write"])
    assert "--options 'defaults': unknown ['defaults']; use ['default', 'trainer']" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "stem",
    ["bench_ghost_norm", "bench_ghost_norm_xla_defaults", "bench_ghost_norm_conv_xla_defaults"],
)
def test_ghost_norm_overhead_records_render_from_their_json(stem):
    """The committed markdown of the GBN/BN benchmark is its JSON record rendered by the
    benchmark's own writer: no number in it was written by hand."""
    from experiments.bench import ghost_norm_overhead

    results = Path(__file__).resolve().parents[1] / "experiments" / "results"
    record = json.loads((results / f"{stem}.json").read_text())
    rendered = ghost_norm_overhead.document(record["environment"], record["rows"])
    assert rendered.strip() == (results / f"{stem}.md").read_text().strip()


def test_group_reduction_rows_pair_rounds_per_core_count():
    from experiments.bench import group_reduction

    rng = np.random.default_rng(3)
    f1, conv = group_reduction.SHAPES
    # The whole-batch sum of f1 differs between core counts; every other sum does not.
    digests = {
        (cores, name): {"batch": f"{name}-{cores}" if name == f1 else name, "ghost": name}
        for cores in (1, 2)
        for name in (f1, conv)
    }
    measured = {
        cores: {
            name: {
                "batch": rng.uniform(1, 2, 9).tolist(),
                "ghost": rng.uniform(1, 3, 9).tolist(),
                "digest": digests[cores, name],
            }
            for name in group_reduction.SHAPES
        }
        for cores in (2, 1)
    }
    rows = group_reduction.rows(measured)
    assert [r["cores"] for r in rows] == [1, 1, 2, 2]
    for r in rows:
        same = r["same_bits_across_cores"]
        assert same == {"batch": r["shape"] == conv, "ghost": True}
        times = measured[r["cores"]][r["shape"]]
        ratios = np.array(times["ghost"]) / np.array(times["batch"])
        assert r["ratio"] == pytest.approx(np.median(ratios))
        assert r["ghost_us"] == pytest.approx(1e6 * np.median(times["ghost"]))
        # n = 9: the sign-test interval is the 2nd and 8th order statistics
        assert r["ratio_ci95"] == pytest.approx(tuple(np.sort(ratios)[[1, 7]]))


def test_group_sum_forms_all_compute_the_per_ghost_batch_sums():
    """Every way of writing the sums gives numpy's sums per ghost batch (the whole-batch
    form: over the batch), on a dense and on a conv-shaped input."""
    import jax.numpy as jnp

    from experiments.bench import group_sum_forms

    rng = np.random.default_rng(5)
    for shape in ((24, 5), (16, 3, 2, 4)):
        x = rng.normal(size=shape).astype(np.float32)
        grouped = x.astype(np.float64).reshape(shape[0] // 4, -1, shape[-1])
        expected = (grouped.sum(1), (grouped**2).sum(1))
        for label, form in group_sum_forms.FORMS.items():
            got = form(jnp.asarray(x), 4)
            want = (e.sum(0) for e in expected) if label == group_sum_forms.WHOLE else expected
            for g, w in zip(got, want, strict=True):
                np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-5, err_msg=label)


def test_group_sum_forms_rows_pair_rounds_with_both_references():
    from experiments.bench import group_sum_forms

    rng = np.random.default_rng(6)
    forms = list(group_sum_forms.FORMS)
    times = {label: rng.uniform(1, 3, 9).tolist() for label in forms}
    busy = {label: rng.uniform(1, 2, 9).tolist() for label in forms}
    digests = {label: "layer" if i % 2 else "other" for i, label in enumerate(forms)}
    rows = group_sum_forms.rows({"f1": {"times": times, "busy": busy, "digest": digests}})
    assert [r["form"] for r in rows] == forms
    for r in rows:
        t = np.array(times[r["form"]])
        for key, ref in (("to_whole", group_sum_forms.WHOLE), ("to_layer", group_sum_forms.LAYERS)):
            ratios = t / np.array(times[ref])
            assert r[key] == pytest.approx(np.median(ratios))
            assert r[f"{key}_ci95"] == pytest.approx(tuple(np.sort(ratios)[[1, 7]]))
        assert r["us"] == pytest.approx(1e6 * np.median(t))
        assert r["cores_busy"] == pytest.approx(np.median(busy[r["form"]]))
    same = {r["form"]: r["same_bits_as_layer"] for r in rows}
    # The layer's form is second in FORMS (odd index: digest "layer").
    assert same == {label: None if i == 0 else bool(i % 2) for i, label in enumerate(forms)}
    assert "| - |" in group_sum_forms.table(rows)


def test_trainer_throughput_workaround_rounds_add_up(tmp_path, monkeypatch):
    """--workaround-rounds: each variant's environment and overrides reach the CLI, the
    order rotates round by round, and a second invocation adds its round to the first."""
    from experiments.bench import trainer_throughput

    calls = []
    rate = {"all": 120.0, "no huge pages": 100.0, "no barrier": 60.0}

    def fake_trainer(root, spec, steps, overrides, args, extra_env=None, env=None):
        if "xla_cpu_fast_options" in overrides:
            assert "ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE" in env["XLA_FLAGS"]
            variant = "no barrier"
        else:
            variant = "all" if "hugetlb=1" in env.get("GLIBC_TUNABLES", "") else "no huge pages"
        calls.append(variant)
        return {"examples_per_sec": rate[variant] + len(calls)}

    monkeypatch.setattr(trainer_throughput, "run_trainer", fake_trainer)
    stem = str(tmp_path / "workarounds")
    argv = ["--cases=resnet44_b128", "--workaround-rounds=1", "--variants=no_huge_pages,no_barrier"]
    trainer_throughput.main([*argv, f"--out={stem}"])
    trainer_throughput.main([*argv, f"--out={stem}"])
    assert calls == ["all", "no huge pages", "no barrier", "no huge pages", "no barrier", "all"]
    (rec,) = json.loads(Path(stem + ".json").read_text())["results"]
    assert len(rec["rounds"]) == 2 and set(rec["gain"]) == {"no huge pages", "no barrier"}
    gains = [121 / 63, 126 / 65]  # all over no barrier, per round (rate + call number)
    assert rec["gain"]["no barrier"]["median"] == pytest.approx(sum(gains) / 2)


def test_trainer_throughput_allocator_ratios_and_merge(tmp_path, monkeypatch):
    """--allocator-rounds: ratios per round from each subprocess's rate, in the order
    reversed every other round, and a second case added to the file, not replacing it."""
    from experiments.bench import trainer_throughput

    calls = []
    rates = {
        ("step", "default"): [100.0, 120.0],
        ("step", "huge pages"): [130.0, 150.0],
        ("trainer", "default"): [110.0, 100.0],
        ("trainer", "huge pages"): [117.0, 138.0],
    }

    def fake_step(name, allocator, args):
        n = sum(1 for c in calls if c == ("step", allocator))
        calls.append(("step", allocator))
        return rates["step", allocator][n]

    def fake_trainer(root, spec, steps, overrides, args, extra_env=None):
        allocator = "huge pages" if "GLIBC_TUNABLES" in extra_env else "default"
        n = sum(1 for c in calls if c == ("trainer", allocator))
        calls.append(("trainer", allocator))
        return {"examples_per_sec": rates["trainer", allocator][n]}

    monkeypatch.setattr(trainer_throughput, "run_isolated_step", fake_step)
    monkeypatch.setattr(trainer_throughput, "run_trainer", fake_trainer)
    monkeypatch.setattr(trainer_throughput, "IsolatedStep", None)  # never built in-process
    stem = str(tmp_path / "alloc")
    trainer_throughput.main(["--cases=f1_b128", "--allocator-rounds=2", f"--out={stem}"])
    order = [("step", "default"), ("step", "huge pages"), ("trainer", "default")]
    order.append(("trainer", "huge pages"))
    assert calls == order + order[::-1]
    (rec,) = json.loads(Path(stem + ".json").read_text())["results"]
    ratios = rec["ratios"]
    assert ratios["step: huge pages / default"]["median"] == pytest.approx((1.3 + 1.25) / 2)
    assert ratios["trainer (huge pages) / step (default)"]["min"] == pytest.approx(1.15)
    assert ratios["trainer (huge pages) / step (huge pages)"]["max"] == pytest.approx(0.92)
    calls.clear()
    trainer_throughput.main(["--cases=f1_b4096", "--allocator-rounds=1", f"--out={stem}"])
    cases = [r["case"] for r in json.loads(Path(stem + ".json").read_text())["results"]]
    assert cases == ["f1_b128", "f1_b4096"]
    assert "f1_b4096 (`lb_lr_gbn_ra`)" in Path(stem + ".md").read_text()


def test_trainer_throughput_table_walls_against_the_committed_table(tmp_path):
    """The unscaled F1 table's wall times: a run directory against the committed one."""
    from experiments.bench import trainer_throughput

    committed = {}
    for column in trainer_throughput.TABLE_COLUMNS:
        path = Path(trainer_throughput.COMMITTED_TABLE) / f"{column}.json"
        if path.exists():
            committed[column] = json.loads(path.read_text())["wall_time_sec"]
    assert set(committed) == {"sb", "lb", "lb_lr_gbn", "lb_lr_gbn_ra"}  # +LR timed out
    runs = tmp_path / "runs"
    runs.mkdir()
    for column in ("sb", "lb", "lb_lr", "lb_lr_gbn"):  # +RA unfinished here
        (runs / f"{column}.json").write_text(json.dumps({"wall_time_sec": 20.0}))
    trainer_throughput.table_walls(str(runs), str(tmp_path / "walls"))
    record = json.loads((tmp_path / "walls.json").read_text())["columns"]
    assert record["sb"] == {"committed_s": committed["sb"], "now_s": 20.0}
    assert record["lb_lr"]["committed_s"] is None and record["lb_lr_gbn_ra"]["now_s"] is None
    table = (tmp_path / "walls.md").read_text()
    both = committed["sb"] + committed["lb"] + committed["lb_lr_gbn"]
    assert f"| all finished in both | {both:.0f} | 60 | - |" in table
    assert f"| sb | {committed['sb']:.0f} | 20 | {committed['sb'] / 20:.2f} |" in table


# ------------------------------------------------------------------ the package


def test_every_experiments_module_imports_without_side_effects():
    """Each module of experiments/ imports by its package path, leaves sys.path and the
    environment as they were, and writes nothing (the work starts in main())."""
    import importlib
    import os
    import pkgutil
    import sys

    import experiments

    path, environ = list(sys.path), dict(os.environ)
    results = Path(experiments.__file__).parent / "results"
    before = sorted(p.stat().st_mtime_ns for p in results.glob("*") if p.is_file())
    names = [m.name for m in pkgutil.walk_packages(experiments.__path__, "experiments.")]
    assert {"experiments.paper.ablation", "experiments.bench.step_speed"} <= set(names)
    assert "experiments.harness.provenance" in names
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as error:  # PyTorch: the optional `bench` extra.
            assert error.name == "torch", name
        assert sys.path == path, name
        assert dict(os.environ) == environ, name
    assert sorted(p.stat().st_mtime_ns for p in results.glob("*") if p.is_file()) == before


def test_provenance_dirty_flag_covers_the_whole_tree(tmp_path, monkeypatch):
    """A change anywhere in the checkout marks the record dirty, and the record carries
    the commit, the config, the CPU model, the package versions and the date."""
    import importlib.metadata
    import re
    import subprocess

    from experiments.harness import provenance

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True
        ).stdout.strip()

    git("init", "-q")
    (tmp_path / "a.txt").write_text("a\n")
    git("add", "a.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "a")
    sha = git("rev-parse", "HEAD")
    assert provenance.git_commit(tmp_path) == sha
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "new.txt").write_text("untracked\n")
    assert provenance.git_commit(tmp_path) == sha + "+dirty"

    monkeypatch.setattr(provenance, "git_commit", lambda: sha + "+dirty")
    record = provenance.provenance({"batch_size": 128})
    assert list(record) == ["commit", "dirty", "config", "hardware", "date"]
    assert (record["commit"], record["dirty"], record["config"]) == (sha, True, {"batch_size": 128})
    assert record["hardware"]["cpu"] == provenance.cpu_model() != ""
    assert record["hardware"]["versions"]["jax"] == importlib.metadata.version("jax")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", record["date"])
    assert record["hardware"]["cpu_id"] == provenance.cpu_id()


def test_cpu_id_tells_apart_cpus_that_share_a_name():
    from experiments.harness import provenance

    def cpuinfo(family, model, flags):
        block = (
            f"processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: {family}\n"
            f"model\t\t: {model}\nmodel name\t: AMD EPYC\nstepping\t: 1\n"
            f"flags\t\t: fpu sse2 {flags}\n\n"
        )
        # A second processor with other values: only the first block is read.
        return block + block.replace(f"model\t\t: {model}", "model\t\t: 99")

    zen3 = provenance.cpu_id(cpuinfo(25, 1, "avx avx2 fma"))
    zen4 = provenance.cpu_id(cpuinfo(25, 17, "avx2 avx avx512f fma avx512bw avx512_bf16"))
    assert zen3 == "family 25 model 1 stepping 1; avx avx2 fma"
    assert zen4 == "family 25 model 17 stepping 1; avx avx2 fma avx512f avx512bw avx512_bf16"
    assert provenance.cpu_id(cpuinfo(6, 85, "")) == "family 6 model 85 stepping 1; no AVX"
    assert provenance.cpu_id("processor\t: 0\nmodel name\t: some ARM core\n") is None
