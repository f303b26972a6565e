"""Augmentation and normalization.

Small datasets are augmented on the device, inside one jitted function per iterator,
from uint8 pixels (a quarter of the float32 bytes cross the host-device link). Random
draws are made for the whole global batch from a key derived from (seed, global step),
and each row takes its own draw: the result for an example depends only on the seed,
the step and its row in the global batch, not on how the batch is split over devices or
processes. ImageNet-style crops need the full-resolution image, so they run on the host
(PIL) inside the grain workers, seeded from (seed, epoch, example index).

The CIFAR augmentation (pad 4, random 32x32 crop, horizontal flip) is the one of the
paper's runs (Hoffer et al., 2017, section 5); the ImageNet crops follow the authors'
code (torchvision's RandomResizedCrop 224 + flip; evaluation Resize 256 + CenterCrop 224).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

CIFAR_PAD = 4
# Folded into the user's seed so the data stream never shares random numbers with a
# trainer that seeds its own keys from the same integer.
DATA_KEY_TAG = 0x6461746


def normalize(images: jax.Array, mean: tuple[float, ...], std: tuple[float, ...]) -> jax.Array:
    """Maps uint8 pixels to float32 (x / 255 - mean) / std per channel."""
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return (images.astype(jnp.float32) / 255.0 - mean) / std


def crop_flip(
    images: jax.Array,
    key: jax.Array,
    *,
    row_offset: int | jax.Array = 0,
    total_rows: int | None = None,
    pad: int = CIFAR_PAD,
    fill: int = 0,
) -> jax.Array:
    """Pads by `pad` pixels of value `fill`, takes a random window of the original size
    (every offset in [0, 2 * pad] equally likely), flips half of the images.

    Args:
      images: uint8 (n, H, W, C).
      key: the step's key; draws are made for `total_rows` rows.
      row_offset: row of `images[0]` in the global batch.
      total_rows: rows of the global batch (default n).
      pad: padding on each side (4 for CIFAR; 2 for the authors' MNIST, 28 -> 32).
      fill: the padding's pixel value (the authors pad CIFAR with 127).

    Returns:
      uint8 (n, H, W, C).
    """
    n, height, width, channels = images.shape
    total_rows = n if total_rows is None else total_rows
    crop_key, flip_key = jax.random.split(key)
    offsets = jax.random.randint(crop_key, (total_rows, 2), 0, 2 * pad + 1)
    flips = jax.random.bernoulli(flip_key, 0.5, (total_rows,))
    offsets = jax.lax.dynamic_slice_in_dim(offsets, row_offset, n)
    flips = jax.lax.dynamic_slice_in_dim(flips, row_offset, n)
    widths = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    padded = jnp.pad(images, widths, constant_values=jnp.asarray(fill, images.dtype))

    def window(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

    crops = jax.vmap(window)(padded, offsets)
    return jnp.where(flips[:, None, None, None], crops[:, :, ::-1], crops)


def step_key(seed: int | jax.Array, global_step: int | jax.Array) -> jax.Array:
    """The augmentation key of one global step: a function of (seed, step) only."""
    key = jax.random.fold_in(jax.random.key(seed), DATA_KEY_TAG)
    return jax.random.fold_in(key, global_step)


def transform(
    images: jax.Array,
    seed: int | jax.Array,
    global_step: int | jax.Array,
    *,
    augmentation: str,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    row_offset: int | jax.Array = 0,
    total_rows: int | None = None,
    pad: int = CIFAR_PAD,
    fill: int = 0,
) -> jax.Array:
    """Augments (from (seed, global step)) and normalizes uint8 images: pure, traceable.

    The one definition of a training batch's pixels, traced both by
    `make_device_transform` (one jitted call per batch) and inside the trainer's scanned
    loop (gbn_jax/trainer/data/feed.py), so the two give the same float32 batch bit for bit.

    Args:
      images: uint8 (n, H, W, C).
      seed: the data seed (uint32).
      global_step: the step the batch belongs to.
      augmentation: "crop_flip" or "none".
      mean: per-channel mean of [0, 1] pixels.
      std: per-channel std of [0, 1] pixels.
      row_offset: row of `images[0]` in the global batch.
      total_rows: rows of the global batch (default n).
      pad: padding on each side before the crop ("crop_flip").
      fill: the padding's pixel value.

    Returns:
      float32 (n, H, W, C).
    """
    if augmentation == "crop_flip":
        key = step_key(seed, global_step)
        images = crop_flip(
            images, key, row_offset=row_offset, total_rows=total_rows, pad=pad, fill=fill
        )
    return normalize(images, mean, std)


@functools.lru_cache(maxsize=64)
def make_device_transform(
    augmentation: str,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    *,
    total_rows: int | None = None,
    out_sharding: jax.sharding.Sharding | None = None,
    pad: int = CIFAR_PAD,
    fill: int = 0,
):
    """Returns jitted `transform(images_uint8, seed, global_step, row_offset) -> float32`.

    Cached, so iterators with the same layout share one compiled function; the seed and
    the row offset (of the first image in the global batch, nonzero only for simulated
    processes) are traced arguments for the same reason.

    Args:
      augmentation: "crop_flip" or "none" (host-augmented data passes "none").
      mean: per-channel mean of [0, 1] pixels.
      std: per-channel std of [0, 1] pixels.
      total_rows: rows of the global batch (default: rows of the input).
      out_sharding: sharding of the output (None: follow the input).
      pad: padding on each side before the crop ("crop_flip").
      fill: the padding's pixel value.
    """
    if augmentation not in ("crop_flip", "none"):
        raise ValueError(f"{augmentation=} is not a device augmentation; use 'crop_flip'/'none'")

    def batch_transform(images, seed, global_step, row_offset):
        return transform(
            images,
            seed,
            global_step,
            augmentation=augmentation,
            mean=mean,
            std=std,
            row_offset=row_offset,
            total_rows=total_rows,
            pad=pad,
            fill=fill,
        )

    return jax.jit(batch_transform, out_shardings=out_sharding)


def random_resized_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    size: int = 224,
    area: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """Inception-style crop: random area and aspect ratio, resized to size x size.

    Ten tries at a window inside the image, then the largest central window of an
    allowed aspect ratio (torchvision's fallback).

    Args:
      image: uint8 (H, W, C).
      rng: the example's generator.
      size: output side.
      area: range of the window's area as a fraction of the image.
      ratio: range of the window's width / height (sampled log-uniformly).

    Returns:
      uint8 (size, size, C).
    """
    height, width = image.shape[:2]
    for _ in range(10):
        target = height * width * rng.uniform(*area)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return _resize_box(image, (left, top, left + w, top + h), (size, size))
    aspect = min(max(width / height, ratio[0]), ratio[1])
    w, h = (
        (width, round(width / aspect))
        if width / height <= aspect
        else (round(height * aspect), height)
    )
    w, h = min(w, width), min(h, height)
    top, left = (height - h) // 2, (width - w) // 2
    return _resize_box(image, (left, top, left + w, top + h), (size, size))


def resize_center_crop(image: np.ndarray, resize: int = 256, size: int = 224) -> np.ndarray:
    """Evaluation crop: shorter side to `resize`, then the central size x size window."""
    height, width = image.shape[:2]
    # The central window in the original image's coordinates, resized in one call.
    side = size * min(height, width) / resize
    top, left = (height - side) / 2, (width - side) / 2
    return _resize_box(image, (left, top, left + side, top + side), (size, size))


def _resize_box(image: np.ndarray, box, out_size: tuple[int, int]) -> np.ndarray:
    squeeze = image.ndim == 3 and image.shape[-1] == 1
    pil = Image.fromarray(image[..., 0] if squeeze else image)
    out = np.asarray(pil.resize(out_size, Image.BILINEAR, box=box))
    return out[..., None] if squeeze else out
