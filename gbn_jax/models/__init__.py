"""The paper's models, by name, with batch or Ghost Batch Normalization.

``get_model("resnet44", num_classes=10, norm="ghost", ghost_batch_size=128,
dtype="bfloat16")`` builds any network of the paper's table 1 (and ResNet-50) from
config values; call it as ``model.apply(variables, x, train=...)`` (with
``mutable=["batch_stats"]`` when training).

References:
  Hoffer, Hubara & Soudry (2017), section 5, table 1.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from gbn_jax.ghost_norm import GhostOptions
from gbn_jax.models.alexnet import AlexNet
from gbn_jax.models.base import ZooModel
from gbn_jax.models.keskar import KeskarC
from gbn_jax.models.mlp import F1
from gbn_jax.models.norm import make_norm
from gbn_jax.models.resnet_cifar import ResNetCifar
from gbn_jax.models.resnet_imagenet import ResNetImageNet
from gbn_jax.models.vgg import VGG
from gbn_jax.models.wide_resnet import WideResNet

# Aliases fix an architecture field; get_model refuses a conflicting override.
MODELS: dict[str, Callable[..., ZooModel]] = {
    "f1": F1,
    "c1": KeskarC,
    "c3": KeskarC,
    "resnet_cifar": ResNetCifar,
    "resnet44": functools.partial(ResNetCifar, depth=44),
    "wide_resnet": WideResNet,
    "wrn16_4": functools.partial(WideResNet, depth=16, widen_factor=4),
    "vgg": VGG,
    "vgg16": VGG,
    "alexnet": AlexNet,
    "resnet50": functools.partial(ResNetImageNet, depth=50),
}

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def _compute_dtype(dtype: Any) -> jnp.dtype:
    """Accepts a dtype or its name; only floating compute dtypes make sense here."""
    try:
        resolved = jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"Unknown compute {dtype=}; use one of {COMPUTE_DTYPES}.") from e
    if resolved.name not in COMPUTE_DTYPES:
        raise ValueError(f"Unsupported compute {dtype=}; use one of {COMPUTE_DTYPES}.")
    return resolved


def get_model(
    name: str,
    *,
    num_classes: int,
    norm: str = "batch",
    ghost_batch_size: int | None = None,
    running_update: str = "sequential",
    bn_momentum: float = 0.9,
    dtype: Any = jnp.float32,
    bn_scale_init: str = "ones",
    **kwargs: Any,
) -> nn.Module:
    """Builds a model of the zoo by name.

    Args:
      name: one of ``MODELS``: "f1", "c1", "c3", "resnet_cifar" (alias "resnet44"),
        "wide_resnet" ("wrn16_4"), "vgg" ("vgg16"), "alexnet", "resnet50".
      num_classes: size of the logits (10 for C1, 100 for C3, ...).
      norm: "batch" (flax BatchNorm over the whole batch) or "ghost"
        (GhostBatchNorm over contiguous groups of ``ghost_batch_size`` examples).
      ghost_batch_size: |B_S|, required with norm="ghost", ignored with "batch".
      running_update: "sequential" or "mean" running-statistics update of ghost norm.
      bn_momentum: Flax running-average momentum (0.9 == PyTorch's 0.1).
      dtype: compute dtype, a dtype or its name ("float32", "bfloat16", "float16").
        Parameters and batch statistics stay float32; logits are float32.
      bn_scale_init: initial scale of every normalization layer: "ones" or
        "uniform" (U[0, 1), PyTorch < 1.0 as in the authors' code).
      **kwargs: architecture fields of the chosen model, e.g. ``depth=56`` for
        "resnet_cifar", ``widen_factor=8, dropout_rate=0.3`` for "wide_resnet",
        ``classifier_width=4096`` for "vgg", ``zero_init_residual=True`` for
        "resnet50".

    Returns:
      An unbound ``flax.linen`` module, called with ``train=``.

    Raises:
      ValueError: for an unknown name, normalization, dtype or architecture field,
        or a kwarg that contradicts an alias (e.g. "resnet44" with depth=56).
    """
    if name not in MODELS:
        raise ValueError(f"Unknown model {name=}; known models: {sorted(MODELS)}.")
    dtype = _compute_dtype(dtype)
    # Validates the normalization choice now rather than at the first forward pass.
    make_norm(
        norm,
        ghost_batch_size=ghost_batch_size,
        running_update=running_update,
        layout=kwargs.get("ghost_layout", GhostOptions.layout),
        momentum=bn_momentum,
        dtype=dtype,
        scale_init=bn_scale_init,
    )
    constructor = MODELS[name]
    fixed = getattr(constructor, "keywords", {})
    for key, value in kwargs.items():
        if key in fixed and fixed[key] != value:
            raise ValueError(
                f"Model {name=} fixes {key}={fixed[key]}, got {key}={value}; use the "
                "generic name (e.g. 'resnet_cifar' or 'wide_resnet') to change it."
            )
    model_class = getattr(constructor, "func", constructor)
    fields = {f.name for f in dataclasses.fields(model_class)} - {"parent", "name"}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(
            f"Model {name=} has no field(s) {unknown}; its fields are {sorted(fields)}."
        )
    return constructor(
        num_classes=num_classes,
        norm=norm,
        ghost_batch_size=ghost_batch_size,
        running_update=running_update,
        bn_momentum=bn_momentum,
        dtype=dtype,
        bn_scale_init=bn_scale_init,
        **kwargs,
    )


__all__ = [
    "F1",
    "MODELS",
    "VGG",
    "AlexNet",
    "KeskarC",
    "ResNetCifar",
    "ResNetImageNet",
    "WideResNet",
    "ZooModel",
    "get_model",
    "make_norm",
]
