"""The trainer's inputs on the devices: resident splits, per-dispatch chunks, one eval pass.

The trainer runs several steps per dispatch (a ``lax.scan`` over K steps, gbn_jax/trainer/steps.py);
what one step reads is split three ways:

* ``feed.arrays``: handed to every dispatch unchanged. For a **resident** dataset (the
  MNIST family, CIFAR: the uint8 split fits in device memory) the whole training split,
  uint8 images and int32 labels, **replicated** on every device; for a **streamed** one
  (ImageNet through grain, or any dataset with ``device_resident_data=False``), nothing.
* ``feed.next_chunk(n, length)``: the per-step inputs of the next ``n`` steps, stacked on
  a leading axis of ``length`` rows (rows past ``n`` are padding that the loop never
  reads) and sharded over "data" along the batch axis. Resident: each step's row of the
  epoch's permutation, 4 bytes per example, sliced on the host by the `TrainIterator`;
  streamed: each step's uint8 images and labels, read on the host (grain threads for
  ImageNet). Both carry the step number, which keys the augmentation.
* ``feed.batch(arrays, x)``: traced inside the loop body: gathers the step's examples on
  the device (resident), then augments and normalizes them with `augment.transform`, as
  `TrainIterator.__next__` does, so that the batch equals ``next(train_iterator)`` bit
  for bit.

Replicated, not sharded: a random batch draws from the whole split, so a sharded split
would need an all-to-all every step; replicated, each device gathers its own shard of the
batch from its own copy and the data needs no communication. The price is device memory,
so a split is resident only when it takes at most ``RESIDENT_FRACTION`` of one device's
memory; otherwise it streams.

The trainer prepares chunk i+1 (host slicing or reading and the asynchronous
host-to-device copy) while the devices run chunk i.

Evaluation of a resident split is one jitted pass (`EvalFeed`): the split's batches are
rows of a fixed index table, gathered and normalized on the device as `EvalIterator`
builds them on the host, last batch padded and masked.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from gbn_jax.trainer.data import augment
from gbn_jax.trainer.data.iterators import EvalIterator, TrainIterator

# A resident split (train + evaluation splits together) may take at most this share of
# one device's memory; the rest is the model's.
RESIDENT_FRACTION = 0.25
# A streamed chunk (K steps of uint8 batches, stacked) stays below this many bytes, which
# caps K for large images.
STREAMED_CHUNK_BYTES = 256 * 2**20


def resident_budget(devices: list[jax.Device]) -> int:
    """Bytes a resident split may take on each device (`RESIDENT_FRACTION` of its memory).

    Args:
      devices: this process's devices.

    Returns:
      The budget: of the device's memory limit on accelerators; on the CPU, of the
      host's physical memory shared by the process's (fake) CPU devices.
    """
    stats = None
    try:
        stats = devices[0].memory_stats()
    except Exception:  # Backends without memory statistics (the CPU).
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(RESIDENT_FRACTION * stats["bytes_limit"])
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(RESIDENT_FRACTION * host / max(1, len(devices)))


def host_to_global(host: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global array from a host array that every process holds whole.

    Each process supplies the shards of its own devices, so this works alike on one
    process and on many (where `jax.device_put` of a global value does not).
    """
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


class TrainFeed:
    """Per-dispatch training inputs for the scanned loop; see the module docstring.

    Attributes:
      resident: whether the split lives on the devices.
      arrays: device arrays handed to every dispatch ({} when streamed).
      iterator: the `TrainIterator` that fixes the order; its ``get_state()`` is the
        position to checkpoint, ``set_state()`` moves the feed.
      max_steps_per_loop: the most steps one chunk may stack (None: no limit).
    """

    def __init__(self, iterator: TrainIterator, mesh: jax.sharding.Mesh, *, resident: bool):
        """Places a resident split on the devices (replicated).

        Args:
          iterator: a `TrainIterator` created for the whole job (not a simulated process).
          mesh: the trainer's mesh with a "data" axis.
          resident: hold the split on the devices (needs an in-memory dataset).

        Raises:
          ValueError: `resident` for a dataset that streams from disk.
        """
        if resident and iterator.host_arrays is None:
            raise ValueError(
                f"dataset {iterator.name!r} streams from disk and cannot be device-resident; "
                "set device_resident_data=False (or leave it unset)."
            )
        self.iterator = iterator
        self.resident = resident
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self._batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
        self._rows = NamedSharding(mesh, PartitionSpec(None, "data"))
        self._seed = np.uint32(iterator.seed)
        # A kept partial batch: the steps' rows carry a mask (False on padding slots).
        self._masked = bool(getattr(iterator, "keep_last_batch", False))
        batch = iterator.global_batch_size
        if resident:
            images, labels = iterator.host_arrays
            self.arrays = {
                "image": host_to_global(images, self._replicated),
                "label": host_to_global(labels, self._replicated),
            }
            self.max_steps_per_loop = None
        else:
            self.arrays = {}
            step_bytes = batch * int(np.prod(iterator.image_shape))
            self.max_steps_per_loop = max(1, STREAMED_CHUNK_BYTES // step_bytes)

    def next_chunk(self, num_steps: int, length: int) -> dict[str, jax.Array]:
        """The inputs of the next ``num_steps`` steps, padded to ``length`` rows; advances.

        Args:
          num_steps: steps to take, 1 <= num_steps <= length.
          length: rows of the stacked arrays (the loop's compiled length K).

        Returns:
          {"step": int32 (length,), and "index": int32 (length, B) (resident) or
          "image": uint8 (length, B, H, W, C) and "label": int32 (length, B) (streamed),
          and "mask": bool (length, B) when the iterator keeps the last partial batch}.
        """
        if not 1 <= num_steps <= length:
            raise ValueError(f"need 1 <= {num_steps=} <= {length=}")
        it = self.iterator
        steps = np.zeros((length,), np.int32)
        steps[:num_steps] = np.arange(it.step, it.step + num_steps)
        chunk = {"step": host_to_global(steps, self._replicated)}
        batch = it.global_batch_size
        if self.resident:
            index = np.zeros((length, batch), np.int32)
            for row in range(num_steps):
                index[row] = it.next_global_indices()
            if self._masked:  # -1 marks a padding slot: gather row 0, mask it out.
                chunk["mask"] = host_to_global(index >= 0, self._rows)
                index = np.maximum(index, 0)
            chunk["index"] = host_to_global(index, self._rows)
            return chunk
        local = batch // it.process_count
        images = np.zeros((length, local, *it.image_shape), np.uint8)
        labels = np.zeros((length, local), np.int32)
        mask = np.zeros((length, local), bool)
        for row in range(num_steps):
            images[row], labels[row], row_mask = it.next_local_batch()
            mask[row] = True if row_mask is None else row_mask
        chunk["image"] = jax.make_array_from_process_local_data(
            self._rows, images, (length, batch, *it.image_shape)
        )
        local_rows = {"label": labels, "mask": mask} if self._masked else {"label": labels}
        for key, rows in local_rows.items():
            chunk[key] = jax.make_array_from_process_local_data(self._rows, rows, (length, batch))
        return chunk

    def chunk_shapes(self, length: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes, dtypes and shardings of ``next_chunk(n, length)``, to compile ahead."""
        it = self.iterator
        batch = it.global_batch_size
        shapes = {"step": jax.ShapeDtypeStruct((length,), np.int32, sharding=self._replicated)}
        if self.resident:
            shapes["index"] = jax.ShapeDtypeStruct((length, batch), np.int32, sharding=self._rows)
        else:
            shapes["image"] = jax.ShapeDtypeStruct(
                (length, batch, *it.image_shape), np.uint8, sharding=self._rows
            )
            shapes["label"] = jax.ShapeDtypeStruct((length, batch), np.int32, sharding=self._rows)
        if self._masked:
            shapes["mask"] = jax.ShapeDtypeStruct((length, batch), np.bool_, sharding=self._rows)
        return shapes

    def batch(self, arrays: dict[str, jax.Array], x: dict[str, jax.Array]) -> dict:
        """One step's batch from its row of a chunk (traced inside the loop).

        Args:
          arrays: ``self.arrays`` as passed to the jitted loop.
          x: one row of `next_chunk` (leading axis removed).

        Returns:
          {"image": float32 (B, H, W, C), "label": int32 (B,)}, sharded over "data",
          and "mask" (False on padding, whose image is zeros and label 0) when the
          iterator keeps the last partial batch.
        """
        if self.resident:
            # Replicated operand, sharded indices: each device gathers its own rows.
            images = arrays["image"][x["index"]]
            labels = arrays["label"][x["index"]]
            if self._masked:
                images = jnp.where(x["mask"][:, None, None, None], images, 0)
                labels = jnp.where(x["mask"], labels, 0)
        else:
            images, labels = x["image"], x["label"]
        images = jax.lax.with_sharding_constraint(images, self._batch_sharding)
        spec = self.iterator.spec
        image = augment.transform(
            images,
            self._seed,
            x["step"],
            augmentation=self.iterator.device_augmentation,
            mean=spec.mean,
            std=spec.std,
            total_rows=self.iterator.global_batch_size,
            pad=spec.pad,
            fill=spec.fill,
        )
        batch = {"image": image, "label": labels}
        if self._masked:
            batch["mask"] = x["mask"]
        return batch


class EvalFeed:
    """A resident evaluation split: its arrays and batch rows, for one jitted pass.

    Attributes:
      arrays: {"image": uint8 (N, H, W, C), "label": int32 (N,)}, replicated.
      xs: {"index": int32 (batches, B), "mask": bool (batches, B)}, sharded over "data"
        along B; the padding of the last batch has index 0 and mask False.
      num_examples: examples in the split.
    """

    def __init__(self, iterator: EvalIterator, mesh: jax.sharding.Mesh):
        """Places the split and its batch table on the devices.

        Args:
          iterator: an in-memory `EvalIterator` of the whole job (its batch size and
            split fix the batches).
          mesh: the trainer's mesh with a "data" axis.
        """
        if iterator.host_arrays is None:
            raise ValueError("a streamed evaluation split cannot be device-resident")
        replicated = NamedSharding(mesh, PartitionSpec())
        rows = NamedSharding(mesh, PartitionSpec(None, "data"))
        self._batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
        self._spec = iterator.spec
        images, labels = iterator.host_arrays
        self.num_examples = iterator.num_examples
        self.arrays = {
            "image": host_to_global(images, replicated),
            "label": host_to_global(labels, replicated),
        }
        positions = iterator.global_positions()
        self.xs = {
            "index": host_to_global(np.maximum(positions, 0).astype(np.int32), rows),
            "mask": host_to_global(positions >= 0, rows),
        }

    def batch(self, arrays: dict[str, jax.Array], x: dict[str, jax.Array]) -> dict:
        """One evaluation batch from its row of ``xs`` (traced inside the pass).

        Returns:
          {"image": float32, "label": int32, "mask": bool}: as `EvalIterator` yields it,
          padding rows zero images with label 0.
        """
        mask = x["mask"]
        images = jnp.where(mask[:, None, None, None], arrays["image"][x["index"]], 0)
        images = jax.lax.with_sharding_constraint(images, self._batch_sharding)
        labels = jnp.where(mask, arrays["label"][x["index"]], 0)
        image = augment.normalize(images, self._spec.mean, self._spec.std)
        return {"image": image, "label": labels, "mask": mask}


def split_bytes(iterator: TrainIterator | EvalIterator) -> int:
    """Bytes of a split held in host memory (images and labels); 0 if streamed."""
    arrays: Any = iterator.host_arrays
    return 0 if arrays is None else sum(a.nbytes for a in arrays)
