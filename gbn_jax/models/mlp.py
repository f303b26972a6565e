"""F1: the fully connected MNIST network of Keskar et al. used in the paper.

References:
  Hoffer, Hubara & Soudry (2017), section 5, table 1 (F1 on MNIST);
  Keskar et al. (2017), table 1.
"""

import flax.linen as nn
import jax

from gbn_jax.ghost_norm import Layout
from gbn_jax.models.base import ZooModel, dense


class F1(ZooModel):
    """Flatten, then ``num_hidden`` x [Dense ``width``, norm, ReLU], then the classifier.

    As in the authors' code the hidden dense layers keep their bias although a
    normalization follows (it cancels; kept so parameter counts match the reference:
    1,462,794 for 784 inputs and 10 classes).

    Its ghost batch norm layers run on the split layout (``ghost_layout="ghost_batches"``,
    see :class:`gbn_jax.ghost_norm.GhostOptions`): the rounding the F1 runs in
    experiments/results were trained with, so that they re-run bit for bit.
    ``ghost_layout="input"`` gives the same results up to float rounding, in less time.

    Attributes:
      width: hidden units per layer (512).
      num_hidden: number of hidden layers (5).
      ghost_layout: as in :class:`ZooModel`, with the split layout as the default.
    """

    width: int = 512
    num_hidden: int = 5
    ghost_layout: Layout = "ghost_batches"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Returns float32 logits (N, num_classes) for inputs (N, ...) of any shape."""
        x = self.to_compute_dtype(x).reshape(x.shape[0], -1)
        for i in range(self.num_hidden):
            x = dense(self.width, dtype=self.dtype, name=f"dense{i + 1}")(x)
            x = self.norm_layer(train)(name=f"norm{i + 1}")(x)
            x = nn.relu(x)
        return self.logits(x)
