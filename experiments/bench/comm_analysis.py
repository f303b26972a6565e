"""Collectives in the compiled data-parallel train step: BatchNorm against Ghost BN.

Compiles the project's train step (``gbn_jax.trainer.steps.make_train_step``, jitted over a 1-D
"data" mesh of 8 fake CPU devices, batch sharded, state replicated, as the trainer
does) for F1 and ResNet-44 with ``nn.BatchNorm`` and with ``GhostBatchNorm``, reads the
optimized HLO and counts the collectives (all-reduce, all-gather, reduce-scatter,
collective-permute, all-to-all, sync or async ``-start``) and the bytes each carries.
Only compilation happens; nothing runs.

Every operand of a (possibly combined) collective is classified from the op_name XLA
keeps in its metadata (a combined collective lists its operands' names in order):

* ``forward statistics``: reductions inside a norm layer on the forward (jvp) path;
* ``backward norm sums``: reductions inside a norm layer on the backward (transpose)
  path, i.e. BN's sum(dy) and sum(dy * x_hat), which are also its scale/bias grads;
* ``gradients``: the other backward reductions (weight and bias gradients);
* ``other``: metrics (loss, accuracy) and the like.

and every collective is marked *blocking* when a matmul or convolution of the same step
depends on its result (it sits on the forward/backward critical path), or *trailing*
when only the optimizer update and outputs do (it can overlap with the backward pass).
Under GBN the forward reductions that still reach a collective are the running-average
updates, which are trailing.

The markdown also extrapolates to a TPU pod (ResNet-50, 256 chips, global batch 8192,
32 per chip, ghost 32) with ring and 2-D torus all-reduce cost formulas under stated
latency and bandwidth assumptions.

Usage:
  .venv/bin/python -m experiments.bench.comm_analysis            # writes results/comm_analysis.*

References:
  Hoffer, Hubara & Soudry (2017), section 4 ("... reduces communication bandwidth").
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import re
from typing import Any

from experiments.harness import provenance, tables
from experiments.harness.provenance import RESULTS_DIR

COLLECTIVES = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "collective-permute",
    "all-to-all",
)
DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
}
# Ops whose dependence on a collective puts that collective on the compute critical path.
HEAVY_OPS = ("dot", "convolution")

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%(?P<name>[\w.\-]+)\s*=\s*(?P<rest>.*)$")
_ARRAY = re.compile(r"\b(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]")
_OPCODE = re.compile(r"^(?P<shape>\(.*?\)|[\w\[\],{}:]+)\s+(?P<op>[\w\-]+)\((?P<args>.*)$")


@dataclasses.dataclass
class Collective:
    """One collective instruction of the optimized HLO."""

    name: str
    opcode: str  # e.g. "all-reduce" (an async "-start" is reported under its base op)
    is_async: bool
    operand_shapes: list[tuple[str, tuple[int, ...]]]
    operand_bytes: list[int]
    operand_op_names: list[str]
    categories: list[str]
    blocking: bool = False

    @property
    def bytes(self) -> int:
        return sum(self.operand_bytes)


def array_shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
    """All ``dtype[d0,d1,...]`` array shapes in an HLO shape string, in order."""
    out = []
    for m in _ARRAY.finditer(text):
        if m.group("dtype") in DTYPE_BYTES:
            dims = tuple(int(d) for d in m.group("dims").split(",") if d)
            out.append((m.group("dtype"), dims))
    return out


def shape_bytes(shape: tuple[str, tuple[int, ...]]) -> int:
    """Bytes of one array shape."""
    return DTYPE_BYTES[shape[0]] * math.prod(shape[1])


def split_computations(hlo: str) -> dict[str, list[str]]:
    """Maps each computation name of an HLO module to its instruction lines."""
    comps: dict[str, list[str]] = {}
    current = None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if header and not line.startswith(" "):
            current = header.group(1)
            comps[current] = []
            if line.startswith("ENTRY"):
                comps["__entry__"] = comps[current]
        elif current is not None and _INSTR.match(line):
            comps[current].append(line)
    return comps


def categorize(op_name: str) -> str:
    """Which part of the step a reduction belongs to, from its metadata op_name."""
    parts = op_name.split("/")
    in_norm = any(re.search(r"norm|BatchNorm", p, re.IGNORECASE) for p in parts)
    backward = "transpose(" in op_name
    forward = "jvp(" in op_name and not backward
    if in_norm and forward:
        return "forward statistics"
    if in_norm and backward:
        return "backward norm sums"
    if backward:
        return "gradients"
    return "other"


def operand_op_names(op_name: str, count: int) -> list[str]:
    """Per-operand op_names: a combined collective lists them as ``prefix/(a:b:...)``."""
    m = re.match(r"^(?P<prefix>.*?/)\((?P<body>.*)\)$", op_name)
    if count > 1 and m and m.group("body").count(":") == count - 1:
        prefix = m.group("prefix")
        return [prefix + part for part in m.group("body").split(":")]
    return [op_name] * count


def parse_collectives(hlo: str) -> list[Collective]:
    """Finds every collective in an optimized HLO module and marks blocking ones.

    Args:
      hlo: ``compiled.as_text()`` of a jitted function.

    Returns:
      The collectives of all computations (``-done`` halves of async pairs are
      folded into their ``-start``), each with operand shapes, bytes, categories and
      ``blocking`` (a dot or convolution of the entry computation depends on it).
    """
    comps = split_computations(hlo)
    heavy_comps = {
        name
        for name, lines in comps.items()
        if any(re.search(rf"\s({'|'.join(HEAVY_OPS)})\(", ln) for ln in lines)
    }
    found: list[Collective] = []
    for comp, lines in comps.items():
        if comp == "__entry__":
            continue
        for line in lines:
            m = _INSTR.match(line)
            om = _OPCODE.match(m.group("rest"))
            if not om:
                continue
            op = om.group("op")
            base = op.removesuffix("-start")
            if base not in COLLECTIVES or op.endswith("-done"):
                continue
            shapes = array_shapes(om.group("shape"))
            if base == "all-gather" and op.endswith("-start"):
                shapes = shapes[len(shapes) // 2 :]  # (inputs, outputs): keep outputs
            elif base == "all-reduce" or base == "reduce-scatter":
                pass
            name_m = re.search(r'op_name="([^"]*)"', line)
            op_name = name_m.group(1) if name_m else ""
            names = operand_op_names(op_name, len(shapes))
            found.append(
                Collective(
                    name=m.group("name"),
                    opcode=base,
                    is_async=op.endswith("-start"),
                    operand_shapes=shapes,
                    operand_bytes=[shape_bytes(s) for s in shapes],
                    operand_op_names=names,
                    categories=[categorize(n) for n in names],
                )
            )
    _mark_blocking(found, comps, heavy_comps)
    return found


def _mark_blocking(
    found: list[Collective], comps: dict[str, list[str]], heavy_comps: set[str]
) -> None:
    """Sets ``blocking`` for collectives a dot/convolution in the entry depends on."""
    entry = comps.get("__entry__", [])
    users: dict[str, list[str]] = collections.defaultdict(list)
    heavy: set[str] = set()
    for line in entry:
        m = _INSTR.match(line)
        name, rest = m.group("name"), m.group("rest")
        om = _OPCODE.match(rest)
        if not om:
            continue
        args = om.group("args")
        operand_part = args.split("),")[0] if ")," in args else args
        for operand in re.findall(r"%([\w.\-]+)", operand_part):
            users[operand].append(name)
        called = re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", rest)
        if om.group("op") in HEAVY_OPS or any(c in heavy_comps for c in called):
            heavy.add(name)
    for c in found:
        seen, stack = set(), [c.name]
        while stack:
            node = stack.pop()
            for u in users.get(node, []):
                if u in heavy:
                    c.blocking = True
                    stack = []
                    break
                if u not in seen:
                    seen.add(u)
                    stack.append(u)


def summarize(found: list[Collective]) -> dict[str, Any]:
    """Counts and bytes by opcode, by category and by blocking/trailing."""
    by_op: dict[str, dict[str, int]] = collections.defaultdict(lambda: {"count": 0, "bytes": 0})
    by_cat: dict[str, dict[str, int]] = collections.defaultdict(lambda: {"operands": 0, "bytes": 0})
    blocking = {"count": 0, "bytes": 0}
    trailing = {"count": 0, "bytes": 0}
    for c in found:
        key = c.opcode + (" (async)" if c.is_async else "")
        by_op[key]["count"] += 1
        by_op[key]["bytes"] += c.bytes
        side = blocking if c.blocking else trailing
        side["count"] += 1
        side["bytes"] += c.bytes
        for cat, b in zip(c.categories, c.operand_bytes, strict=True):
            if cat == "forward statistics" and not c.blocking:
                cat = "running statistics (trailing)"
            elif cat == "backward norm sums" and not c.blocking:
                # Without cross-device statistics these sums are just the norm layers'
                # scale and bias gradients.
                cat = "norm scale/bias gradients (trailing)"
            by_cat[cat]["operands"] += 1
            by_cat[cat]["bytes"] += b
    return {
        "collectives": len(found),
        "bytes": sum(c.bytes for c in found),
        "by_opcode": dict(by_op),
        "by_category": dict(by_cat),
        "blocking": blocking,
        "trailing": trailing,
    }


# ---------------------------------------------------------------------------------------
# Compiling the project's step on 8 devices.
# ---------------------------------------------------------------------------------------


def compiled_step_hlo(model_name: str, norm: str, global_batch: int, ghost: int) -> str:
    """Optimized HLO of the project's train step, data-parallel over every device."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from experiments.bench import step_speed
    from gbn_jax import models
    from gbn_jax.trainer import steps

    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    shape = {"f1": (28, 28, 1), "resnet_cifar": (32, 32, 3)}[model_name]
    model = models.get_model(
        model_name,
        num_classes=10,
        norm=norm,
        ghost_batch_size=ghost if norm == "ghost" else None,
    )
    regime = step_speed.paper_regime(ghost, global_batch)
    tx = regime.optimizer()
    abstract = jax.eval_shape(
        lambda rng: steps.create_train_state(rng, model, tx, shape), jax.random.key(0)
    )
    state = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), abstract
    )
    batch = {
        "image": jax.ShapeDtypeStruct((global_batch, *shape), jnp.float32, sharding=batch_sharding),
        "label": jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=batch_sharding),
    }
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
    step = jax.jit(
        steps.make_train_step(model, tx, regime.learning_rate),
        in_shardings=(replicated, batch_sharding, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
    )
    return step.lower(state, batch, key).compile().as_text()


# ---------------------------------------------------------------------------------------
# Pod extrapolation (on paper).
# ---------------------------------------------------------------------------------------

# ResNet-50 (He et al. 2016): 25,557,032 parameters; 53 BN layers (stem, 16 bottlenecks
# x 3, 4 projection shortcuts) whose channels add up to 26,560.
RESNET50 = {"params": 25_557_032, "bn_layers": 53, "bn_channels": 26_560}
POD = {
    "chips": 256,
    "torus": (16, 16),
    "global_batch": 8192,
    "ghost": 32,
    "alpha_s": 2e-6,  # per hop: link latency + synchronization, ICI-class
    "link_bytes_per_s": 50e9,  # per direction, per link
    "compute_step_s": 0.010,  # ResNet-50 fwd+bwd on 32 images/chip at ~40% of bf16 peak
}


def ring_allreduce_s(nbytes: float, p: int, alpha: float, bw: float) -> float:
    """Ring all-reduce time: 2(p-1) steps of latency alpha, 2(p-1)/p * n bytes per link."""
    return 2 * (p - 1) * alpha + 2 * (p - 1) / p * nbytes / bw


def torus_allreduce_s(nbytes: float, dims: tuple[int, ...], alpha: float, bw: float) -> float:
    """2-D (or k-D) torus all-reduce as reduce-scatter/all-gather rings per dimension.

    Each dimension d runs a bidirectional ring over the data left after the previous
    dimensions' reduce-scatter; latency adds up over dimensions, bandwidth terms shrink.
    """
    t, n = 0.0, nbytes
    for d in dims:
        # Two directions halve the bytes per link.
        t += 2 * (d - 1) * alpha + 2 * (d - 1) / d * (n / 2) / bw
        n /= d
    return t


def pod_extrapolation() -> dict[str, Any]:
    """Per-step collective volume and critical-path latency, BN vs GBN, on paper."""
    p, a, bw = POD["chips"], POD["alpha_s"], POD["link_bytes_per_s"]
    grads = RESNET50["params"] * 4  # float32 gradient all-reduce
    stats = RESNET50["bn_channels"] * 2 * 4  # sum and sum of squares, float32, per pass
    layers = RESNET50["bn_layers"]
    out: dict[str, Any] = {"assumptions": POD, "model": RESNET50}
    for algo, fn in (
        ("ring", lambda n: ring_allreduce_s(n, p, a, bw)),
        ("2d_torus", lambda n: torus_allreduce_s(n, POD["torus"], a, bw)),
    ):
        per_layer = fn(stats / layers)
        grad_t = fn(grads)
        out[algo] = {
            "bn_forward_blocking_collectives": layers,
            "bn_backward_blocking_collectives": layers,
            "bn_blocking_latency_s": 2 * layers * per_layer,
            "bn_stat_bytes_per_step": 2 * stats,
            "gradient_allreduce_s": grad_t,
            "gradient_bytes": grads,
            "gbn_blocking_collectives": 0,
            "gbn_blocking_latency_s": 0.0,
        }
    return out


# ---------------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------------

CASES = (
    # (model, global batch, ghost): per device 512 / 128 examples, whole ghost batches.
    ("f1", 4096, 128),
    ("resnet_cifar", 1024, 128),
)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(RESULTS_DIR / "comm_analysis"))
    args = parser.parse_args(argv)
    # Eight fake CPU devices: set before JAX starts its backend.
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
        ).strip()
    import jax

    jax.config.update("jax_platforms", "cpu")
    from tqdm import tqdm

    devices = jax.device_count()
    results = []
    cases = [(m, b, g, norm) for m, b, g in CASES for norm in ("batch", "ghost")]
    for model_name, batch, ghost, norm in tqdm(cases, desc="compile on 8 devices"):
        found = parse_collectives(compiled_step_hlo(model_name, norm, batch, ghost))
        results.append(
            {
                "model": model_name,
                "norm": norm,
                "global_batch": batch,
                "per_device_batch": batch // devices,
                "ghost_batch_size": ghost if norm == "ghost" else None,
                "summary": summarize(found),
                "collectives": [{**dataclasses.asdict(c), "bytes": c.bytes} for c in found],
            }
        )
    pod = pod_extrapolation()
    record = {"devices": devices, "jax": jax.__version__, "cases": results, "pod": pod}
    record.update(provenance.provenance())
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(record, f, indent=1)
    md = report(record)
    with open(args.out + ".md", "w") as f:
        f.write(md)
    print(md)


def report(record: dict[str, Any]) -> str:
    """The markdown report: measured HLO table, categories, pod extrapolation."""
    rows = []
    cats = []
    for case in record["cases"]:
        s = case["summary"]
        label = f"{case['model']} {'GBN' if case['norm'] == 'ghost' else 'BN'}"
        ops = ", ".join(f"{k} x{v['count']}" for k, v in sorted(s["by_opcode"].items()))
        rows.append(
            [
                label,
                f"{case['global_batch']} ({case['per_device_batch']}/device)",
                f"{s['collectives']} ({ops or 'none'})",
                fmt_bytes(s["bytes"]),
                f"{s['blocking']['count']} ({fmt_bytes(s['blocking']['bytes'])})",
                f"{s['trailing']['count']} ({fmt_bytes(s['trailing']['bytes'])})",
            ]
        )
        for cat, v in sorted(s["by_category"].items()):
            cats.append([label, cat, v["operands"], fmt_bytes(v["bytes"])])
    pod = record["pod"]
    a = pod["assumptions"]
    ring, torus = pod["ring"], pod["2d_torus"]
    ms = lambda s: f"{s * 1e3:.2f} ms"
    lines = [
        "# Collectives in the compiled data-parallel train step: BatchNorm vs Ghost BN",
        "",
        f"Optimized HLO of the project's `make_train_step`, jitted over {record['devices']} "
        f"fake CPU devices (jax {record['jax']}; batch sharded on `data`, state replicated). "
        "Command: `.venv/bin/python -m experiments.bench.comm_analysis`. Bytes are the payload "
        "each device contributes (a ring all-reduce sends about twice that per device). "
        "*Blocking*: a matmul/convolution of the step depends on the result (on the "
        "forward/backward critical path). *Trailing*: only the optimizer update and the "
        "outputs depend on it (overlappable with the backward pass).",
        "",
        tables.markdown_table(
            ["step", "global batch", "collectives (by op)", "bytes", "blocking", "trailing"], rows
        ),
        "",
        "Per-operand classification (from each operand's metadata op_name; combined "
        "collectives list one name per operand):",
        "",
        tables.markdown_table(["step", "category", "operands", "bytes"], cats),
        "",
        "## On paper: a TPU pod",
        "",
        f"ResNet-50 ({pod['model']['params']:,} parameters, {pod['model']['bn_layers']} BN "
        f"layers, {pod['model']['bn_channels']:,} BN channels in all) on {a['chips']} chips "
        f"({a['torus'][0]}x{a['torus'][1]} torus), global batch {a['global_batch']} "
        f"({a['global_batch'] // a['chips']} per chip), ghost batch {a['ghost']}: every "
        "ghost batch lives on one chip. Assumptions (stated, not measured): per-hop "
        f"latency alpha = {a['alpha_s'] * 1e6:.0f} us (link + synchronization), link "
        f"bandwidth {a['link_bytes_per_s'] / 1e9:.0f} GB/s per direction, float32 "
        f"statistics and gradients, compute ~{a['compute_step_s'] * 1e3:.0f} ms per step "
        "(32 images/chip at ~40% of bf16 peak). Ring all-reduce of n bytes over p chips: "
        "T = 2(p-1) alpha + 2(p-1)/p n / B. 2-D torus (reduce-scatter/all-gather per "
        "dimension, bidirectional): T = sum_d [2(d-1) alpha + 2(d-1)/d (n_d / 2) / B], "
        "n_d the data left after the previous dimensions.",
        "",
        tables.markdown_table(
            ["per step", "BN (global statistics)", "GBN (ghost 32, per chip)"],
            [
                [
                    "blocking collectives, forward",
                    f"{ring['bn_forward_blocking_collectives']} (one per BN layer: sum, sum "
                    "of squares)",
                    0,
                ],
                [
                    "blocking collectives, backward",
                    f"{ring['bn_backward_blocking_collectives']} (sum dy, sum dy*x_hat per "
                    "BN layer)",
                    0,
                ],
                [
                    "statistics volume",
                    fmt_bytes(ring["bn_stat_bytes_per_step"]),
                    "0 (running averages need none: each chip's own or one trailing all-reduce)",
                ],
                [
                    "gradient all-reduce (overlappable)",
                    fmt_bytes(ring["gradient_bytes"]),
                    fmt_bytes(ring["gradient_bytes"]),
                ],
                ["critical-path latency of statistics, ring", ms(ring["bn_blocking_latency_s"]), 0],
                [
                    "critical-path latency of statistics, 2-D torus",
                    ms(torus["bn_blocking_latency_s"]),
                    0,
                ],
                [
                    "gradient all-reduce time, ring / 2-D torus",
                    f"{ms(ring['gradient_allreduce_s'])} / {ms(torus['gradient_allreduce_s'])}",
                    "same",
                ],
            ],
        ),
        "",
        "Reading: the statistics are tiny in bytes (KB per layer) but each of the "
        f"{2 * ring['bn_forward_blocking_collectives']} BN all-reduces is a synchronization "
        "across all chips that the next layer waits for, so BN's cost is latency on the "
        f"critical path: ~{ms(torus['bn_blocking_latency_s'])} per step on a 2-D torus and "
        f"~{ms(ring['bn_blocking_latency_s'])} with a flat ring, against a compute step of "
        f"~{a['compute_step_s'] * 1e3:.0f} ms. With GBN and whole ghost batches per chip the "
        "only collective is the gradient all-reduce, which XLA can start layer by layer "
        "while the backward pass continues. The measured HLO above shows the same "
        "structure at 8 devices.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
