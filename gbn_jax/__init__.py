"""gbn_jax: Ghost Batch Normalization and large-batch training regimes in JAX/Flax.

Hoffer, Hubara & Soudry, "Train longer, generalize better: closing the generalization
gap in large batch training of neural networks", NeurIPS 2017.
"""

from typing import TYPE_CHECKING

__all__ = ["GhostBatchNorm", "ghost_batch_norm"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from gbn_jax.ghost_norm import GhostBatchNorm, ghost_batch_norm


def __getattr__(name: str):
    # Imported on first use, so that `python -m gbn_jax.main` can restart itself
    # (gbn_jax.host_memory) before JAX and Flax are loaded.
    if name in __all__:
        from gbn_jax import ghost_norm

        return getattr(ghost_norm, name)
    raise AttributeError(f"module 'gbn_jax' has no attribute {name!r}")
