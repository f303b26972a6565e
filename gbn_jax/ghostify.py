"""Ghost Batch Normalization for models you did not write: batch-norm surgery.

A model written with ``flax.linen.BatchNorm`` or ``flax.nnx.BatchNorm`` gets ghost
batch norm without editing its code:

* linen: inside :func:`ghost_batch_norm_scope`, every ``nn.BatchNorm`` call in training
  mode normalizes per ghost batch. Nothing about the model changes: the same modules,
  names and variables (``params/{scale,bias}``, ``batch_stats/{mean,var}``), so its
  checkpoints load as they are. Built on ``nn.intercept_methods``.
* NNX: :func:`ghostify_nnx` returns the module graph with every ``nnx.BatchNorm``
  replaced by :class:`gbn_jax.nnx.GhostBatchNorm` holding the same ``Variable``
  objects, so parameters, statistics and any state built from them carry over.

Inference (running statistics) is untouched in both: ghost batches only exist in
training.

References:
  Hoffer, Hubara & Soudry, "Train longer, generalize better", NeurIPS 2017, Section 4,
  Algorithm 1 (Ghost Batch Normalization).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import flax.linen as nn
from flax import nnx

from gbn_jax.ghost_norm import (
    GhostOptions,
    Layout,
    Remainder,
    RunningUpdate,
    field_docs,
    linen_call,
)
from gbn_jax.nnx import GhostBatchNorm

F = TypeVar("F", bound=Callable[..., Any])
M = TypeVar("M")

# The function behind nn.BatchNorm.__call__ (linen wraps methods): what we replace.
_BATCH_NORM_CALL = getattr(nn.BatchNorm.__call__, "__wrapped__", nn.BatchNorm.__call__)


@contextlib.contextmanager
def ghost_batch_norm_scope(
    ghost_batch_size: int | None,
    *,
    running_update: RunningUpdate = GhostOptions.running_update,
    remainder: Remainder = GhostOptions.remainder,
    layout: Layout = GhostOptions.layout,
) -> Iterator[None]:
    """Makes every ``nn.BatchNorm`` called inside it normalize per ghost batch (linen).

    Training-mode calls of ``nn.BatchNorm`` (and of subclasses that keep its
    ``__call__``) run :class:`gbn_jax.GhostBatchNorm`'s computation on the same
    module, with its own fields (axis, momentum, epsilon, dtypes, axis_name, ...) and
    its own variables. Calls with ``use_running_average=True`` run ``nn.BatchNorm``
    itself.

    The scope acts when a model is traced, so under ``jax.jit`` enter it inside the
    jitted function (a jitted function traced outside the scope keeps its cached
    ``nn.BatchNorm`` trace); :func:`ghostify` wraps a function that way.

    Example:

      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> from gbn_jax.ghostify import ghost_batch_norm_scope
      >>> model = nn.Sequential([nn.Dense(4), nn.BatchNorm(use_running_average=False)])
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> variables = model.init(jax.random.key(1), x)
      >>> with ghost_batch_norm_scope(ghost_batch_size=4):
      ...     y, updates = model.apply(variables, x, mutable=["batch_stats"])
      >>> bool(jnp.allclose(y.reshape(2, 4, 4).mean(axis=1), 0.0, atol=1e-5))
      True

    Args:
      {fields}

    Yields:
      Nothing; the interception lasts until the block exits.

    Raises:
      ValueError: for an invalid field (see :class:`gbn_jax.ghost_norm.GhostOptions`).
    """
    options = GhostOptions(ghost_batch_size, running_update, remainder, layout)

    def interceptor(next_fun, args, kwargs, context):
        method = getattr(context.orig_method, "func", None)
        if method is not _BATCH_NORM_CALL or not isinstance(context.module, nn.BatchNorm):
            return next_fun(*args, **kwargs)
        module = context.module
        x, *rest = args
        use_running_average = rest[0] if rest else kwargs.get("use_running_average")
        if nn.merge_param("use_running_average", module.use_running_average, use_running_average):
            return next_fun(*args, **kwargs)
        return linen_call(
            module,
            x,
            use_running_average,
            mask=kwargs.get("mask"),
            options=options,
        )

    with nn.intercept_methods(interceptor):
        yield


def ghostify(
    fn: F,
    ghost_batch_size: int | None,
    *,
    running_update: RunningUpdate = GhostOptions.running_update,
    remainder: Remainder = GhostOptions.remainder,
    layout: Layout = GhostOptions.layout,
) -> F:
    """Wraps ``fn`` (``model.apply``, a loss or a train step) to run in the scope.

    ``jax.jit(ghostify(model.apply, 128))`` traces the model inside
    :func:`ghost_batch_norm_scope`, so the compiled function uses ghost batch norm
    whenever and wherever it is called.

    Args:
      fn: any function that applies linen models.
      {fields}

    Returns:
      ``fn`` with every ``nn.BatchNorm`` it calls normalizing per ghost batch.

    Raises:
      ValueError: for an invalid field (see :class:`gbn_jax.ghost_norm.GhostOptions`).
    """
    GhostOptions(ghost_batch_size, running_update, remainder, layout)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with ghost_batch_norm_scope(
            ghost_batch_size, running_update=running_update, remainder=remainder, layout=layout
        ):
            return fn(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


def ghostify_nnx(
    module: M,
    ghost_batch_size: int | None,
    *,
    running_update: RunningUpdate = GhostOptions.running_update,
    remainder: Remainder = GhostOptions.remainder,
    layout: Layout = GhostOptions.layout,
) -> M:
    """Returns ``module`` with every ``nnx.BatchNorm`` swapped for a ``GhostBatchNorm``.

    Each replacement has the batch norm's settings and holds its very ``Variable``
    objects (``scale``, ``bias``, ``mean``, ``var``), so state, shardings and metadata
    carry over and the state tree keeps its paths (checkpoints and optimizer states
    still fit). Shared references stay shared. Like ``nnx.recursive_map``, it returns a
    new graph and leaves ``module`` as it was; the two share their Variables. Subclasses
    of ``nnx.BatchNorm`` that override ``__call__`` are left alone.

    Example:

      >>> from flax import nnx
      >>> from gbn_jax.ghostify import ghostify_nnx
      >>> rngs = nnx.Rngs(0)
      >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=rngs), nnx.BatchNorm(4, rngs=rngs))
      >>> model = ghostify_nnx(model, ghost_batch_size=32)
      >>> type(model.layers[1]).__name__, model.layers[1].ghost_batch_size
      ('GhostBatchNorm', 32)

    Args:
      module: an NNX module graph (or any graph node holding modules).
      {fields}

    Returns:
      The graph with ghost batch norms in place of the batch norms.

    Raises:
      ValueError: for an invalid field (see :class:`gbn_jax.ghost_norm.GhostOptions`).
    """
    options = GhostOptions(ghost_batch_size, running_update, remainder, layout)

    def swap(path, node):
        if isinstance(node, nnx.BatchNorm) and type(node).__call__ is nnx.BatchNorm.__call__:
            return _ghost_from(node, options)
        return node

    return nnx.recursive_map(swap, module)


def _ghost_from(bn: nnx.BatchNorm, options: GhostOptions) -> GhostBatchNorm:
    """A GhostBatchNorm with ``bn``'s settings, holding ``bn``'s Variables."""
    ghost = GhostBatchNorm(
        bn.num_features,
        **dataclasses.asdict(options),
        use_running_average=bn.use_running_average,
        axis=bn.axis,
        momentum=bn.momentum,
        epsilon=bn.epsilon,
        dtype=bn.dtype,
        param_dtype=bn.param_dtype,
        use_bias=bn.use_bias,
        use_scale=bn.use_scale,
        axis_name=bn.axis_name,
        axis_index_groups=bn.axis_index_groups,
        use_fast_variance=bn.use_fast_variance,
        promote_dtype=bn.promote_dtype,
        rngs=nnx.Rngs(0),  # placeholders, replaced by bn's Variables below
    )
    ghost.mean, ghost.var = bn.mean, bn.var
    if bn.scale is not None:
        ghost.scale = bn.scale
    if bn.bias is not None:
        ghost.bias = bn.bias
    return ghost


_GHOST_FIELDS = field_docs(dataclasses.asdict(GhostOptions()))
for _function in (ghost_batch_norm_scope, ghostify, ghostify_nnx):
    _function.__doc__ = _function.__doc__.replace("      {fields}", _GHOST_FIELDS)
