"""Tests of the HLO collective counting in experiments/bench/comm_analysis.py."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments.bench import comm_analysis

# Collective lines are long; metadata goes on the same line as in real HLO dumps.
SYNTHETIC_HLO = """\
HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

ENTRY %main (x: f32[8,16], w: f32[16,4]) -> f32[8,4] {
  %x = f32[8,16]{1,0} parameter(0)
  %w = f32[16,4]{1,0} parameter(1)
  %stats = f32[16]{0} all-reduce(%x), channel_id=1, to_apply=%add, metadata={op_name="FWD"}
  %y = f32[8,16]{1,0} multiply(%x, %stats)
  %d = f32[8,4]{1,0} dot(%y, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %g = (f32[16,4]{1,0}, bf16[4]{0}) all-reduce(%w, %d), channel_id=2, metadata={op_name="BWD"}
  %ags = (f32[2]{0}, f32[16]{0}) all-gather-start(%stats), channel_id=3, dimensions={0}
  %agd = f32[16]{0} all-gather-done(%ags)
  ROOT %out = f32[8,4]{1,0} copy(%d)
}
""".replace("FWD", "jit(f)/jvp(M)/norm1/reduce_sum").replace(
    "BWD", "jit(f)/(transpose(jvp(M))/dense/dot_general:transpose(jvp(M))/dense/reduce_sum)"
)


def test_parse_synthetic_counts_bytes_categories_and_blocking():
    found = {c.name: c for c in comm_analysis.parse_collectives(SYNTHETIC_HLO)}
    assert set(found) == {"stats", "g", "ags"}  # the -done half is folded into -start
    stats, grads, gather = found["stats"], found["g"], found["ags"]
    assert stats.bytes == 16 * 4 and stats.categories == ["forward statistics"]
    assert stats.blocking  # the dot waits for it
    assert grads.operand_bytes == [16 * 4 * 4, 4 * 2]
    assert grads.categories == ["gradients", "gradients"]
    assert not grads.blocking
    assert gather.opcode == "all-gather" and gather.is_async and gather.bytes == 16 * 4
    summary = comm_analysis.summarize(list(found.values()))
    assert summary["collectives"] == 3
    assert summary["by_opcode"]["all-reduce"]["count"] == 2
    assert summary["blocking"] == {"count": 1, "bytes": 64}


def test_counts_a_real_compiled_gradient_allreduce(devices):
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    rng = np.random.default_rng(0)
    w = jax.device_put(rng.standard_normal((32, 8), np.float32), NamedSharding(mesh, P()))
    x = jax.device_put(rng.standard_normal((64, 32), np.float32), NamedSharding(mesh, P("data")))

    def loss(w, x):
        return jnp.mean(jnp.tanh(x @ w) ** 2)

    grad = jax.jit(jax.grad(loss), out_shardings=NamedSharding(mesh, P()))
    found = comm_analysis.parse_collectives(grad.lower(w, x).compile().as_text())
    all_reduces = [c for c in found if c.opcode == "all-reduce"]
    assert len(all_reduces) >= 1
    # The replicated gradient of w (32 x 8 float32) crosses the devices once.
    assert sum(c.bytes for c in all_reduces) == 32 * 8 * 4
    assert all(c.categories == ["gradients"] for c in all_reduces)


def test_pod_formulas_match_closed_forms():
    n, p, alpha, bw = 1e6, 256, 1e-6, 1e9
    ring = comm_analysis.ring_allreduce_s(n, p, alpha, bw)
    assert np.isclose(ring, 2 * 255 * alpha + 2 * 255 / 256 * n / bw)
    torus = comm_analysis.torus_allreduce_s(n, (16, 16), alpha, bw)
    expected = (30 * alpha + 30 / 16 * n / 2 / bw) + (30 * alpha + 30 / 16 * n / 16 / 2 / bw)
    assert np.isclose(torus, expected)
