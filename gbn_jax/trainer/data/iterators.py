"""Resumable, multi-host train and evaluation iterators.

Every process computes the same permutation of the training split from (seed, epoch).
Global batch `s` of an epoch is positions [s*B, (s+1)*B) of that permutation, and
process `p` of `P` reads the contiguous slice [p*B/P, (p+1)*B/P) of it, so the processes
read disjoint shards whose union is the epoch's used examples, each exactly once (the
last N mod B examples of the permutation are dropped, unless `keep_last_batch`: then
the epoch ends with a partial batch laid out by `partial_batch_slots`, padded to B rows
and marked by a "mask"). The process-local uint8 batches
are assembled into one global `jax.Array` with `jax.make_array_from_process_local_data`
and then augmented and normalized on the devices.

The iterator's whole state is (seed, epoch, step within the epoch): batches are a pure
function of it, so a restored iterator yields bit for bit what the uninterrupted one
would have.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from gbn_jax.trainer.data import augment, sources


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The order of the training split in one epoch, identical on every process."""
    return np.random.default_rng((seed, epoch)).permutation(num_examples)


def process_slice(
    global_positions: np.ndarray, process_index: int, process_count: int
) -> np.ndarray:
    """The contiguous part of one global batch that process `process_index` reads."""
    local = len(global_positions) // process_count
    return global_positions[process_index * local : (process_index + 1) * local]


def partial_batch_slots(positions: np.ndarray, global_batch_size: int, groups: int) -> np.ndarray:
    """Lays out one batch of positions in `global_batch_size` slots; -1 marks an empty slot.

    A full batch is returned unchanged. A partial batch of n < B examples is cut as
    ``torch.chunk(batch, groups)`` cuts it in the authors' code: into chunks
    of c = ceil(n / groups) consecutive examples (the last may be shorter), and chunk j
    fills the first slots of the j-th group of B / groups slots. With ghost batch norm
    (groups = B / ghost size) each chunk is then normalized alone, as there; with
    ``groups=1`` the real examples come first.

    Args:
      positions: the batch's positions in the epoch's permutation (at most B of them).
      global_batch_size: B, slots per batch.
      groups: slot groups (ghost batches per global batch); must divide B.

    Returns:
      An array of B positions, -1 where no example goes.

    Raises:
      ValueError: more positions than slots, or groups not dividing B.

    >>> partial_batch_slots(np.arange(5), 8, 2)
    array([ 0,  1,  2, -1,  3,  4, -1, -1])
    """
    n = len(positions)
    if n > global_batch_size or groups <= 0 or global_batch_size % groups:
        raise ValueError(
            f"cannot lay out {n} examples in {global_batch_size} slots of {groups} groups; "
            "the groups (ghost batches) must divide the global batch."
        )
    if n == global_batch_size:
        return positions
    chunk = -(-n // groups)
    within = np.arange(n)
    slots = np.full(global_batch_size, -1, dtype=np.asarray(positions).dtype)
    slots[(within // chunk) * (global_batch_size // groups) + within % chunk] = positions
    return slots


def default_sharding() -> NamedSharding:
    """Batch sharding over all devices on a 1-D "data" mesh."""
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    return NamedSharding(mesh, PartitionSpec("data"))


def _batch_shards(sharding: jax.sharding.Sharding) -> int:
    """How many pieces the leading (batch) axis is cut into."""
    if isinstance(sharding, NamedSharding):
        axes = sharding.spec[0] if len(sharding.spec) else None
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        return int(np.prod([sharding.mesh.shape[a] for a in axes]))
    return len(sharding.device_set)


def _label_sharding(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    if isinstance(sharding, NamedSharding):
        first = sharding.spec[0] if len(sharding.spec) else None
        return NamedSharding(sharding.mesh, PartitionSpec(first))
    return sharding


def check_layout(
    global_batch_size: int,
    sharding: jax.sharding.Sharding,
    process_index: int | None,
    process_count: int | None,
) -> tuple[int, int, bool]:
    """Validates the batch layout; returns (process_index, process_count, simulated)."""
    if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int | np.integer):
        raise ValueError(f"global_batch_size must be an int, got {global_batch_size=}")
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be positive, got {global_batch_size=}")
    count = jax.process_count() if process_count is None else int(process_count)
    index = jax.process_index() if process_index is None else int(process_index)
    if count <= 0 or not 0 <= index < count:
        raise ValueError(f"need 0 <= process_index < process_count, got {index=}, {count=}")
    if global_batch_size % count:
        raise ValueError(
            f"{global_batch_size=} is not divisible by process_count={count}; pick a "
            f"multiple of {count} so every process reads the same number of examples"
        )
    shards = _batch_shards(sharding)
    if global_batch_size % shards:
        raise ValueError(
            f"{global_batch_size=} is not divisible by the {shards} devices the batch is "
            f"sharded over; pick a multiple of {shards}"
        )
    # A process_count other than the real one simulates one process of a larger job
    # (tests): its batches stay process-local, unassembled.
    return index, count, count != jax.process_count()


class _GrainReader:
    """Reads, crops and batches examples from a random-access source with grain threads."""

    def __init__(self, source, augmentation: str, seed: int, train: bool, num_threads: int):
        self._source = source
        self._augmentation = augmentation
        self._seed = seed
        self._train = train
        self._num_threads = num_threads
        self._shape = None

    def _load(self, epoch: int, index: int) -> tuple[np.ndarray, np.int32]:
        if index < 0:  # Padding of the last evaluation batch.
            return np.zeros(self.image_shape, np.uint8), np.int32(0)
        example = self._source[int(index)]
        image = np.asarray(example["image"], np.uint8)
        if self._augmentation == "inception":
            if self._train:
                rng = np.random.default_rng((self._seed, epoch, int(index)))
                image = augment.random_resized_crop(image, rng)
                if rng.random() < 0.5:
                    image = image[:, ::-1]
            else:
                image = augment.resize_center_crop(image)
        return np.ascontiguousarray(image), np.int32(example["label"])

    @property
    def image_shape(self) -> tuple[int, ...]:
        if self._shape is None:
            first = np.asarray(self._source[0]["image"])
            if self._augmentation == "inception":
                self._shape = (224, 224, first.shape[-1])
            else:
                self._shape = first.shape
        return self._shape

    def batches(self, epoch: int, indices: np.ndarray, batch_size: int) -> Iterator[Any]:
        """Yields (images, labels) batches of `indices` (a flat array, -1 = padding)."""
        dataset = grain.MapDataset.source(indices).map(functools.partial(self._load, epoch))
        options = grain.ReadOptions(num_threads=self._num_threads, prefetch_buffer_size=batch_size)
        return iter(dataset.to_iter_dataset(options).batch(batch_size))


class TrainIterator:
    """Endless stream of augmented, normalized global batches; see module docstring.

    Yields {"image": float32 (B, H, W, C), "label": int32 (B,)}, plus "mask" (False on
    padding) with keep_last_batch, as jax.Arrays with the given sharding
    (process-local arrays of B / process_count rows when process_count is overridden
    to simulate a multi-host job).
    """

    def __init__(
        self,
        name: str,
        spec: sources.DatasetSpec,
        *,
        global_batch_size: int,
        seed: int,
        sharding: jax.sharding.Sharding,
        data_dir: str | None,
        process_index: int,
        process_count: int,
        simulated: bool,
        num_threads: int,
        validation_size: int = 0,
        keep_last_batch: bool = False,
        batch_groups: int = 1,
    ):
        self.name = name
        self.seed = seed
        self.keep_last_batch = keep_last_batch
        self._batch_groups = batch_groups
        self.global_batch_size = global_batch_size
        self.sharding = sharding
        self.process_index = process_index
        self.process_count = process_count
        self._simulated = simulated
        self._local_batch_size = global_batch_size // process_count
        if spec.in_memory:
            self._images, self._labels = sources.load_arrays(
                name, spec.train_split, data_dir, validation_size
            )
            self._reader = None
            num_examples, self.image_shape = len(self._labels), self._images.shape[1:]
        else:
            if validation_size or keep_last_batch:
                raise ValueError(
                    f"{validation_size=} and {keep_last_batch=} need an in-memory dataset; "
                    f"{name!r} streams through grain. Set both off."
                )
            source = sources.random_access_source(spec.tfds_name, spec.train_split, data_dir)
            self._reader = _GrainReader(source, spec.augmentation, seed, True, num_threads)
            num_examples, self.image_shape = len(source), self._reader.image_shape
        self.num_examples = num_examples
        self.steps_per_epoch = num_examples // global_batch_size
        if keep_last_batch:
            self.steps_per_epoch = -(-num_examples // global_batch_size)
        if num_examples < global_batch_size:
            raise ValueError(
                f"{global_batch_size=} is larger than the {num_examples} training examples "
                f"of {name!r}; use a smaller batch"
            )
        self.spec = spec
        # What the devices still do to a uint8 batch (host-cropped data: normalize only).
        self.device_augmentation = "crop_flip" if spec.augmentation == "crop_flip" else "none"
        self._transform = augment.make_device_transform(
            self.device_augmentation,
            spec.mean,
            spec.std,
            total_rows=global_batch_size,
            out_sharding=None if simulated else sharding,
            pad=spec.pad,
            fill=spec.fill,
        )
        self._seed32 = np.uint32(seed)
        self._row_offset = np.int32(process_index * self._local_batch_size if simulated else 0)
        self._epoch, self._step_in_epoch = 0, 0
        self._stream = None  # (epoch, next step, grain iterator) on the grain path.
        self._cached_permutation = (-1, None)

    @property
    def host_arrays(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The whole split in host memory (uint8 images, int32 labels); None if streamed."""
        return None if self._reader is not None else (self._images, self._labels)

    # -------------------------------------------------------------- state

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def step(self) -> int:
        """Global step of the next batch."""
        return self._epoch * self.steps_per_epoch + self._step_in_epoch

    def get_state(self) -> dict[str, Any]:
        """JSON-able position; `set_state` on a fresh iterator resumes from it exactly."""
        return {
            "dataset": self.name,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "epoch": self._epoch,
            "step_in_epoch": self._step_in_epoch,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Moves to a position saved by `get_state` (of an iterator with the same settings)."""
        for key in ("dataset", "seed", "global_batch_size"):
            mine = getattr(self, "name" if key == "dataset" else key)
            if state.get(key) != mine:
                raise ValueError(
                    f"saved iterator state has {key}={state.get(key)!r} but this iterator has "
                    f"{mine!r}; create the iterator with the saved settings"
                )
        epoch, step = int(state["epoch"]), int(state["step_in_epoch"])
        if epoch < 0 or not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"bad saved position {epoch=}, step_in_epoch={step}")
        self._epoch, self._step_in_epoch = epoch, step

    # -------------------------------------------------------------- batches

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._cached_permutation[0] != epoch:  # Once per epoch, not per step.
            self._cached_permutation = (
                epoch,
                epoch_permutation(self.seed, epoch, self.num_examples),
            )
        return self._cached_permutation[1]

    def global_indices(self, epoch: int, step_in_epoch: int) -> np.ndarray:
        """Training-split indices of one global batch (every process's rows, in order;
        -1 marks the empty slots of a kept partial batch)."""
        permutation = self._permutation(epoch)
        start = step_in_epoch * self.global_batch_size
        positions = permutation[start : start + self.global_batch_size]
        if self.keep_last_batch:  # -1 marks the empty slots of a partial batch.
            positions = partial_batch_slots(positions, self.global_batch_size, self._batch_groups)
        return positions

    def local_indices(self, epoch: int, step_in_epoch: int) -> np.ndarray:
        """Training-split indices this process reads for one global batch."""
        positions = self.global_indices(epoch, step_in_epoch)
        return process_slice(positions, self.process_index, self.process_count)

    def _local_batch(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(images, labels, mask): mask is None unless the last batch is kept."""
        epoch, step = self._epoch, self._step_in_epoch
        if self._reader is None:
            indices = self.local_indices(epoch, step)
            if not self.keep_last_batch:
                return self._images[indices], self._labels[indices], None
            real = indices >= 0
            rows = np.where(real, indices, 0)
            images = self._images[rows]
            images[~real] = 0
            return images, np.where(real, self._labels[rows], 0), real
        if self._stream is None or self._stream[:2] != (epoch, step):
            # (Re)open the epoch's grain stream at this step.
            used = self._permutation(epoch)[: self.steps_per_epoch * self.global_batch_size]
            per_step = used.reshape(self.steps_per_epoch, self.process_count, -1)
            indices = per_step[step:, self.process_index].reshape(-1)
            self._stream = (
                epoch,
                step,
                self._reader.batches(epoch, indices, self._local_batch_size),
            )
        images, labels = next(self._stream[2])
        self._stream = (epoch, step + 1, self._stream[2])
        return images, labels, None

    def _advance(self) -> None:
        self._step_in_epoch += 1
        if self._step_in_epoch == self.steps_per_epoch:
            self._epoch, self._step_in_epoch = self._epoch + 1, 0

    def next_global_indices(self) -> np.ndarray:
        """The next global batch as training-split indices (nothing read); advances.

        The device-resident path of gbn_jax/trainer/data/feed.py gathers these rows on the
        devices, from its copy of the split.
        """
        indices = self.global_indices(self._epoch, self._step_in_epoch)
        self._advance()
        return indices

    def next_local_batch(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """This process's rows of the next global batch: (uint8 images, int32 labels,
        mask or None), not augmented or normalized (`augment.transform` of step
        `self.step` before the call does that); advances."""
        batch = self._local_batch()
        self._advance()
        return batch

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        global_step = np.int32(self.step)
        images, labels, mask = self.next_local_batch()
        if self._simulated:
            images, labels = jax.device_put(images), jax.device_put(labels)
            if mask is not None:
                mask = jax.device_put(mask)
        else:
            shape = (self.global_batch_size, *images.shape[1:])
            label_sharding = _label_sharding(self.sharding)
            images = jax.make_array_from_process_local_data(self.sharding, images, shape)
            labels = jax.make_array_from_process_local_data(
                label_sharding, labels, (self.global_batch_size,)
            )
            if mask is not None:
                mask = jax.make_array_from_process_local_data(
                    label_sharding, mask, (self.global_batch_size,)
                )
        batch = {
            "image": self._transform(images, self._seed32, global_step, self._row_offset),
            "label": labels,
        }
        if mask is not None:  # False on the padding of a partial batch.
            batch["mask"] = mask
        return batch


class EvalIterator:
    """The whole evaluation split once per pass, in order, last batch padded.

    Iterating (again) yields {"image", "label", "mask"}: mask is False on padding rows.
    """

    def __init__(
        self,
        name: str,
        spec: sources.DatasetSpec,
        *,
        split: str,
        global_batch_size: int,
        sharding: jax.sharding.Sharding,
        data_dir: str | None,
        process_index: int,
        process_count: int,
        simulated: bool,
        num_threads: int,
        validation_size: int = 0,
    ):
        self.global_batch_size = global_batch_size
        self.sharding = sharding
        self.process_index = process_index
        self.process_count = process_count
        self._simulated = simulated
        self._local_batch_size = global_batch_size // process_count
        if spec.in_memory:
            self._images, self._labels = sources.load_arrays(name, split, data_dir, validation_size)
            self._reader = None
            self.num_examples, self.image_shape = len(self._labels), self._images.shape[1:]
        else:
            if split == sources.HOLDOUT_SPLIT:
                raise ValueError(
                    f"a validation split held out of the training split needs an in-memory "
                    f"dataset; {name!r} streams through grain."
                )
            source = sources.random_access_source(spec.tfds_name, split, data_dir)
            self._reader = _GrainReader(source, spec.augmentation, 0, False, num_threads)
            self.num_examples, self.image_shape = len(source), self._reader.image_shape
        self.spec = spec
        self._transform = augment.make_device_transform(
            "none",
            spec.mean,
            spec.std,
            out_sharding=None if simulated else sharding,
        )

    @property
    def host_arrays(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The whole split in host memory (uint8 images, int32 labels); None if streamed."""
        return None if self._reader is not None else (self._images, self._labels)

    def global_positions(self) -> np.ndarray:
        """(batches, global batch) split positions of one pass; -1 marks padding."""
        positions = np.arange(len(self) * self.global_batch_size)
        positions[positions >= self.num_examples] = -1
        return positions.reshape(len(self), self.global_batch_size)

    def __len__(self) -> int:
        return -(-self.num_examples // self.global_batch_size)

    def _local_positions(self) -> np.ndarray:
        """(num_batches, local batch) split positions; -1 marks padding."""
        per_batch = self.global_positions().reshape(len(self), self.process_count, -1)
        return per_batch[:, self.process_index]

    def __iter__(self) -> Iterator[dict[str, jax.Array]]:
        positions = self._local_positions()
        if self._reader is not None:
            stream = self._reader.batches(0, positions.reshape(-1), self._local_batch_size)
        for local in positions:
            mask = local >= 0
            if self._reader is None:
                images = self._images[np.where(mask, local, 0)]
                images[~mask] = 0
                labels = np.where(mask, self._labels[np.where(mask, local, 0)], 0)
            else:
                images, labels = next(stream)
            yield self._place(images, labels.astype(np.int32), mask)

    def _place(self, images, labels, mask) -> dict[str, jax.Array]:
        if self._simulated:
            arrays = [jax.device_put(a) for a in (images, labels, mask)]
        else:
            label_sharding = _label_sharding(self.sharding)
            arrays = [
                jax.make_array_from_process_local_data(
                    self.sharding, images, (self.global_batch_size, *images.shape[1:])
                ),
                jax.make_array_from_process_local_data(
                    label_sharding, labels, (self.global_batch_size,)
                ),
                jax.make_array_from_process_local_data(
                    label_sharding, mask, (self.global_batch_size,)
                ),
            ]
        return {
            "image": self._transform(arrays[0], np.uint32(0), np.int32(0), np.int32(0)),
            "label": arrays[1],
            "mask": arrays[2],
        }
