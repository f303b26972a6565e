"""Every difference the docs claim, with its paired 95% interval and verdict.

The claims and their directions are fixed here before the runs that settle them
(``ablation.settle_plan``); the verdict follows the rule of ``experiments.paper.verdicts``.
Each claim compares two sets of F1 runs of the ablation (experiments/results/
ablation_f1/runs), paired by seed, on one split: the headline table's claims on the
test split it reports, every other claim on the validation split.

Usage:

  .venv/bin/python -m experiments.paper.claims     # writes experiments/results/claims.{md,json}
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from experiments.harness import tables
from experiments.harness.provenance import RESULTS_DIR
from experiments.paper import ablation, verdicts
from experiments.paper.ablation import SAME_CPU_RERUNS, load_reruns, machine

Run = tuple[str, str]  # (group, column)
Split = Literal["val", "eval"]


@dataclasses.dataclass(frozen=True)
class Claim:
    """Treatment minus control, paired by seed, is claimed to be of sign `direction`."""

    section: str
    text: str
    direction: verdicts.Direction
    treatment: Run
    control: Run
    split: Split = "val"


def _headline_claims() -> list[Claim]:
    a = "authors"
    section = "Headline (authors' protocol, final test accuracy; the paper's claims)"
    return [
        Claim(section, "LB generalizes worse than SB", "-", (a, "lb"), (a, "sb"), "eval"),
        Claim(section, "+LR beats LB", "+", (a, "lb_lr"), (a, "lb"), "eval"),
        Claim(section, "+GBN beats LB", "+", (a, "lb_lr_gbn"), (a, "lb"), "eval"),
        Claim(section, "+GBN beats +LR", "+", (a, "lb_lr_gbn"), (a, "lb_lr"), "eval"),
        Claim(
            section, "+RA closes the gap: +RA beats SB", "+", (a, "lb_lr_gbn_ra"), (a, "sb"), "eval"
        ),
        Claim(section, "+RA beats LB", "+", (a, "lb_lr_gbn_ra"), (a, "lb"), "eval"),
    ]


def _protocol_claims() -> list[Claim]:
    d = "default"
    section = "Today's protocol (validation accuracy)"
    return [
        Claim(
            section, "+LR loses to LB (batch 4096, LR 0.566 vs 0.1)", "-", (d, "lb_lr"), (d, "lb")
        ),
        Claim(
            section,
            "+GBN loses to LB (batch 4096, LR 0.566 vs 0.1)",
            "-",
            (d, "lb_lr_gbn"),
            (d, "lb"),
        ),
        Claim(
            section,
            "GBN helps at batch 4096 and LR 0.566 (+GBN beats +LR)",
            "+",
            (d, "lb_lr_gbn"),
            (d, "lb_lr"),
        ),
        Claim(
            section,
            "GBN helps at batch 2048 and LR 0.4 (+GBN beats +LR)",
            "+",
            ("batch2048", "lb_lr_gbn"),
            ("batch2048", "lb_lr"),
        ),
    ]


# Each switch of the authors' protocol alone against today's protocol, same column and
# seed: the direction of the docs' three-seed means ("0": the docs say it moves nothing).
SWITCH_DIRECTIONS: dict[str, dict[str, verdicts.Direction]] = {
    "lr_rule": {"lb": "+", "lb_lr": "+"},
    "bn_scale_init": {"lb": "0", "lb_lr": "+", "lb_lr_gbn": "+"},
    "momentum_reset": {"lb": "0", "lb_lr": "+", "lb_lr_gbn": "+"},
    "augment": {"lb": "-", "lb_lr": "-", "lb_lr_gbn": "-"},
    "keep_last_batch": {"lb": "0", "lb_lr": "0", "lb_lr_gbn": "0"},
}


def _switch_claims() -> list[Claim]:
    section = "Each switch of the authors' protocol alone (validation accuracy)"
    words = {"+": "raises", "-": "lowers", "0": "does not move"}
    return [
        Claim(
            section,
            f"{switch} {words[d]} {ablation.LABELS[column]}",
            d,
            (switch, column),
            ("default", column),
        )
        for switch, columns in SWITCH_DIRECTIONS.items()
        for column, d in columns.items()
    ]


def _regime_adaptation_claims() -> list[Claim]:
    ra = ("authors", "lb_lr_gbn_ra")
    section = "What makes +RA work (batch 2048, 19,550 updates, validation accuracy)"
    return [
        Claim(section, "+RA beats SB", "+", ra, ("authors", "sb")),
        Claim(
            section,
            "+RA beats LB (its 16x more updates, LR x4 and ghost batches)",
            "+",
            ra,
            ("authors", "lb"),
        ),
        Claim(
            section,
            "the sqrt LR scaling adds to +RA (LR 0.4 beats 0.1)",
            "+",
            ra,
            ("ra_lr_unscaled", "lb_lr_gbn_ra"),
        ),
        Claim(
            section,
            "ghost batches add to +RA (ghost 128 beats plain BN)",
            "+",
            ra,
            ("ra_plain_bn", "lb_lr_gbn_ra"),
        ),
    ]


def _ghost_claims() -> list[Claim]:
    section = "Ghost size at batch 4096, LR 0.566 (validation accuracy)"
    plain = ablation.ghost_group(4096)
    return [
        Claim(section, f"ghost {g} beats plain batch norm", "+", ablation.ghost_group(g), plain)
        for g in ablation.GHOST_SIZES
        if g != 4096
    ]


CLAIMS: tuple[Claim, ...] = (
    *_headline_claims(),
    *_protocol_claims(),
    *_switch_claims(),
    *_regime_adaptation_claims(),
    *_ghost_claims(),
)


def recorded_as(run: Run) -> Run:
    """The (group, column) whose records stand for `run` (a switch that leaves a column
    unchanged shares the default group's runs)."""
    return ("default", run[1]) if run in ablation.SAME_AS_DEFAULT else run


def runs(results: dict[tuple[str, str, int], dict], run: Run) -> dict[int, dict]:
    """seed -> record of one (group, column)."""
    run = recorded_as(run)
    return {s: r for (g, c, s), r in results.items() if (g, c) == run}


def accuracies(
    results: dict[tuple[str, str, int], dict], run: Run, split: Split
) -> dict[int, float]:
    """seed -> final accuracy (%) of one (group, column) on one split."""
    return {s: ablation.accuracy(r, split) for s, r in runs(results, run).items()}


def cpu_model(record: dict) -> str:
    return record["hardware"]["cpu"]


def load_same_cpu_reruns(results_dir: Path = RESULTS_DIR) -> dict[tuple, dict]:
    """(group, column, seed, `machine`) -> a run re-run on another machine type."""
    return {(r["group"], r["column"], r["seed"], machine(r)): r for r in load_reruns(results_dir)}


def on_machines(committed: dict, run: Run, seed: int, reruns: dict[tuple, dict]) -> dict:
    """`machine` -> the record of one run and seed: its committed record and its re-runs."""
    out = {m: r for (g, c, s, m), r in reruns.items() if (g, c, s) == (*run, seed)}
    out[machine(committed)] = committed
    return out


def same_cpu(
    results: dict[tuple[str, str, int], dict], reruns: dict[tuple, dict], claim: Claim
) -> verdicts.PairedDifference | None:
    """The claim with every seed's treatment and control taken from one machine type.

    None when every pair of the rule already ran on one machine type. A pair that crosses
    types is taken from the treatment's type (its control re-run there) or, failing that,
    the control's (the treatment re-run there) or, failing both, another type on which
    both were re-run; a seed with none of these is left out.
    """
    treatment, control = runs(results, claim.treatment), runs(results, claim.control)
    seeds = sorted(set(treatment) & set(control))
    if all(machine(treatment[s]) == machine(control[s]) for s in seeds):
        return None
    t_run, c_run = recorded_as(claim.treatment), recorded_as(claim.control)
    t_acc, c_acc = {}, {}
    for s in seeds:
        t_on = on_machines(treatment[s], t_run, s, reruns)
        c_on = on_machines(control[s], c_run, s, reruns)
        order = [machine(treatment[s]), machine(control[s]), *sorted(t_on)]
        common = [m for m in order if m in t_on and m in c_on]
        if common:
            t_acc[s] = ablation.accuracy(t_on[common[0]], claim.split)
            c_acc[s] = ablation.accuracy(c_on[common[0]], claim.split)
    return verdicts.paired(claim.text, claim.direction, t_acc, c_acc)


def evaluate(
    results: dict[tuple[str, str, int], dict], reruns: dict[tuple, dict] | None = None
) -> list[dict[str, Any]]:
    """Every claim with its paired differences, interval and verdict.

    A claim some of whose pairs ran on two machine types also gets ``same_cpu``: the same
    comparison with every pair on one machine type, through re-runs (`same_cpu`).
    """
    out = []
    for claim in CLAIMS:
        diff = verdicts.paired(
            claim.text,
            claim.direction,
            accuracies(results, claim.treatment, claim.split),
            accuracies(results, claim.control, claim.split),
        )
        on_one_cpu = same_cpu(results, reruns or {}, claim)
        out.append(
            dict(
                section=claim.section,
                split=claim.split,
                treatment=list(claim.treatment),
                control=list(claim.control),
                **diff.to_dict(),
                same_cpu=None if on_one_cpu is None else on_one_cpu.to_dict(),
            )
        )
    return out


def columns(results: dict[tuple[str, str, int], dict]) -> list[dict[str, Any]]:
    """Mean, std and 95% interval of every (group, column) on both splits."""
    runs = sorted({(g, c) for g, c, _ in results})
    return [
        dict(
            group=g,
            column=c,
            **{
                split: verdicts.mean_interval(accuracies(results, (g, c), split))
                for split in ("val", "eval")
            },
        )
        for g, c in runs
    ]


def interval_cell(low: float | None, high: float | None, sign: bool = True) -> str:
    """'[low, high]' to two decimals (signed unless `sign` is False); '-' for no interval."""
    if low is None:
        return "-"
    return f"[{low:+.2f}, {high:+.2f}]" if sign else f"[{low:.2f}, {high:.2f}]"


def markdown(evaluated: Sequence[dict], column_stats: Sequence[dict]) -> str:
    lines = [
        "# Claims and verdicts: F1 on Fashion-MNIST",
        "",
        "Each claim: treatment minus control, paired by seed; mean ± sample std (ddof=1) "
        "of the differences, the 95% t interval of their mean, and the verdict by the "
        "rule in experiments/paper/verdicts.py (holds: the interval excludes 0 on the claimed "
        "side; contradicted: on the other side, or on either side for a claim of no "
        "effect; undetermined: otherwise). 'a new seed' is the 95% prediction interval "
        "of one further seed's own difference (or accuracy), mean ± t(n - 1) · s · "
        "sqrt(1 + 1/n): where a re-run with an unreported seed is expected to land; it "
        "plays no part in the verdict. Accuracies in %; `val` is the 10,000 held-out "
        "training images, `eval` the test split.",
    ]
    for section, claims_in_section in itertools.groupby(evaluated, key=lambda e: e["section"]):
        rows = [
            [
                e["claim"],
                e["split"],
                e["n"],
                tables.cell(e["mean"], e["std"], sign=True),
                interval_cell(e["ci_low"], e["ci_high"]),
                e["verdict"],
                interval_cell(e["new_seed_low"], e["new_seed_high"]),
            ]
            for e in claims_in_section
        ]
        header = ["claim", "split", "n", "difference", "95% CI", "verdict", "a new seed"]
        lines += ["", f"## {section}", "", tables.markdown_table(header, rows)]
    crossing = [e for e in evaluated if e["same_cpu"] is not None]
    if crossing:
        rows = [
            [
                e["claim"],
                e["n"],
                tables.cell(e["mean"], e["std"], sign=True),
                interval_cell(e["ci_low"], e["ci_high"]),
                e["verdict"],
                e["same_cpu"]["n"],
                tables.cell(e["same_cpu"]["mean"], e["same_cpu"]["std"], sign=True),
                interval_cell(e["same_cpu"]["ci_low"], e["same_cpu"]["ci_high"]),
                e["same_cpu"]["verdict"],
            ]
            for e in crossing
        ]
        header = ["claim", "n", "difference", "95% CI", "verdict"]
        header += ["n (one machine)", "difference (one machine)", "95% CI (one machine)"]
        header += ["verdict (one machine)"]
        lines += [
            "",
            "## Claims whose pairs ran on two machine types",
            "",
            "Runs are bit-identical only on one machine type (`claims.machine`: the CPU and its "
            "instruction sets, or the OS build in older records). For these claims some seeds' "
            "treatment and control ran on different types; the right-hand columns take "
            "each such pair from one type through re-runs: the control re-run on the "
            "treatment's type, else the treatment re-run on the control's, else both "
            f"re-run on a third ({SAME_CPU_RERUNS}).",
            "",
            tables.markdown_table(header, rows),
        ]
    rows = [
        [
            c["group"],
            ablation.LABELS[c["column"]],
            c["val"]["n"],
            f"{c['val']['mean']:.2f}",
            interval_cell(c["val"]["ci_low"], c["val"]["ci_high"], False),
            interval_cell(c["val"]["new_seed_low"], c["val"]["new_seed_high"], False),
            f"{c['eval']['mean']:.2f}",
            interval_cell(c["eval"]["ci_low"], c["eval"]["ci_high"], False),
            interval_cell(c["eval"]["new_seed_low"], c["eval"]["new_seed_high"], False),
        ]
        for c in column_stats
    ]
    header = ["group", "column", "n", "val", "val 95% CI", "val: a new seed"]
    header += ["test", "test 95% CI", "test: a new seed"]
    lines += [
        "",
        "## Every group and column: mean, 95% interval, and where a new seed lands",
        "",
        tables.markdown_table(header, rows),
    ]
    return "\n".join(lines) + "\n"


def report(results_dir: Path = RESULTS_DIR) -> dict[str, Any]:
    results = ablation.load_results(results_dir)
    reruns = load_same_cpu_reruns(results_dir)
    evaluated, column_stats = evaluate(results, reruns), columns(results)
    out = dict(rule="experiments/paper/verdicts.py", claims=evaluated, columns=column_stats)
    (results_dir / "claims.json").write_text(json.dumps(out, indent=1) + "\n")
    (results_dir / "claims.md").write_text(markdown(evaluated, column_stats))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results_dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    report(Path(args.results_dir))
    print((Path(args.results_dir) / "claims.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
