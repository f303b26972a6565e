"""VGG-16 with batch normalization, CIFAR variant.

References:
  Hoffer, Hubara & Soudry (2017), section 5, table 1 (VGG on CIFAR-10);
  Simonyan & Zisserman (2015), table 1 (configuration D);
  Ioffe & Szegedy (2015) for the batch normalization after every convolution.
"""

import flax.linen as nn
import jax

from gbn_jax.models.base import ZooModel, conv, dense

# Configuration D of Simonyan & Zisserman: channels per 3x3 conv, "M" a 2x2 max-pool.
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(ZooModel):
    """VGG-16-BN for 32 x 32 inputs: 13 [conv3x3, norm, ReLU] layers, 5 pools, a head.

    The convolutions keep their bias (as in torchvision's and the authors' VGG-16-BN),
    so counts match the usual CIFAR figure: 14,728,266 parameters for 10 classes with
    the default head.

    Classifier head (a choice; the paper does not print it): by default one dense
    layer from the 512 pooled features to the classes, the common CIFAR VGG-16-BN.
    ``classifier_width=4096`` instead gives the ImageNet-style head of the authors'
    later CIFAR VGG: [Dense w, ReLU, dropout] x 2, then the classes.

    Attributes:
      classifier_width: hidden width of an optional two-layer MLP head (None: none).
      dropout_rate: dropout in that MLP head, training only (0.5).
    """

    classifier_width: int | None = None
    dropout_rate: float = 0.5

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Returns float32 logits (N, num_classes) for images (N, 32, 32, C)."""
        norm = self.norm_layer(train)
        x = self.to_compute_dtype(x)
        layer = 0
        for item in VGG16:
            if item == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
                continue
            layer += 1
            x = conv(item, 3, use_bias=True, dtype=self.dtype, name=f"conv{layer}")(x)
            x = nn.relu(norm(name=f"conv{layer}_norm")(x))
        x = x.reshape(x.shape[0], -1)
        if self.classifier_width is not None:
            for i in range(2):
                x = dense(self.classifier_width, dtype=self.dtype, name=f"dense{i + 1}")(x)
                x = nn.relu(x)
                x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return self.logits(x)
