"""Wide ResNet for CIFAR (Zagoruyko & Komodakis 2016), WRN-16-4 by default.

References:
  Hoffer, Hubara & Soudry (2017), section 5, table 1 (WResNet16-4 on CIFAR-100);
  Zagoruyko & Komodakis (2016), "Wide residual networks", section 2 and table 1.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gbn_jax.models.base import ZooModel, conv, conv_input


class WideBlock(nn.Module):
    """Pre-activation wide block: norm-ReLU-conv3x3 -[dropout]- norm-ReLU-conv3x3, add.

    Where the shape changes, the shortcut is a 1x1 convolution of the pre-activated
    input (Zagoruyko's layout), with no normalization of its own.

    Attributes:
      features: output channels.
      strides: stride of the first convolution.
      dropout_rate: dropout between the two convolutions, training only.
      norm: normalization constructor of the parent model.
      dtype: compute dtype.
    """

    features: int
    strides: int
    dropout_rate: float
    norm: Callable[..., nn.Module]
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Returns the block output (N, H / strides, W / strides, features)."""
        pre = conv_input(nn.relu(self.norm(name="norm1")(x)))
        y = conv(self.features, 3, strides=self.strides, dtype=self.dtype, name="conv1")(pre)
        y = nn.relu(self.norm(name="norm2")(y))
        y = conv_input(nn.Dropout(self.dropout_rate, deterministic=not train)(y))
        y = conv(self.features, 3, dtype=self.dtype, name="conv2")(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = conv(
                self.features,
                1,
                strides=self.strides,
                padding="VALID",
                dtype=self.dtype,
                name="proj",
            )(pre)
        return conv_input(y + x)


class WideResNet(ZooModel):
    """WRN-depth-k: conv3x3-16, three stages of (depth - 4) / 6 wide blocks, norm, pool.

    Stage widths are 16k, 32k and 64k; WRN-16-4 has 2,772,020 parameters for 100
    classes (the published "2.7M"). This is Zagoruyko's pre-activation network; the
    authors' own code instead widened their post-activation CIFAR ResNet
    (also its first convolution), which has more parameters.

    Attributes:
      depth: total depth, 6n + 4 (16, 22, 28, 40).
      widen_factor: k (4).
      dropout_rate: dropout inside each block, training only (0: off, as in the
        paper's runs; Zagoruyko suggests 0.3).
    """

    depth: int = 16
    widen_factor: int = 4
    dropout_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.depth < 10 or (self.depth - 4) % 6:
            raise ValueError(
                f"WideResNet needs depth = 6n + 4 with n >= 1, got {self.depth=}; "
                "use e.g. 16, 22, 28 or 40."
            )
        if self.widen_factor < 1:
            raise ValueError(f"{self.widen_factor=} must be a positive int, e.g. 4.")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Returns float32 logits (N, num_classes) for images (N, H, W, C)."""
        norm = self.norm_layer(train)
        x = self.to_compute_dtype(x)
        x = conv(16, 3, dtype=self.dtype, name="stem_conv")(x)
        blocks_per_stage = (self.depth - 4) // 6
        for stage in range(3):
            for block in range(blocks_per_stage):
                x = WideBlock(
                    features=16 * self.widen_factor * 2**stage,
                    strides=2 if stage > 0 and block == 0 else 1,
                    dropout_rate=self.dropout_rate,
                    norm=norm,
                    dtype=self.dtype,
                    name=f"stage{stage + 1}_block{block + 1}",
                )(x, train=train)
        x = nn.relu(norm(name="final_norm")(x))
        x = jnp.mean(x, axis=(1, 2))
        return self.logits(x)
