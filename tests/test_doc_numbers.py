"""The numbers quoted in README.md and docs/ are the committed tables' and records'.

The tables (experiments/results/ablation_f1.json, claims.json) are rebuilt from the run
records by their own commands; the prose copies a few rows of them. These tests read the
copies back and compare them with the tables, cell by cell, so a rebuilt table with a
stale copy fails.
"""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
COLUMNS = ("sb", "lb", "lb_lr", "lb_lr_gbn", "lb_lr_gbn_ra")


def cells(text: str, row_start: str) -> list[str]:
    """The cells of the one table row that starts with `row_start`, label first."""
    rows = [line for line in text.splitlines() if line.startswith(row_start)]
    assert len(rows) == 1, f"expected one row starting {row_start!r}, found {len(rows)}"
    return [c.strip().replace("−", "-") for c in rows[0].strip("|").split("|")]


def table_body(text: str, header_start: str) -> list[list[str]]:
    """The cells of each row below the header (and its separator) of the table whose header
    starts with `header_start`, down to the first blank line."""
    start = text.index(header_start)
    lines = text[start:].split("\n\n")[0].splitlines()[2:]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def mean_std(stat: dict, sign: bool = False) -> str:
    if stat["n"] > 1 and stat["std"] == 0 and stat["mean"] == 0:
        return "0"
    return f"{stat['mean']:{'+' if sign else ''}.2f} ± {stat['std']:.2f}"


@pytest.fixture(scope="module")
def headline():
    table = json.loads((RESULTS / "ablation_f1.json").read_text())
    return table["headline"][table["headline_group"]]


@pytest.fixture(scope="module")
def claims():
    return json.loads((RESULTS / "claims.json").read_text())["claims"]


@pytest.mark.parametrize(
    "doc, row, key, sign",
    [
        ("README.md", "| ours (seeds", "test", False),
        ("README.md", "| ours, gap to SB", "gap_to_sb", True),
        ("docs/results.md", "| authors' protocol (seeds", "test", False),
        ("docs/results.md", "| gap to SB | 0 | −0.77", "gap_to_sb", True),
        ("docs/results.md", "| best over epochs (the authors'", "best_test", False),
    ],
)
def test_headline_rows_are_the_committed_table(headline, doc, row, key, sign):
    label, *quoted = cells((ROOT / doc).read_text(), row)
    expected = [mean_std(headline[c][key], sign) for c in COLUMNS]
    assert quoted == expected, f"{doc}: row {row!r} differs from ablation_f1.json"
    if key == "test":  # the label names the seeds the column's records have
        ra_seeds = sorted(int(s) for s in headline["lb_lr_gbn_ra"]["test"]["per_seed"])
        assert f"+RA seeds {ra_seeds[0]}-{ra_seeds[-1]}" in label


def test_results_md_verdicts_are_claims_json(claims):
    text = (ROOT / "docs" / "results.md").read_text()
    rows = table_body(text, "| claim (test split) | difference | 95% CI | verdict |")
    by_text = {c["claim"]: c for c in claims if c["split"] == "eval"}
    assert len(rows) == len(by_text)
    for row in rows:
        name, diff, interval, verdict = (c.replace("−", "-") for c in row)
        (claim,) = [c for t, c in by_text.items() if t.endswith(name)]
        n = re.search(r"\((\d+) seeds\)", diff)
        assert (int(n.group(1)) if n else 3) == claim["n"], name
        assert diff.split(" (")[0] == mean_std(claim, sign=True), name
        assert interval == f"[{claim['ci_low']:+.2f}, {claim['ci_high']:+.2f}]", name
        assert verdict == claim["verdict"], name


def test_group_sum_forms_table_is_the_record():
    """docs/performance.md's table of ways to write the ghost-batch sums copies
    bench_group_sum_forms.json: per form, in order, cores busy, time over the
    whole-batch sum (f1 / conv) and whether the bits are the layer's."""
    rows = json.loads((RESULTS / "bench_group_sum_forms.json").read_text())["rows"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    by_shape = [[r for r in rows if r["shape"] == s] for s in shapes]
    table = table_body((ROOT / "docs" / "performance.md").read_text(), "| sums of x and x · x |")
    assert len(table) == len(by_shape[0])
    bits = {None: "-", True: "yes", False: "no"}
    for line, f1, conv in zip(table, *by_shape, strict=True):
        _, busy, ratio, same = line
        assert busy == f"{f1['cores_busy']:.2f} / {conv['cores_busy']:.2f}", line
        expected = " / ".join(
            "1" if r["form"].startswith("whole") else f"{r['to_whole']:.2f}" for r in (f1, conv)
        )
        assert ratio == expected, line
        assert same == bits[f1["same_bits_as_layer"]] == bits[conv["same_bits_as_layer"]], line


@pytest.fixture(scope="module")
def ghost_norm_rows():
    return json.loads((RESULTS / "bench_ghost_norm.json").read_text())["rows"]


def ghost_norm_case(row: dict) -> list[str]:
    """The first three cells of a row of performance.md's GBN/BN tables: model, donation,
    XLA options."""
    names = {"f1": "F1", "conv": "3-layer conv net"}
    model = f"{names[row['model']]} ({row['batch']}, {row['ghost']})"
    return [model, "yes" if row["donated"] else "no", row["options"]]


def median_interval_verdict(stat: dict) -> str:
    low, high = stat["ci95"]
    return f"{stat['median']:.3f} [{low:.3f}, {high:.3f}] {stat['verdict']}"


def step_time_cells(row: dict) -> list[str]:
    """A row of performance.md's GBN/BN step-time tables: the case, the median step times
    and, for wall and CPU time, the median ratio, its 95% interval and the verdict."""
    return [
        *ghost_norm_case(row),
        f"{row['bn_ms']:.1f}",
        f"{row['gbn_ms']:.1f}",
        median_interval_verdict(row["ratio"]),
        median_interval_verdict(row["cpu_ratio"]),
    ]


def test_ghost_norm_overhead_table_is_the_record(ghost_norm_rows):
    """docs/performance.md's GBN/BN train-step table copies bench_ghost_norm.json: per
    model and case, the median step times and, for wall and CPU time, the median
    per-round ratio, its 95% interval and the verdict."""
    text = (ROOT / "docs" / "performance.md").read_text()
    table = table_body(text, "| model (batch, ghost) | donated | XLA options | BN ms | GBN ms |")
    assert len(table) == len(ghost_norm_rows)
    for line, row in zip(table, ghost_norm_rows, strict=True):
        assert line == step_time_cells(row), line


def test_ghost_norm_control_table_is_the_record(ghost_norm_rows):
    """docs/performance.md's table of cores busy and of the one-ghost-batch control copies
    bench_ghost_norm.json."""
    text = (ROOT / "docs" / "performance.md").read_text()
    table = table_body(text, "| model (batch, ghost) | donated | XLA options | cores busy:")
    assert len(table) == len(ghost_norm_rows)
    for line, row in zip(table, ghost_norm_rows, strict=True):
        expected = [
            *ghost_norm_case(row),
            " / ".join(f"{row['cores_busy'][k]:.2f}" for k in ("bn", "gbn", "gbn_one")),
            median_interval_verdict(row["one_ghost_ratio"]),
        ]
        assert line == expected, line


def test_conv_step_profile_table_is_the_records():
    """docs/performance.md's op-by-op table of the conv net's step copies the two profile
    records (the layer's elementwise passes on the split layout, then on the input's
    own): per layer, the step time, the time with one op running and the weight-gradient
    convolutions' time, all of it and the part no other op overlapped."""
    kinds = {"bn": "nn.BatchNorm", "gbn": "GhostBatchNorm", "gbn_one": "one ghost batch"}
    layouts = {"split": "bench_conv_step_profile_split_layout", "own": "bench_conv_step_profile"}
    text = (ROOT / "docs" / "performance.md").read_text()
    table = table_body(text, "| elementwise passes on | layer | step ms |")
    expected = []
    for layout, stem in layouts.items():
        for row in json.loads((RESULTS / f"{stem}.json").read_text())["rows"]:
            numbers = ("wall_ms", "one_op_ms", "weight_gradients_ms", "weight_gradients_alone_ms")
            expected.append([layout, kinds[row["kind"]], *(f"{row[k]:.1f}" for k in numbers)])
    assert [[line[0].split(" ")[0], *line[1:]] for line in table] == expected


@pytest.mark.parametrize(
    "stem", ["bench_ghost_norm_xla_defaults", "bench_ghost_norm_conv_xla_defaults"]
)
def test_ghost_norm_xla_defaults_table_is_the_record(stem):
    """docs/performance.md's longer runs at XLA's default options copy their records
    (the table after each command's --name), as the four-case table copies its record."""
    rows = json.loads((RESULTS / f"{stem}.json").read_text())["rows"]
    text = (ROOT / "docs" / "performance.md").read_text()
    start = text.index(f"--name {stem}`")
    table = table_body(text[start:], "| model (batch, ghost) | donated | XLA options | BN ms |")
    assert len(table) == len(rows)
    for line, row in zip(table, rows, strict=True):
        assert line == step_time_cells(row), line


def test_resnet44_jax_rerun_numbers_are_the_record():
    """The ResNet-44 JAX-only step times quoted in docs/performance.md are
    bench_train_resnet44_jax.json's medians."""
    record = json.loads((RESULTS / "bench_train_resnet44_jax.json").read_text())
    (model,) = record["results"]
    ms = {k: round(v["median_step_s"] * 1e3) for k, v in model["variants"].items()}
    text = " ".join((ROOT / "docs" / "performance.md").read_text().split())
    assert f"GhostBatchNorm {ms['jax_gbn']} ms, nn.BatchNorm {ms['jax_bn']} ms a step" in text
    ratio = model["variants"]["jax_gbn"]["speedup_vs_jax_bn"]
    assert f"speed-up {ratio:.2f} (median of the rounds)" in text
