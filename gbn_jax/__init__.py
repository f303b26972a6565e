"""gbn_jax: Ghost Batch Normalization and large-batch training regimes in JAX/Flax.

The layer needs only jax, flax and numpy (``pip install gbn-jax``); the trainer and the
research tools come with the ``train`` and ``research`` extras.

  * ``gbn_jax.GhostBatchNorm``: the linen module (also ``gbn_jax.linen.GhostBatchNorm``);
  * ``gbn_jax.nnx.GhostBatchNorm``: the NNX module;
  * ``ghostify``, ``ghost_batch_norm_scope`` (linen) and ``ghostify_nnx``: ghost batch
    norm for models written with plain ``BatchNorm``;
  * ``gbn_jax.models``: the paper's networks.

References:
  Hoffer, Hubara & Soudry, "Train longer, generalize better: closing the generalization
  gap in large batch training of neural networks", NeurIPS 2017.
"""

import importlib as _importlib
import sys as _sys
import types as _types
import typing as _typing

from gbn_jax.ghost_norm import GhostBatchNorm, ghost_batch_norm

__version__ = "0.1.0"

# Public names of gbn_jax.ghostify and the module each lives in. They load on first use,
# so that the linen layer does not load flax.nnx.
_LAZY = {
    "ghost_batch_norm_scope": "gbn_jax.ghostify",
    "ghostify": "gbn_jax.ghostify",
    "ghostify_nnx": "gbn_jax.ghostify",
}
# Submodules reachable as attributes (and shown by dir) without their own import; not in
# __all__, so that `from gbn_jax import *` does not shadow flax's `nnx` or `linen`.
_SUBMODULES = ("linen", "models", "nnx")

__all__ = [
    "GhostBatchNorm",
    "ghost_batch_norm",
    "ghost_batch_norm_scope",
    "ghostify",
    "ghostify_nnx",
]

if _typing.TYPE_CHECKING:
    from gbn_jax import linen, models, nnx  # noqa: F401
    from gbn_jax.ghostify import ghost_batch_norm_scope, ghostify, ghostify_nnx


def __getattr__(name: str) -> _typing.Any:
    if name in _LAZY:
        value = getattr(_importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_SUBMODULES})


class _Package(_types.ModuleType):
    """gbn_jax itself, whose function `ghostify` shares its name with a submodule.

    Importing a submodule sets it as an attribute of its package; here that would hide
    the function `gbn_jax.ghostify` behind the module `gbn_jax.ghostify`. The module
    stays importable by its full name (`from gbn_jax.ghostify import ghostify_nnx`).
    """

    def __setattr__(self, name: str, value: _typing.Any) -> None:
        if not (name in _LAZY and isinstance(value, _types.ModuleType)):
            super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
