"""The verdict rule (experiments/paper/verdicts.py) and the claims built on it
(experiments/paper/claims.py), against intervals computed by hand from Student's t."""

import itertools
import json
import math

import numpy as np
import pytest
from run_results import run_result

from experiments.paper import ablation, claims, verdicts

# Two-sided 95% quantiles of Student's t, from a printed table.
T975 = {1: 12.706, 2: 4.303, 4: 2.776, 9: 2.262}


@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_paired_interval_is_the_t_interval_of_the_differences(n):
    rng = np.random.default_rng(n)
    treatment = {s: float(v) for s, v in enumerate(rng.normal(88.0, 0.5, n))}
    control = {s: float(v) for s, v in enumerate(rng.normal(87.5, 0.5, n))}
    control[99] = 50.0  # a seed without a partner plays no part
    d = np.array([treatment[s] - control[s] for s in range(n)])
    half = T975[n - 1] * d.std(ddof=1) / math.sqrt(n)
    got = verdicts.paired("x", "+", treatment, control)
    assert got.n == n and got.per_seed == pytest.approx(dict(enumerate(d)))
    assert got.mean == pytest.approx(d.mean())
    assert got.std == pytest.approx(d.std(ddof=1))
    assert got.ci_low == pytest.approx(d.mean() - half, abs=2e-3 * half)
    assert got.ci_high == pytest.approx(d.mean() + half, abs=2e-3 * half)


@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_prediction_interval_of_a_new_seed_by_hand(n):
    rng = np.random.default_rng(100 + n)
    treatment = {s: float(v) for s, v in enumerate(rng.normal(88.0, 0.5, n))}
    control = {s: float(v) for s, v in enumerate(rng.normal(87.5, 0.5, n))}
    d = np.array([treatment[s] - control[s] for s in range(n)])
    half = T975[n - 1] * d.std(ddof=1) * math.sqrt(1 + 1 / n)
    got = verdicts.paired("x", "+", treatment, control)
    assert got.new_seed_low == pytest.approx(d.mean() - half, abs=2e-3 * half)
    assert got.new_seed_high == pytest.approx(d.mean() + half, abs=2e-3 * half)
    # Wider than the interval of the mean by sqrt(n + 1), and no part of the verdict.
    ratio = (got.new_seed_high - got.new_seed_low) / (got.ci_high - got.ci_low)
    assert ratio == pytest.approx(math.sqrt(n + 1))
    column = verdicts.mean_interval(treatment)
    a = np.array(list(treatment.values()))
    half = T975[n - 1] * a.std(ddof=1) * math.sqrt(1 + 1 / n)
    assert column["new_seed_low"] == pytest.approx(a.mean() - half, abs=2e-3 * half)


def test_prediction_interval_covers_95_percent_of_new_seeds():
    rng = np.random.default_rng(3)
    draws = rng.normal(0.3, 0.4, size=(4000, 4))  # three seeds, then the new one
    hits = 0
    for row in draws:
        low, high = verdicts.prediction_interval(row[:3])
        hits += low <= row[3] <= high
    assert hits / len(draws) == pytest.approx(0.95, abs=0.012)
    assert verdicts.prediction_interval(np.array([1.0])) == (None, None)


def test_verdict_rule():
    assert verdicts.verdict("+", 0.1, 0.5) == "holds"
    assert verdicts.verdict("+", -0.5, -0.1) == "contradicted"
    assert verdicts.verdict("+", -0.1, 0.5) == "undetermined"
    assert verdicts.verdict("-", -0.5, -0.1) == "holds"
    assert verdicts.verdict("-", 0.1, 0.5) == "contradicted"
    assert verdicts.verdict("0", -0.1, 0.5) == "undetermined"
    assert verdicts.verdict("0", 0.1, 0.5) == "contradicted"
    assert verdicts.verdict("0", -0.5, -0.1) == "contradicted"
    assert verdicts.verdict("+", None, None) == "undetermined"
    with pytest.raises(ValueError, match="direction='up'"):
        verdicts.verdict("up", 0.0, 1.0)


def test_one_pair_has_no_interval_and_no_verdict():
    got = verdicts.paired("x", "+", {0: 90.0}, {0: 80.0})
    assert (got.mean, got.std, got.ci_low, got.verdict) == (10.0, None, None, "undetermined")


def test_equal_differences_have_no_interval():
    d = verdicts.paired("tie", "+", {0: 88.06, 1: 88.06}, {0: 88.0, 1: 88.0})
    assert d.ci_low is None and d.verdict == "undetermined"


def test_claims_pair_the_right_runs_on_the_right_split():
    rng = np.random.default_rng(7)
    results = {}
    for seed in range(4):
        for group, column in {(c.treatment) for c in claims.CLAIMS} | {
            c.control for c in claims.CLAIMS
        }:
            val, test = rng.normal(88, 1), rng.normal(87, 1)
            results[(group, column, seed)] = run_result(group, column, seed, val, test)
    evaluated = {e["claim"]: e for e in claims.evaluate(results)}
    assert len(evaluated) == len(claims.CLAIMS)
    for claim in claims.CLAIMS:
        e = evaluated[claim.text]
        group_t, col_t = claim.treatment
        group_c, col_c = claim.control
        key = "final_val_accuracy" if claim.split == "val" else "final_eval_accuracy"
        d = [
            100 * results[(group_t, col_t, s)]["summary"][key]
            - 100 * results[(group_c, col_c, s)]["summary"][key]
            for s in range(4)
        ]
        assert e["mean"] == pytest.approx(np.mean(d))
        assert e["n"] == 4
    # The headline's claims read the test split, which it reports; the others validation.
    assert {c.split for c in claims.CLAIMS if c.section.startswith("Headline")} == {"eval"}
    assert {c.split for c in claims.CLAIMS if not c.section.startswith("Headline")} == {"val"}


def test_pairs_across_cpu_models_are_repaired_with_same_cpu_reruns():
    rng = np.random.default_rng(11)
    claim = next(c for c in claims.CLAIMS if c.treatment == ("momentum_reset", "lb"))
    (tg, tc), (cg, cc) = claim.treatment, claim.control
    results, reruns = {}, {}
    cpus = {0: "EPYC", 1: "Xeon", 2: "Xeon", 3: "Xeon", 4: "Xeon", 5: "Xeon", 6: "Xeon"}
    for seed, cpu in cpus.items():
        results[(tg, tc, seed)] = run_result(tg, tc, seed, rng.normal(89, 1), 88, cpu)
        results[(cg, cc, seed)] = run_result(cg, cc, seed, rng.normal(89, 1), 88, "EPYC")
    # Seeds 1 and 2: the control re-run on the treatment's CPU model. Seed 4: the
    # treatment re-run on the control's. Seed 5: both, and the control's re-run wins.
    # Seed 6: both re-run on a third machine. Seed 3 has none of these and is left out.
    for seed in (1, 2, 5):
        reruns[(cg, cc, seed, "Xeon")] = run_result(cg, cc, seed, rng.normal(89, 1), 88, "Xeon")
    for seed in (4, 5):
        reruns[(tg, tc, seed, "EPYC")] = run_result(tg, tc, seed, rng.normal(89, 1), 88, "EPYC")
    for seed, (g, c) in itertools.product((3, 6), ((tg, tc), (cg, cc))):
        if seed == 6 or (g, c) == (tg, tc):  # seed 3: the treatment only, no pair
            reruns[(g, c, seed, "Zen4")] = run_result(g, c, seed, rng.normal(89, 1), 88, "Zen4")
    # Keyed by machine type, as load_same_cpu_reruns keys them.
    reruns = {(*key[:3], claims.machine(r)): r for key, r in reruns.items()}
    e = {x["claim"]: x for x in claims.evaluate(results, reruns)}[claim.text]
    val = lambda r: 100 * r["summary"]["final_val_accuracy"]
    committed = [val(results[(tg, tc, s)]) - val(results[(cg, cc, s)]) for s in cpus]
    one_cpu = [val(results[(tg, tc, 0)]) - val(results[(cg, cc, 0)])]
    rerun = {key[:3]: r for key, r in reruns.items()}
    one_cpu += [val(results[(tg, tc, s)]) - val(rerun[(cg, cc, s)]) for s in (1, 2)]
    one_cpu += [val(rerun[(tg, tc, 4)]) - val(results[(cg, cc, 4)])]
    one_cpu += [val(results[(tg, tc, 5)]) - val(rerun[(cg, cc, 5)])]
    one_cpu += [val(reruns[(tg, tc, 6, "Zen4 | ")]) - val(reruns[(cg, cc, 6, "Zen4 | ")])]
    assert e["n"] == 7 and e["mean"] == pytest.approx(np.mean(committed))
    assert e["same_cpu"]["n"] == 6
    assert e["same_cpu"]["mean"] == pytest.approx(np.mean(one_cpu))
    assert e["same_cpu"]["std"] == pytest.approx(np.std(one_cpu, ddof=1))
    assert e["same_cpu"]["per_seed"] == pytest.approx(dict(zip("012456", one_cpu, strict=True)))
    # A claim whose pairs all ran on one CPU model gets no second pairing.
    other = next(x for x in claims.evaluate(results, reruns) if x["claim"] != claim.text)
    assert other["same_cpu"] is None


def test_machine_type_needs_more_than_the_cpu_name():
    def record(cpu, platform, cpu_id=None):
        hardware = {"cpu": cpu, "platform": platform}
        return {"hardware": {**hardware, **({"cpu_id": cpu_id} if cpu_id else {})}}

    # Older records: the OS build tells two machines that share a CPU name apart.
    a, b = record("AMD EPYC", "Linux-fc-v657"), record("AMD EPYC", "Linux-fc-v1098")
    assert claims.machine(a) != claims.machine(b)
    assert claims.machine(a) == claims.machine(record("AMD EPYC", "Linux-fc-v657"))
    # Newer records: the CPU's identity decides, whatever the OS build.
    zen4 = "family 25 model 17 stepping 1; avx avx2 fma avx512f"
    c, d = record("AMD EPYC", "Linux-fc-v1", zen4), record("AMD EPYC", "Linux-fc-v2", zen4)
    assert claims.machine(c) == claims.machine(d)
    assert claims.machine(c) != claims.machine(record("AMD EPYC", "Linux-fc-v1", "family 25"))
    assert claims.machine(c) != claims.machine(record("Intel Xeon", "Linux-fc-v1", zen4))


def test_settle_plan_order_and_the_ra_control_rule():
    results = {}
    runs = ablation.settle_plan(results, reruns=[])
    names = [r.name for r in runs]
    assert names[:4] == [
        "momentum_reset__lb__seed1",
        "momentum_reset__lb__seed2",
        "keep_last_batch__lb__seed1",
        "keep_last_batch__lb__seed2",
    ]
    for batch_group in ("default", "batch2048"):
        for seed in range(10):
            assert f"{batch_group}__lb_lr__seed{seed}" in names
            assert f"{batch_group}__lb_lr_gbn__seed{seed}" in names
    for g in (16, 32, 64, 256, 512, 1024):
        assert [f"ghost{g}__lb_lr_gbn__seed{s}" in names for s in range(3)] == [True] * 3
    assert names[-2:] == ["ra_lr_unscaled__lb_lr_gbn_ra__seed0", "ra_plain_bn__lb_lr_gbn_ra__seed0"]
    # A control that moves +RA's seed 0 by more than 0.5 points gets seeds 1 and 2.
    results[("authors", "lb_lr_gbn_ra", 0)] = run_result("authors", "lb_lr_gbn_ra", 0, 90.9, 90)
    results[("ra_lr_unscaled", "lb_lr_gbn_ra", 0)] = run_result("x", "lb_lr_gbn_ra", 0, 90.5, 90)
    results[("ra_plain_bn", "lb_lr_gbn_ra", 0)] = run_result("x", "lb_lr_gbn_ra", 0, 90.3, 90)
    tail = [r.name for r in ablation.settle_plan(results, reruns=[])][-2:]
    assert tail == ["ra_plain_bn__lb_lr_gbn_ra__seed1", "ra_plain_bn__lb_lr_gbn_ra__seed2"]


def test_ra_control_rule_reads_ra_on_the_controls_machine_type():
    ra, unscaled, plain = (
        (g, "lb_lr_gbn_ra", 0) for g in ("authors", "ra_lr_unscaled", "ra_plain_bn")
    )
    # +RA's seed 0 ran on machine type A, its controls on B; against it neither moves
    # by more than 0.5 points, so neither gets more seeds.
    results = {
        ra: run_result(*ra, 90.6, 90, cpu="A"),
        unscaled: run_result(*unscaled, 90.5, 90, cpu="B"),
        plain: run_result(*plain, 90.3, 90, cpu="B"),
    }
    planned_ra = [r.name for r in ablation.settle_plan(results, reruns=[]) if r.seed > 0]
    assert not [name for name in planned_ra if name.startswith("ra_")]
    # A re-run of +RA seed 0 on a third type C counts for neither control...
    on_c = run_result(*ra, 91.5, 90, cpu="C")
    assert ablation.settle_plan(results, [on_c]) == ablation.settle_plan(results, reruns=[])
    # ...one on B is the controls' pair: plain BN then moves by 0.6 and gets seeds 1 and 2,
    # the unscaled LR (0.4) does not.
    on_b = run_result(*ra, 90.9, 90, cpu="B")
    tail = [r.name for r in ablation.settle_plan(results, [on_c, on_b])][-3:]
    assert tail == [
        "ra_plain_bn__lb_lr_gbn_ra__seed0",
        "ra_plain_bn__lb_lr_gbn_ra__seed1",
        "ra_plain_bn__lb_lr_gbn_ra__seed2",
    ]


def test_settle_runs_change_one_ingredient():
    """Each settle group's config differs from its reference in the one field it names."""
    from experiments.harness import launch
    from gbn_jax.trainer import regimes

    module = launch.load_config_module("configs/fashion_mnist_f1.py")

    def resolved(run):
        config = module.get_config(run.arg)
        return config, regimes.resolve(config, 50_000)

    ra, ra_reg = resolved(ablation.Planned("authors", "lb_lr_gbn_ra", 0))
    unscaled, unscaled_reg = resolved(ablation.Planned("ra_lr_unscaled", "lb_lr_gbn_ra", 0))
    plain, plain_reg = resolved(ablation.Planned("ra_plain_bn", "lb_lr_gbn_ra", 0))
    assert ra_reg.total_steps == unscaled_reg.total_steps == plain_reg.total_steps == 19_550
    assert ra_reg.to_dict()["lr_boundaries"][0][1] == pytest.approx(0.4)
    assert unscaled_reg.to_dict()["lr_boundaries"][0][1] == pytest.approx(0.1)
    assert plain_reg.to_dict()["lr_boundaries"] == ra_reg.to_dict()["lr_boundaries"]
    assert (ra.model.norm, unscaled.model.norm, plain.model.norm) == ("ghost", "ghost", "batch")
    lr, lr_reg = resolved(ablation.Planned("batch2048", "lb_lr", 0))
    gbn, gbn_reg = resolved(ablation.Planned("batch2048", "lb_lr_gbn", 0))
    assert lr_reg.to_dict()["lr_boundaries"] == gbn_reg.to_dict()["lr_boundaries"]
    assert lr_reg.to_dict()["lr_boundaries"][0][1] == pytest.approx(0.4)
    assert (lr.batch_size, lr.model.norm, gbn.model.norm) == (2048, "batch", "ghost")
    ghost, _ = resolved(ablation.Planned("ghost16", "lb_lr_gbn", 0))
    assert (ghost.batch_size, ghost.model.ghost_batch_size) == (4096, 16)


def _write_records(directory, records):
    directory.mkdir(parents=True, exist_ok=True)
    for r in records:
        name = f"{r['group']}__{r['column']}__seed{r['seed']}_{r['hardware']['cpu']}.json"
        (directory / name).write_text(json.dumps(r))


def test_ghost_size_study_pairs_every_size_with_plain_bn_on_one_cpu(tmp_path):
    from experiments.paper import ghost_size

    rng = np.random.default_rng(5)

    def record(ghost, seed, cpu):
        group, column = ablation.ghost_group(ghost)
        r = run_result(group, column, seed, rng.normal(87.5, 0.8), rng.normal(87, 0.8), cpu)
        return {**r, "wall_time_s": float(rng.uniform(150, 250)), "commit": "abc"}

    committed = [record(g, s, "Xeon") for g in (16, 32, 64, 256, 512, 1024) for s in (0, 1, 2)]
    # Ghost 128 and 4096 are default +GBN and +LR: seeds 0-2 committed from the EPYC,
    # seeds 3-9 from the Xeon; seeds 0-2 re-run on the Xeon stand in for them.
    committed += [record(g, s, "EPYC" if s < 3 else "Xeon") for g in (128, 4096) for s in range(10)]
    reruns = [record(g, s, "Xeon") for g in (128, 4096) for s in (0, 1, 2)]
    _write_records(tmp_path / "ablation_f1" / "runs", committed)
    _write_records(tmp_path / claims.SAME_CPU_RERUNS, reruns)
    bench = {
        "environment": {"cpu": "Xeon"},
        "rows": [
            {"ghost": g, "ms": 250.0, "ratio": {"median": 1.0 + g / 1e4, "ci95": [0.99, 1.2]}}
            for g in ablation.GHOST_SIZES
        ],
    }
    (tmp_path / "bench_ghost_size.json").write_text(json.dumps(bench))

    data = ghost_size.study(tmp_path)
    rows = {r["ghost"]: r for r in data["rows"]}
    assert data["cpu"] == "Xeon" and list(rows) == list(ablation.GHOST_SIZES)
    val = lambda r: 100 * r["summary"]["final_val_accuracy"]
    plain = {
        r["seed"]: val(r) for r in reruns if ablation.ghost_group(4096) == (r["group"], r["column"])
    }
    gbn128 = [val(r) for r in reruns if (r["group"], r["column"]) == ablation.ghost_group(128)]
    assert rows[128]["val"]["n"] == 3 and rows[128]["val"]["mean"] == pytest.approx(np.mean(gbn128))
    for g in (16, 1024):
        d = np.array([val(r) - plain[r["seed"]] for r in committed if r["group"] == f"ghost{g}"])
        half = T975[2] * d.std(ddof=1) / math.sqrt(3)
        got = rows[g]["val_vs_plain"]
        assert got["mean"] == pytest.approx(d.mean())
        assert got["ci_low"] == pytest.approx(d.mean() - half, abs=2e-3 * half)
    assert rows[4096]["val_vs_plain"] is None
    assert rows[64]["step_time_ratio"]["median"] == pytest.approx(1.0064)
    assert "4096 (plain BN)" in ghost_size.markdown(data)
    ghost_size.plot(data, tmp_path / "ghost_size.png")
    assert (tmp_path / "ghost_size.png").stat().st_size > 0

    # Ghost sizes that ran on two CPU models cannot be paired on one: an error.
    _write_records(tmp_path / "ablation_f1" / "runs", [record(32, 5, "EPYC")])
    with pytest.raises(ValueError, match="machine types"):
        ghost_size.study(tmp_path)
