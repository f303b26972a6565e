"""The one place where the model zoo chooses its normalization layer.

Every model asks :func:`make_norm` for its normalization layer, so one configuration
value switches a whole network between ordinary batch normalization and Ghost Batch
Normalization, which is the "+GBN" column of the paper's tables.

References:
  Hoffer, Hubara & Soudry (2017), section 4 (Ghost Batch Normalization, Algorithm 1).
"""

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gbn_jax.ghost_norm import GhostBatchNorm, GhostOptions, Layout, RunningUpdate, check_momentum

NORMS = ("batch", "ghost")
# Initial scale (gamma) of every normalization layer. "ones" is Flax's and PyTorch's
# (>= 1.0) default; "uniform" draws U[0, 1) as PyTorch < 1.0 did, which the authors'
# code ran with.
SCALE_INITS = {"ones": nn.initializers.ones, "uniform": nn.initializers.uniform(scale=1.0)}

# PyTorch's default epsilon (and Flax's), which the authors' models use.
BN_EPSILON = 1e-5


def make_norm(
    norm: str,
    *,
    ghost_batch_size: int | None = None,
    running_update: RunningUpdate = "sequential",
    layout: Layout = "input",
    momentum: float = 0.9,
    dtype: Any = jnp.float32,
    scale_init: str = "ones",
) -> Callable[..., nn.Module]:
    """Returns a constructor for the normalization layer a model should use.

    The result is a ``functools.partial`` of ``flax.linen.BatchNorm`` (``norm="batch"``)
    or of :class:`gbn_jax.ghost_norm.GhostBatchNorm` (``norm="ghost"``) with everything
    but ``use_running_average`` (and optionally ``name`` / ``scale_init``) bound.
    Parameters are float32; statistics are reduced and kept in float32 whatever the
    compute ``dtype``.

    Args:
      norm: "batch" for ordinary batch normalization over the whole (global) batch, or
        "ghost" for Ghost Batch Normalization over contiguous groups of
        ``ghost_batch_size`` examples.
      ghost_batch_size: examples per ghost batch, |B_S| in the paper (128 in most of
        its runs). Required with ``norm="ghost"``; ignored with ``norm="batch"`` so
        that one config can carry it for both the "+LR" and "+GBN" variants.
      running_update: how ghost batches update the running statistics: "sequential"
        (one exponential-moving-average step per ghost batch, in order, as in
        Algorithm 1) or "mean" (one step with the averaged ghost statistics).
        Ignored with ``norm="batch"``.
      layout: where the ghost batch norm's elementwise passes run, "input" or
        "ghost_batches" (see :class:`gbn_jax.ghost_norm.GhostOptions`). Ignored with
        ``norm="batch"``.
      momentum: Flax's running-average momentum (new = m * old + (1 - m) * stat);
        0.9 equals PyTorch's default momentum of 0.1 used by the authors' code.
      dtype: compute dtype of the layer's output (e.g. ``jnp.bfloat16``).
      scale_init: the initial scale of every layer: "ones" or "uniform" (U[0, 1), the
        authors' PyTorch < 1.0). A model may still pass ``scale_init=`` to one layer
        (e.g. zero-initialized residual branches), which overrides this.

    Returns:
      A callable that builds the normalization module, e.g.
      ``make_norm("ghost", ghost_batch_size=128)(use_running_average=not train)``.

    Raises:
      ValueError: for an unknown ``norm``, ``running_update``, ``layout`` or ``scale_init``, for
        ``norm="ghost"`` without a positive integer ``ghost_batch_size``, or for a
        momentum outside [0, 1].
    """
    if norm not in NORMS:
        raise ValueError(f"Unknown normalization {norm=}; use one of {NORMS}.")
    if scale_init not in SCALE_INITS:
        raise ValueError(f"Unknown {scale_init=}; use one of {sorted(SCALE_INITS)}.")
    check_momentum(momentum)
    common = dict(
        momentum=momentum,
        epsilon=BN_EPSILON,
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_init=SCALE_INITS[scale_init],
    )
    if norm == "batch":
        return functools.partial(nn.BatchNorm, **common)
    if ghost_batch_size is None:
        raise ValueError(
            "norm='ghost' needs ghost_batch_size=None replaced by the small-batch size "
            "|B_S|, e.g. get_model(..., norm='ghost', ghost_batch_size=128)."
        )
    GhostOptions(ghost_batch_size, running_update, layout=layout)
    return functools.partial(
        GhostBatchNorm,
        ghost_batch_size=int(ghost_batch_size),
        running_update=running_update,
        layout=layout,
        **common,
    )


@contextlib.contextmanager
def example_mask(mask: jax.Array | None) -> Iterator[None]:
    """Leaves masked examples out of the statistics of every normalization layer.

    Inside the context, each call of a ``flax.linen.BatchNorm`` or ``GhostBatchNorm``
    (of any model, without changing its code) receives ``mask`` for the leading axis of
    its input, so padded rows of a batch (e.g. the partial last batch of an epoch,
    padded to the global batch) change neither the batch or ghost-batch statistics nor
    the running averages. ``None`` changes nothing.

    Args:
      mask: boolean (batch,), False on the rows to leave out, or None.

    Yields:
      Nothing; apply the model inside the ``with`` block.
    """
    if mask is None:
        yield
        return

    def add_mask(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(
            context.module, nn.BatchNorm | GhostBatchNorm
        ):
            rank = jnp.ndim(args[0])
            kwargs = {**kwargs, "mask": mask.reshape(mask.shape + (1,) * (rank - 1))}
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(add_mask):
        yield
