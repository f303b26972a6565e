"""What every model of the zoo shares: its configuration fields, initializers and head.

Each model is a ``flax.linen`` module called as ``model.apply(variables, x, train=...)``
(docs/design.md, "The models"). The fields below travel with every model so that one config
switches normalization ("batch" or "ghost") and compute dtype for any of them.

Initialization (stated once for the whole zoo):
  * convolutions: He normal with fan_out, std = sqrt(2 / (k_h * k_w * out_channels)),
    untruncated, as in the authors' ``init_model`` and torchvision's ResNets;
  * dense layers: PyTorch's default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), which is
    ``variance_scaling(1/3, "fan_in", "uniform")``; dense biases start at zero;
  * normalization: scale 1, bias 0.

References:
  Hoffer, Hubara & Soudry (2017), section 5 (experiments; models of table 1).
"""

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gbn_jax.ghost_norm import GhostOptions, Layout
from gbn_jax.models.norm import make_norm

conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
dense_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def same_padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """PyTorch-style symmetric padding of ``kernel_size // 2`` on both spatial axes.

    Flax's "SAME" pads asymmetrically for strided convolutions on even inputs; the
    reference networks pad symmetrically, which changes output sizes (e.g. AlexNet).

    Args:
      kernel_size: side of a square kernel.

    Returns:
      Explicit padding for ``nn.Conv`` / ``nn.max_pool``.
    """
    p = kernel_size // 2
    return ((p, p), (p, p))


def conv(
    features: int,
    kernel_size: int,
    *,
    dtype: Any,
    strides: int = 1,
    padding: Any = None,
    use_bias: bool = False,
    name: str | None = None,
) -> nn.Conv:
    """A convolution in the compute dtype with float32 parameters and He init.

    Call it inside a compact method: the module it builds belongs to that method's
    module.

    Args:
      features: output channels.
      kernel_size: side of the square kernel.
      dtype: compute dtype.
      strides: stride on both spatial axes.
      padding: ``nn.Conv`` padding; None means PyTorch's symmetric kernel_size // 2.
      use_bias: whether to add a bias (off by default: a normalization follows).
      name: submodule name.

    Returns:
      An ``nn.Conv`` module.
    """
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(strides, strides),
        padding=same_padding(kernel_size) if padding is None else padding,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=conv_kernel_init,
        name=name,
    )


_CONV_INPUT_BARRIERS = contextvars.ContextVar("conv_input_barriers", default=False)


@contextlib.contextmanager
def conv_input_barriers(enabled: bool = True) -> Iterator[None]:
    """Models traced inside place an optimization barrier at each `conv_input`.

    A barrier makes XLA compute the activation once and let every consumer read it from
    memory. Without one, XLA:CPU's fusion pass recomputes the elementwise residual
    stream of a stage (norm, add, ReLU of every earlier block) inside each
    weight-gradient transpose that reads a block input, which grows with the square of
    the depth. XLA keeps the barriers only with its ``cse_barrier_expander`` pass
    disabled, so the two are switched together: ``gbn_jax.trainer.steps.tracing(options)``.
    The switch acts when a function is traced; JAX does not trace again a function it
    has traced with the same arguments and jit settings.

    Args:
      enabled: whether `conv_input` places barriers while the context is open.
    """
    token = _CONV_INPUT_BARRIERS.set(enabled)
    try:
        yield
    finally:
        _CONV_INPUT_BARRIERS.reset(token)


def conv_input(x: jax.Array) -> jax.Array:
    """Marks an activation that convolutions read (identity, also under autodiff).

    An optimization barrier when traced inside `conv_input_barriers`, else ``x`` itself,
    which leaves XLA free to fuse the norm and ReLU into the convolution that reads
    them.

    Args:
      x: an activation about to enter a convolution (and a residual sum).

    Returns:
      ``x`` unchanged.
    """
    if _CONV_INPUT_BARRIERS.get():
        return jax.lax.optimization_barrier(x)
    return x


def dense(features: int, *, dtype: Any, use_bias: bool = True, name: str | None = None) -> nn.Dense:
    """A dense layer in the compute dtype with float32 parameters and PyTorch's init.

    Args:
      features: output features.
      dtype: compute dtype.
      use_bias: whether to add a bias.
      name: submodule name.

    Returns:
      An ``nn.Dense`` module.
    """
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=dense_kernel_init,
        name=name,
    )


def projection_shortcut(
    x: jax.Array, features: int, *, strides: int, norm: Callable[..., nn.Module], dtype: Any
) -> jax.Array:
    """ResNet shortcut "option B": a strided 1x1 convolution and a norm layer.

    Called inside a block's ``nn.compact`` method, so its layers ("proj", "proj_norm")
    belong to the block.

    Args:
      x: the block input (N, H, W, C).
      features: output channels.
      strides: spatial stride of the block.
      norm: the model's norm-layer constructor (from `make_norm`).
      dtype: compute dtype.

    Returns:
      The projected input (N, H / strides, W / strides, features).

    References:
      He et al. (2016), section 3.3, projection shortcuts.
    """
    x = conv(features, 1, strides=strides, padding="VALID", dtype=dtype, name="proj")(x)
    return norm(name="proj_norm")(x)


class ZooModel(nn.Module):
    """Fields shared by every model: class count, normalization and compute dtype.

    Subclasses add their architecture fields (all with defaults) and implement
    ``__call__(x, *, train)``.

    Attributes:
      num_classes: size of the logits.
      norm: "batch" or "ghost" (see :func:`gbn_jax.models.norm.make_norm`).
      ghost_batch_size: examples per ghost batch, |B_S|; needed with norm="ghost".
      running_update: "sequential" or "mean" running-statistics update of ghost norm.
      ghost_layout: "input" or "ghost_batches", the ghost norm's ``layout``.
      bn_momentum: Flax running-average momentum (0.9 == PyTorch's 0.1).
      dtype: compute dtype of activations; parameters stay float32 and the logits
        are returned as float32.
      bn_scale_init: initial scale of the normalization layers, "ones" or "uniform"
        (U[0, 1), PyTorch < 1.0 as in the authors' code).
    """

    num_classes: int
    norm: str = "batch"
    ghost_batch_size: int | None = None
    running_update: str = "sequential"
    ghost_layout: Layout = GhostOptions.layout
    bn_momentum: float = 0.9
    dtype: Any = jnp.float32
    bn_scale_init: str = "ones"

    def norm_layer(self, train: bool) -> Callable[..., nn.Module]:
        """Returns the normalization constructor for this call (batch stats in training).

        Args:
          train: whether the model is training (use the batch, or ghost batch,
            statistics and update the running ones) or evaluating (use the running
            statistics over the whole batch).

        Returns:
          A constructor taking optional ``name`` / ``scale_init`` keywords.

        References:
          Hoffer, Hubara & Soudry (2017), section 4, Algorithm 1.
        """
        norm = make_norm(
            self.norm,
            ghost_batch_size=self.ghost_batch_size,
            running_update=self.running_update,
            layout=self.ghost_layout,
            momentum=self.bn_momentum,
            dtype=self.dtype,
            scale_init=self.bn_scale_init,
        )
        return functools.partial(norm, use_running_average=not train)

    def to_compute_dtype(self, x: jax.Array) -> jax.Array:
        """Casts the input images to the compute dtype (bf16 halves activation memory)."""
        return jnp.asarray(x, self.dtype)

    def logits(self, x: jax.Array) -> jax.Array:
        """The classifier: a dense layer with bias, returned in float32.

        Float32 logits keep the softmax cross-entropy accurate under bf16 compute.

        Args:
          x: features (N, D).

        Returns:
          Logits (N, num_classes), float32.
        """
        x = dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
        return jnp.asarray(x, jnp.float32)
