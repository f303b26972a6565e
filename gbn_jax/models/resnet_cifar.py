"""ResNet for CIFAR (He et al. 2016, section 4.2): depth 6n + 2, ResNet-44 by default.

References:
  Hoffer, Hubara & Soudry (2017), section 5, table 1 (ResNet44 on CIFAR-10);
  He et al. (2016), "Deep residual learning for image recognition", section 4.2.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gbn_jax.models.base import ZooModel, conv, conv_input, projection_shortcut

SHORTCUTS = ("A", "B")


class BasicBlock(nn.Module):
    """Post-activation basic block: conv3x3-norm-ReLU-conv3x3-norm, add, ReLU.

    Attributes:
      features: output channels.
      strides: stride of the first convolution (2 at a stage's first block).
      shortcut: "A" (identity; subsample and zero-pad channels: no parameters) or
        "B" (1x1 convolution and norm where the shape changes).
      norm: normalization constructor of the parent model (mode and dtype bound).
      dtype: compute dtype.
    """

    features: int
    strides: int
    shortcut: str
    norm: Callable[..., nn.Module]
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns the block output (N, H / strides, W / strides, features)."""
        y = conv(self.features, 3, strides=self.strides, dtype=self.dtype, name="conv1")(x)
        y = conv_input(nn.relu(self.norm(name="norm1")(y)))
        y = conv(self.features, 3, dtype=self.dtype, name="conv2")(y)
        y = self.norm(name="norm2")(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            if self.shortcut == "A":
                x = x[:, :: self.strides, :: self.strides, :]
                x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, self.features - x.shape[-1])))
            else:
                x = projection_shortcut(
                    x, self.features, strides=self.strides, norm=self.norm, dtype=self.dtype
                )
        return conv_input(nn.relu(y + x))


class ResNetCifar(ZooModel):
    """CIFAR ResNet: conv3x3-16, three stages of n basic blocks (16/32/64), pool, dense.

    ``depth = 6n + 2``; 44 gives 7 blocks per stage. The default shortcut is option B
    (1x1 projection with norm at the two stage transitions), as in the authors' code
    that produced the paper's ResNet44 numbers: 661,338 parameters for 10 classes.
    Option A (parameter-free identity with zero-padded channels, He et al.'s CIFAR
    choice) gives 658,586, the published "0.66M".

    Attributes:
      depth: 6n + 2 layers (20, 32, 44, 56, 110, ...).
      width: channels of the first stage (16); later stages double it.
      shortcut: "B" (projection, default) or "A" (zero-padding identity).
    """

    depth: int = 44
    width: int = 16
    shortcut: str = "B"

    def __post_init__(self) -> None:
        if self.depth < 8 or (self.depth - 2) % 6:
            raise ValueError(
                f"ResNet for CIFAR needs depth = 6n + 2 with n >= 1, got {self.depth=}; "
                "use e.g. 20, 32, 44, 56 or 110."
            )
        if self.shortcut not in SHORTCUTS:
            raise ValueError(f"Unknown {self.shortcut=}; use one of {SHORTCUTS}.")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Returns float32 logits (N, num_classes) for images (N, H, W, C)."""
        norm = self.norm_layer(train)
        x = self.to_compute_dtype(x)
        x = conv(self.width, 3, dtype=self.dtype, name="stem_conv")(x)
        x = conv_input(nn.relu(norm(name="stem_norm")(x)))
        blocks_per_stage = (self.depth - 2) // 6
        for stage in range(3):
            for block in range(blocks_per_stage):
                x = BasicBlock(
                    features=self.width * 2**stage,
                    strides=2 if stage > 0 and block == 0 else 1,
                    shortcut=self.shortcut,
                    norm=norm,
                    dtype=self.dtype,
                    name=f"stage{stage + 1}_block{block + 1}",
                )(x)
        x = jnp.mean(x, axis=(1, 2))
        return self.logits(x)
