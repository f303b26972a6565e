"""C1 / C3: the shallow AlexNet-like CIFAR network of Keskar et al. used in the paper.

C1 (CIFAR-10) and C3 (CIFAR-100) are the same network; only ``num_classes`` differs.

References:
  Hoffer, Hubara & Soudry (2017), section 5, table 1 (C1, C3);
  Keskar et al. (2017), table 1.
"""

import flax.linen as nn
import jax

from gbn_jax.models.base import ZooModel, conv, dense


class KeskarC(ZooModel):
    """Two [conv 5x5, max-pool 3/2, norm, ReLU] blocks and a normalized two-layer MLP.

    Layout, following the authors' code: conv5x5-64 (padding 2, no
    bias) -> max-pool 3x3 stride 2 (no padding) -> norm -> ReLU, twice; flatten
    (64 x 7 x 7 for 32 x 32 inputs) -> Dense 384 (no bias) -> norm -> ReLU -> dropout
    -> Dense 192 (no bias) -> norm -> ReLU -> dropout -> Dense num_classes (with bias).
    Normalizing after the pool (not before) is the authors' order.

    Attributes:
      conv_features: channels of both convolutions (64).
      hidden: widths of the two hidden dense layers ((384, 192)).
      dropout_rate: dropout after each hidden dense layer, training only (0.5).
    """

    conv_features: int = 64
    hidden: tuple[int, ...] = (384, 192)
    dropout_rate: float = 0.5

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Returns float32 logits (N, num_classes) for images (N, H, W, C)."""
        x = self.to_compute_dtype(x)
        for i in range(2):
            x = conv(self.conv_features, 5, dtype=self.dtype, name=f"conv{i + 1}")(x)
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
            x = self.norm_layer(train)(name=f"conv{i + 1}_norm")(x)
            x = nn.relu(x)
        x = x.reshape(x.shape[0], -1)
        for i, width in enumerate(self.hidden):
            x = dense(width, dtype=self.dtype, use_bias=False, name=f"dense{i + 1}")(x)
            x = self.norm_layer(train)(name=f"dense{i + 1}_norm")(x)
            x = nn.relu(x)
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return self.logits(x)
