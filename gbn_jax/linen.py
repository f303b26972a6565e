"""Ghost Batch Normalization for Flax linen: ``GhostBatchNorm``, a drop-in for
``flax.linen.BatchNorm``.

Import it under its own name next to Flax's, as NNX users do with :mod:`gbn_jax.nnx`:

  >>> import flax.linen as nn
  >>> import jax
  >>> from gbn_jax import linen as gnn
  >>> class Net(nn.Module):
  ...     @nn.compact
  ...     def __call__(self, x, train: bool):
  ...         x = nn.Dense(4)(x)
  ...         return gnn.GhostBatchNorm(use_running_average=not train, ghost_batch_size=4)(x)
  >>> x = jax.random.normal(jax.random.key(0), (8, 3))
  >>> variables = Net().init(jax.random.key(1), x, train=False)
  >>> y, updates = Net().apply(variables, x, train=True, mutable=["batch_stats"])
  >>> y.shape
  (8, 4)

For linen models written with ``nn.BatchNorm``, see :func:`gbn_jax.ghostify` and
:func:`gbn_jax.ghost_batch_norm_scope`.

References:
  Hoffer, Hubara & Soudry, "Train longer, generalize better", NeurIPS 2017, Section 4,
  Algorithm 1 (Ghost Batch Normalization).
"""

from gbn_jax.ghost_norm import GhostBatchNorm

__all__ = ["GhostBatchNorm"]
