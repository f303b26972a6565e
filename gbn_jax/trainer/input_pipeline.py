"""Input pipeline: datasets by name, deterministic, resumable and multi-host.

Usage (the trainer's view):

    info = get_dataset_info("fashion_mnist")
    train_iter = create_train_iterator("fashion_mnist", global_batch_size=4096, seed=0,
                                       sharding=NamedSharding(mesh, P("data")))
    batch = next(train_iter)            # {"image": f32 (B,28,28,1), "label": i32 (B,)}
    state = train_iter.get_state()      # JSON-able; checkpoint it with the model
    train_iter.set_state(state)         # resumes bit for bit
    for batch in create_eval_iterator("fashion_mnist", global_batch_size=1000,
                                      sharding=...):  # + "mask" (False on padding)
        ...

Design (details in gbn_jax/trainer/data/):

- Small datasets (MNIST family, CIFAR) live in host memory; each step gathers the
  process's slice of the epoch's permutation, assembles the global uint8 batch and
  augments/normalizes it on the devices in one jitted function keyed by
  (seed, global step). Per-example augmentation on the host would be slower than the
  train step it feeds and would occupy the host cores.
- The trainer goes one step further for these (gbn_jax/trainer/data/feed.py): when it fits,
  the uint8 split itself lives on the devices and each step gathers its batch from the
  permutation rows these iterators compute, inside the jitted loop; the batches are the
  same bit for bit.
- ImageNet-sized datasets do not fit in host memory and their crops need the
  full-resolution images, so they stream through grain from `tfds.data_source`
  (array_record), with random-resized crops in grain threads. Batches are a pure
  function of (seed, epoch, step), so the iterator state is (epoch, step) and grain's
  reader is reopened at that step.
"""

from __future__ import annotations

import jax

from gbn_jax.trainer.data import iterators, sources
from gbn_jax.trainer.data.iterators import EvalIterator, TrainIterator
from gbn_jax.trainer.data.sources import (
    HOLDOUT_SPLIT,
    KNOWN_DATASETS,
    DatasetInfo,
    DatasetNotFoundError,
    DatasetSpec,
    get_dataset_info,
    read_idx,
)

__all__ = [
    "AUGMENTS",
    "HOLDOUT_SPLIT",
    "KNOWN_DATASETS",
    "DatasetInfo",
    "DatasetNotFoundError",
    "DatasetSpec",
    "EvalIterator",
    "TrainIterator",
    "create_eval_iterator",
    "create_train_iterator",
    "get_dataset_info",
    "read_idx",
]


def create_train_iterator(
    name: str,
    *,
    global_batch_size: int,
    seed: int,
    sharding: jax.sharding.Sharding | None = None,
    data_dir: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int = 16,
    augment: str = "default",
    validation_size: int = 0,
    keep_last_batch: bool = False,
    batch_groups: int = 1,
) -> TrainIterator:
    """Endless training stream, reshuffled every epoch.

    The examples left over after the last full batch of an epoch are dropped unless
    `keep_last_batch` is set.

    Args:
      name: "mnist", "fashion_mnist" (or "mnist_32", "fashion_mnist_32", framed to
        32x32), "cifar10", "cifar100", "imagenet2012" or any TFDS
        image-classification name.
      global_batch_size: examples per step over all processes; a multiple of the
        process count and of the number of devices the batch is sharded over.
      seed: int in [0, 2**32); fixes the epoch permutations and the augmentation.
      sharding: sharding of a batch, e.g. NamedSharding(mesh, PartitionSpec("data"))
        (default: all devices on a 1-D "data" mesh).
      data_dir: IDX directory (MNIST family) or TFDS data_dir of prepared data.
      process_index: this process (default jax.process_index()).
      process_count: processes in the job (default jax.process_count()); a different
        value simulates one process of a larger job: batches are then this process's
        unassembled B / process_count rows.
      num_threads: grain reader threads (streamed datasets only).
      augment: "default" (the dataset's own input, `sources.KNOWN_DATASETS`) or
        "authors" (the authors' preprocessing, `sources.authors_spec`).
      validation_size: examples held out of the training split (0: none); the
        iterator trains on the rest.
      keep_last_batch: end every epoch with its partial batch, padded to
        global_batch_size rows; batches then carry a "mask" (False on padding).
      batch_groups: how a partial batch is spread (`iterators.partial_batch_slots`):
        the number of ghost batches per global batch, or 1.

    Returns:
      A `TrainIterator` (`.steps_per_epoch`, `.get_state()`, `.set_state()`).
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed=}")
    spec = _spec(name, data_dir, augment)
    sharding = iterators.default_sharding() if sharding is None else sharding
    index, count, simulated = iterators.check_layout(
        global_batch_size, sharding, process_index, process_count
    )
    return TrainIterator(
        name,
        spec,
        global_batch_size=int(global_batch_size),
        seed=seed,
        sharding=sharding,
        data_dir=data_dir,
        process_index=index,
        process_count=count,
        simulated=simulated,
        num_threads=num_threads,
        validation_size=validation_size,
        keep_last_batch=keep_last_batch,
        batch_groups=batch_groups,
    )


def create_eval_iterator(
    name: str,
    *,
    global_batch_size: int,
    sharding: jax.sharding.Sharding | None = None,
    data_dir: str | None = None,
    split: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int = 16,
    augment: str = "default",
    validation_size: int = 0,
) -> EvalIterator:
    """The whole evaluation split, every example exactly once, last batch padded.

    Args:
      name: dataset name (see `create_train_iterator`).
      global_batch_size: examples per batch over all processes.
      sharding: sharding of a batch (default: all devices on a 1-D "data" mesh).
      data_dir: IDX directory (MNIST family) or TFDS data_dir of prepared data.
      split: split to read (default: "test"; "validation" for imagenet2012), or
        "holdout", the validation split held out of the training split.
      process_index: this process (default jax.process_index()).
      process_count: processes in the job (default jax.process_count()).
      num_threads: grain reader threads (streamed datasets only).
      augment: "default" or "authors": which normalization constants to use (the
        training iterator's; evaluation is never augmented).
      validation_size: examples held out of the training split ("holdout" split).

    Returns:
      A re-iterable `EvalIterator` of {"image", "label", "mask"} batches; `len()` is
      the number of batches.
    """
    spec = _spec(name, data_dir, augment)
    sharding = iterators.default_sharding() if sharding is None else sharding
    index, count, simulated = iterators.check_layout(
        global_batch_size, sharding, process_index, process_count
    )
    return EvalIterator(
        name,
        spec,
        split=spec.eval_split if split is None else split,
        global_batch_size=int(global_batch_size),
        sharding=sharding,
        data_dir=data_dir,
        process_index=index,
        process_count=count,
        simulated=simulated,
        num_threads=num_threads,
        validation_size=validation_size,
    )


AUGMENTS = ("default", "authors")


def _spec(name: str, data_dir: str | None, augment: str) -> DatasetSpec:
    if augment not in AUGMENTS:
        raise ValueError(f"Unknown {augment=}; use one of {AUGMENTS}.")
    spec = sources.spec_for(name, data_dir)
    return sources.authors_spec(spec) if augment == "authors" else spec
