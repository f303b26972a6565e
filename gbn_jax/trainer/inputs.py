"""The trainer's inputs: the training and evaluation splits, on the devices when they fit.

Datasets that fit (the MNIST family, CIFAR) live on the devices as uint8, replicated,
and each step gathers its batch there (``gbn_jax.trainer.data.feed``); the others (ImageNet)
are read on the host one dispatch ahead of the devices.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gbn_jax.trainer import input_pipeline
from gbn_jax.trainer.data import feed
from gbn_jax.trainer.validation import round_up


@dataclasses.dataclass(frozen=True)
class Inputs:
    """A run's inputs.

    Attributes:
      train_iter: the training iterator (its position is checkpointed).
      train_feed: what the train program reads (`feed.TrainFeed`).
      eval_splits: metrics prefix ("eval": the test split, "val": the validation split
        held out of the training set) -> the split, an `feed.EvalFeed` on the devices
        or an iterator on the host.
      resident: whether the splits live on the devices.
    """

    train_iter: input_pipeline.TrainIterator
    train_feed: feed.TrainFeed
    eval_splits: dict[str, feed.EvalFeed | input_pipeline.EvalIterator]
    resident: bool

    @property
    def eval_feeds(self) -> dict[str, feed.EvalFeed]:
        """The evaluation splits on the devices (all of them, or none)."""
        return {k: v for k, v in self.eval_splits.items() if isinstance(v, feed.EvalFeed)}


def create(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Inputs:
    """The inputs of an experiment config, batches sharded over the mesh's "data" axis.

    Args:
      config: the experiment config (dataset, batch sizes, and the protocol switches
        ``augment``, ``validation_size`` and ``keep_last_batch``).
      mesh: the 1-D "data" mesh.

    Returns:
      The inputs.
    """
    batch_sharding = NamedSharding(mesh, P("data"))
    augment = config.get("augment", "default")
    validation_size = config.get("validation_size", 0) or 0
    eval_batch_size = round_up(config.eval_batch_size, jax.device_count())
    # A partial batch is spread over the ghost batches as the authors' torch.chunk does.
    ghost = config.model.ghost_batch_size if config.model.norm == "ghost" else None
    train_iter = input_pipeline.create_train_iterator(
        config.dataset,
        global_batch_size=config.batch_size,
        seed=config.seed,
        sharding=batch_sharding,
        data_dir=config.data_dir,
        augment=augment,
        validation_size=validation_size,
        keep_last_batch=bool(config.get("keep_last_batch", False)),
        batch_groups=config.batch_size // ghost if ghost else 1,
    )
    eval_iters = {
        "eval": input_pipeline.create_eval_iterator(
            config.dataset,
            global_batch_size=eval_batch_size,
            sharding=batch_sharding,
            data_dir=config.data_dir,
            augment=augment,
        )
    }
    if validation_size:
        eval_iters["val"] = input_pipeline.create_eval_iterator(
            config.dataset,
            global_batch_size=eval_batch_size,
            sharding=batch_sharding,
            data_dir=config.data_dir,
            split=input_pipeline.HOLDOUT_SPLIT,
            augment=augment,
            validation_size=validation_size,
        )
    resident = device_resident(config, train_iter, list(eval_iters.values()))
    return Inputs(
        train_iter=train_iter,
        train_feed=feed.TrainFeed(train_iter, mesh, resident=resident),
        eval_splits={
            name: feed.EvalFeed(it, mesh) if resident else it for name, it in eval_iters.items()
        },
        resident=resident,
    )


def device_resident(
    config: ml_collections.ConfigDict,
    train_iter: input_pipeline.TrainIterator,
    eval_iters: list[input_pipeline.EvalIterator],
) -> bool:
    """``config.device_resident_data``, or (unset) whether the splits fit on a device."""
    setting = config.get("device_resident_data")
    if setting is not None:
        return bool(setting)
    iterators = [train_iter, *eval_iters]
    if any(it.host_arrays is None for it in iterators):
        return False
    need = sum(feed.split_bytes(it) for it in iterators)
    return need <= feed.resident_budget(jax.local_devices())
