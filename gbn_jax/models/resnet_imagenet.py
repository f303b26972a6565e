"""ResNet-50 for ImageNet, bottleneck v1.5 (stride in the 3x3 convolution).

References:
  Hoffer, Hubara & Soudry (2017), section 5 (ImageNet experiments; the authors'
  ResNet-50 regime);
  He et al. (2016), "Deep residual learning for image recognition", table 1;
  Goyal et al. (2017), section 5.1 (zero-initialized last norm scale of each block).
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gbn_jax.models.base import ZooModel, conv, conv_input, projection_shortcut

STAGE_SIZES = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
DEPTHS = tuple(STAGE_SIZES)


class Bottleneck(nn.Module):
    """Bottleneck v1.5: 1x1 reduce, 3x3 (strided), 1x1 expand x4, each normalized.

    Putting the stride in the 3x3 convolution (not the first 1x1) is the "v1.5" of
    torchvision and the authors' code; the parameter count is the same as v1.

    Attributes:
      features: bottleneck width; the block outputs 4 * features channels.
      strides: stride of the 3x3 convolution and of the projection.
      zero_init_residual: start the last norm's scale at zero so that the block starts
        as the identity (Goyal et al.'s large-batch recipe).
      norm: normalization constructor of the parent model.
      dtype: compute dtype.
    """

    features: int
    strides: int
    zero_init_residual: bool
    norm: Callable[..., nn.Module]
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns the block output (N, H / strides, W / strides, 4 * features)."""
        out_features = 4 * self.features
        y = conv(self.features, 1, padding="VALID", dtype=self.dtype, name="conv1")(x)
        y = conv_input(nn.relu(self.norm(name="norm1")(y)))
        y = conv(self.features, 3, strides=self.strides, dtype=self.dtype, name="conv2")(y)
        y = conv_input(nn.relu(self.norm(name="norm2")(y)))
        y = conv(out_features, 1, padding="VALID", dtype=self.dtype, name="conv3")(y)
        scale_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        y = self.norm(scale_init=scale_init, name="norm3")(y)
        if self.strides != 1 or x.shape[-1] != out_features:
            x = projection_shortcut(
                x, out_features, strides=self.strides, norm=self.norm, dtype=self.dtype
            )
        return conv_input(nn.relu(y + x))


class ResNetImageNet(ZooModel):
    """ImageNet ResNet with bottleneck v1.5 blocks: ResNet-50 by default.

    conv7x7/2-64 (pad 3) -> norm -> ReLU -> max-pool 3x3/2 (pad 1) -> four stages of
    bottleneck blocks (widths 64, 128, 256, 512; projection shortcut with norm on each
    stage's first block) -> global average pool -> dense. ResNet-50 has 25,557,032
    parameters for 1000 classes, the torchvision figure.

    Attributes:
      depth: 50, 101 or 152.
      zero_init_residual: zero-initialize each block's last norm scale (off by default,
        as in the authors' code; on in Goyal et al.).
    """

    depth: int = 50
    zero_init_residual: bool = False

    def __post_init__(self) -> None:
        if self.depth not in DEPTHS:
            raise ValueError(f"Unsupported ResNet {self.depth=}; use one of {DEPTHS}.")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Returns float32 logits (N, num_classes) for images (N, 224, 224, C)."""
        norm = self.norm_layer(train)
        x = self.to_compute_dtype(x)
        x = conv(64, 7, strides=2, dtype=self.dtype, name="stem_conv")(x)
        x = nn.relu(norm(name="stem_norm")(x))
        x = conv_input(nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))))
        for stage, num_blocks in enumerate(STAGE_SIZES[self.depth]):
            for block in range(num_blocks):
                x = Bottleneck(
                    features=64 * 2**stage,
                    strides=2 if stage > 0 and block == 0 else 1,
                    zero_init_residual=self.zero_init_residual,
                    norm=norm,
                    dtype=self.dtype,
                    name=f"stage{stage + 1}_block{block + 1}",
                )(x)
        x = jnp.mean(x, axis=(1, 2))
        return self.logits(x)
