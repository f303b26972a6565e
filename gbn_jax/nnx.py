"""Ghost Batch Normalization for Flax NNX, sharing its implementation with the linen module.

References:
  Hoffer, Hubara & Soudry, "Train longer, generalize better", NeurIPS 2017, Section 4,
  Algorithm 1 (Ghost Batch Normalization).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes
from flax.typing import Array, Dtype, Initializer, PromoteDtypeFn

from gbn_jax.ghost_norm import (
    FIELD_DOCS,
    GhostOptions,
    Layout,
    Remainder,
    RunningUpdate,
    check_momentum,
    field_docs,
    ghost_batch_norm,
)


class GhostBatchNorm(nnx.Module):
    """Ghost Batch Normalization following ``flax.nnx.BatchNorm`` conventions.

    Every argument, the state (``scale``, ``bias`` params; ``mean``, ``var`` batch
    statistics) and ``.train()`` / ``.eval()`` switching of ``nnx.BatchNorm``, plus
    ``ghost_batch_size``, ``running_update``, ``remainder``, ``layout`` and linen's
    ``force_float32_reductions``; the computation is
    :func:`gbn_jax.ghost_norm.ghost_batch_norm`, shared with the linen module. As in
    ``nnx.BatchNorm``, ``promote_dtype`` first casts the input, the statistics and the
    parameters to a common dtype (``dtype`` if given); statistics are then reduced in at
    least float32. ``promote_dtype=lambda args, **kw: args`` keeps
    linen's dtype rules instead.

    Example:

      >>> import jax
      >>> from flax import nnx
      >>> from gbn_jax.nnx import GhostBatchNorm
      >>> layer = GhostBatchNorm(3, ghost_batch_size=4, momentum=0.9, rngs=nnx.Rngs(0))
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> y = layer(x)  # training mode: two ghost batches, running stats updated
      >>> layer.eval()
      >>> y_eval = layer(x[:3])  # inference: running statistics, any batch size
      >>> y_eval.shape
      (3, 3)

    Args:
      num_features: size of the feature axis.
      {fields}
      promote_dtype: casts ``(x, mean, var, scale, bias)`` to a common dtype, called
        with ``dtype=dtype``; as in ``nnx.BatchNorm``.
      rngs: random number generators for the parameter initializers.
      bias_metadata: metadata for the bias Param.
      scale_metadata: metadata for the scale Param.
    """

    def __init__(
        self,
        num_features: int,
        *,
        ghost_batch_size: int | None = GhostOptions.ghost_batch_size,
        running_update: RunningUpdate = GhostOptions.running_update,
        remainder: Remainder = GhostOptions.remainder,
        layout: Layout = GhostOptions.layout,
        use_running_average: bool | None = False,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = nnx.initializers.zeros,
        scale_init: Initializer = nnx.initializers.ones,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        force_float32_reductions: bool = True,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
    ):
        GhostOptions(ghost_batch_size, running_update, remainder, layout)
        check_momentum(momentum)
        feature_shape = (num_features,)
        stat_dtype = jnp.float32 if force_float32_reductions else param_dtype
        self.mean = nnx.BatchStat(jnp.zeros(feature_shape, stat_dtype))
        self.var = nnx.BatchStat(jnp.ones(feature_shape, stat_dtype))
        self.scale: nnx.Param | None
        if use_scale:
            self.scale = nnx.Param(
                scale_init(rngs.params(), feature_shape, param_dtype), **scale_metadata
            )
        else:
            self.scale = nnx.data(None)
        self.bias: nnx.Param | None
        if use_bias:
            self.bias = nnx.Param(
                bias_init(rngs.params(), feature_shape, param_dtype), **bias_metadata
            )
        else:
            self.bias = nnx.data(None)
        self.num_features = num_features
        self.ghost_batch_size = ghost_batch_size
        self.running_update = running_update
        self.remainder = remainder
        self.layout = layout
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.force_float32_reductions = force_float32_reductions
        self.promote_dtype = promote_dtype

    def __call__(
        self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None
    ) -> Array:
        """Normalizes ``x`` per ghost batch (training) or with the running statistics.

        Args:
          x: input, batch on the leading axis.
          use_running_average: overrides the attribute of the same name.
          mask: boolean, broadcastable to x; False entries are left out of statistics.

        Returns:
          The normalized input, same shape as x.
        """
        use_running_average = (
            self.use_running_average if use_running_average is None else use_running_average
        )
        if use_running_average is None:
            raise ValueError(
                "GhostBatchNorm got use_running_average=None: pass it to the constructor "
                "or the call, or switch modes with .train() / .eval()."
            )
        x, mean, var, scale, bias = self.promote_dtype(
            (
                x,
                self.mean[...],
                self.var[...],
                None if self.scale is None else self.scale[...],
                None if self.bias is None else self.bias[...],
            ),
            dtype=self.dtype,
        )
        y, new_mean, new_var = ghost_batch_norm(
            x,
            scale,
            bias,
            mean,
            var,
            use_running_average=use_running_average,
            ghost_batch_size=self.ghost_batch_size,
            running_update=self.running_update,
            remainder=self.remainder,
            layout=self.layout,
            axis=self.axis,
            momentum=self.momentum,
            epsilon=self.epsilon,
            dtype=self.dtype,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            use_fast_variance=self.use_fast_variance,
            force_float32_reductions=self.force_float32_reductions,
            mask=mask,
        )
        if not use_running_average:
            # Running statistics are state, not a function of the loss: no gradient.
            self.mean[...] = jax.lax.stop_gradient(new_mean)
            self.var[...] = jax.lax.stop_gradient(new_var)
        return y

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by ``nnx.view`` to switch between training and inference.

        Args:
          use_running_average: if not None, the new value of the attribute.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average


GhostBatchNorm.__doc__ = GhostBatchNorm.__doc__.replace(
    "      {fields}",
    field_docs(
        name for name in inspect.signature(GhostBatchNorm.__init__).parameters if name in FIELD_DOCS
    ),
)
