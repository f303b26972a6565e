"""Tests for the package's layers: the layer and the models import and train with only
jax, flax and numpy; the public names and the version."""

import importlib.metadata
import json
import os
import subprocess
import sys

import gbn_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What the `train` and `research` extras bring; none of it may load with the layer.
EXTRAS_ONLY = (
    "tensorflow_datasets",
    "tensorflow",
    "grain",
    "orbax",
    "tensorboardX",
    "scipy",
    "matplotlib",
    "optax",
    "ml_collections",
    "tqdm",
    "PIL",
)

# In a fresh process: a training step of a linen model and of an NNX model with ghost
# batch norm, and of a model of the zoo. Flax is loaded and used first on its own, so
# that what Flax itself imports (flax.nnx loads optax) is not charged to gbn_jax.
PROBE = """
import json, sys

def top_level():
    return {m.partition(".")[0] for m in sys.modules}

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
x = jax.random.normal(jax.random.key(0), (8, 3))
bn = nn.BatchNorm(use_running_average=False)
bn.apply(bn.init(jax.random.key(1), x), x, mutable=["batch_stats"])
before_linen = top_level()

import gbn_jax.linen, gbn_jax.models

class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = nn.Dense(4)(x)
        return gbn_jax.linen.GhostBatchNorm(use_running_average=not train, ghost_batch_size=4)(x)

def finite(tree):
    return all(bool(np.isfinite(a).all()) for a in jax.tree.leaves(tree))

# Jitted, as in training: one compile per step instead of one per operation.
def linen_step(model, x):
    def step(x):
        variables = model.init(jax.random.key(1), x, train=False)
        def loss(params):
            y, updates = model.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return jnp.mean(y**2), updates
        (value, _), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
        return value, grads
    return finite(jax.jit(step)(x))

zoo = gbn_jax.models.get_model(
    "f1", num_classes=10, norm="ghost", ghost_batch_size=4, width=16, num_hidden=2
)
results = [linen_step(Net(), x), linen_step(zoo, x)]
linen_new = top_level() - before_linen

from flax import nnx
nnx.BatchNorm(3, rngs=nnx.Rngs(0))(x)
before_nnx = top_level()

import gbn_jax.nnx
layer = gbn_jax.nnx.GhostBatchNorm(3, ghost_batch_size=4, rngs=nnx.Rngs(0))
grads = nnx.jit(nnx.grad(lambda m: jnp.mean(m(x) ** 2)))(layer)
ghost = gbn_jax.ghostify_nnx(nnx.Sequential(nnx.BatchNorm(3, rngs=nnx.Rngs(0))), 4)
results += [finite(grads), finite(nnx.jit(lambda m, x: m(x))(ghost, x))]
nnx_new = top_level() - before_nnx
print(json.dumps({
    "finite": results,
    "linen_new": sorted(linen_new),
    "nnx_new": sorted(nnx_new),
    "loaded": sorted(top_level()),
    "ours": sorted(m for m in sys.modules if m.partition(".")[0] == "gbn_jax"),
}))
"""


def test_the_layer_and_models_need_only_jax_flax_numpy():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    got = json.loads(out.splitlines()[-1])
    assert got["finite"] == [True] * 4
    for new in (got["linen_new"], got["nnx_new"]):
        # Beyond gbn_jax and what JAX and Flax load, only the standard library: none of
        # EXTRAS_ONLY (optax too: flax.nnx loads it, flax.linen does not).
        assert [m for m in new if m not in (*sys.stdlib_module_names, "gbn_jax")] == []
    assert not set(got["loaded"]) & (set(EXTRAS_ONLY) - {"optax"})
    # The layers above the layer and the models stay unloaded.
    assert "gbn_jax.models" in got["ours"]
    assert [m for m in got["ours"] if m.startswith(("gbn_jax.trainer", "gbn_jax.research"))] == []


def test_public_names_are_listed_and_resolve():
    assert set(gbn_jax.__all__) <= set(dir(gbn_jax))
    assert {"linen", "nnx", "models"} <= set(dir(gbn_jax))
    for name in gbn_jax.__all__:
        assert getattr(gbn_jax, name).__name__ == name
    from gbn_jax import ghost_norm, ghostify, linen, models, nnx

    assert callable(ghostify)  # the function, not the module of the same name
    assert gbn_jax.GhostBatchNorm is linen.GhostBatchNorm is ghost_norm.GhostBatchNorm
    assert nnx.GhostBatchNorm is not linen.GhostBatchNorm
    assert callable(models.get_model)


def test_installed_version_is_the_package_version():
    assert importlib.metadata.version("gbn_jax") == gbn_jax.__version__
