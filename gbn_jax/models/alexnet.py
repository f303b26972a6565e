"""AlexNet with batch normalization for ImageNet, the variant the authors trained.

References:
  Hoffer, Hubara & Soudry (2017), section 5, table 1 (AlexNet on ImageNet);
  Krizhevsky (2014), "One weird trick for parallelizing convolutional neural
  networks" (the single-tower 64-192-384-256-256 layout).
"""

import flax.linen as nn
import jax

from gbn_jax.models.base import ZooModel, conv, dense


class AlexNet(ZooModel):
    """AlexNet "one weird trick" with norm after every layer, as in the authors' code.

    Layout: conv11x11/4-64 (pad 2)
    -> pool -> norm -> ReLU; conv5x5-192 (pad 2) -> pool -> norm -> ReLU;
    conv3x3-384 -> norm -> ReLU; conv3x3-256 -> norm -> ReLU; conv3x3-256 -> pool ->
    norm -> ReLU; flatten (256 x 6 x 6 for 224 x 224 inputs); [Dense 4096 -> norm ->
    ReLU -> dropout 0.5] x 2; Dense num_classes. Pools are 3x3 stride 2 without
    padding; convolutions and hidden dense layers have no bias (a norm follows). The
    authors' code is inconsistent about norm-before-ReLU; here it is always norm, then
    ReLU (the parameter count, 61,110,184 for 1000 classes, is the same).

    Attributes:
      dropout_rate: dropout after both hidden dense layers, training only (0.5).
    """

    dropout_rate: float = 0.5

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Returns float32 logits (N, num_classes) for images (N, 224, 224, C)."""
        norm = self.norm_layer(train)
        x = self.to_compute_dtype(x)
        # (features, kernel, stride, padding, max-pool after it)
        layers = ((64, 11, 4, 2, True), (192, 5, 1, 2, True), (384, 3, 1, 1, False))
        layers += ((256, 3, 1, 1, False), (256, 3, 1, 1, True))
        for i, (features, kernel, stride, pad, pool) in enumerate(layers):
            x = conv(
                features,
                kernel,
                strides=stride,
                padding=((pad, pad), (pad, pad)),
                dtype=self.dtype,
                name=f"conv{i + 1}",
            )(x)
            if pool:
                x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
            x = nn.relu(norm(name=f"conv{i + 1}_norm")(x))
        x = x.reshape(x.shape[0], -1)
        for i in range(2):
            x = dense(4096, use_bias=False, dtype=self.dtype, name=f"dense{i + 1}")(x)
            x = nn.relu(norm(name=f"dense{i + 1}_norm")(x))
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return self.logits(x)
