"""gbn_jax: Ghost Batch Normalization and large-batch training regimes in JAX/Flax.

Hoffer, Hubara & Soudry, "Train longer, generalize better: closing the generalization
gap in large batch training of neural networks", NeurIPS 2017.
"""

from gbn_jax.ghost_norm import GhostBatchNorm, ghost_batch_norm

__all__ = ["GhostBatchNorm", "ghost_batch_norm"]
__version__ = "0.1.0"
