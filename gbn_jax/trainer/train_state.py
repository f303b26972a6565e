"""The train state a run starts from: restored from its checkpoint, or created on the devices.

`spec` lays the state out before it exists: the `steps.TrainState` and the train-metric
sums as shapes, replicated over the mesh, which the programs compile against and a
checkpoint restores onto. `restore_or_create` then gives the loop its start: the newest
checkpoint that restores (state, data position and train-metric sums), or a new state
created on the devices at step 0.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gbn_jax.trainer import checkpointing, input_pipeline, steps


@dataclasses.dataclass(frozen=True)
class StateSpec:
    """How a run's train state is created, and its shapes on the mesh.

    Attributes:
      init: ``rng -> TrainState`` at step 0 (`steps.create_train_state` with the model,
        optimizer and image shape bound).
      rng: the key `init` is called with.
      state: the TrainState as ShapeDtypeStructs carrying their (replicated) shardings.
      acc: the train-metric sums (`steps.zero_metrics`) likewise.
    """

    init: Callable[[jax.Array], steps.TrainState]
    rng: jax.Array
    state: Any
    acc: Any

    @property
    def num_params(self) -> int:
        """The number of model parameters."""
        return sum(math.prod(x.shape) for x in jax.tree.leaves(self.state.params))


@dataclasses.dataclass(frozen=True)
class Start:
    """Where the loop starts.

    Attributes:
      step: the updates taken so far (0 for a new run).
      state: the TrainState at `step`, on the devices.
      acc: the train-metric sums since the last log, on the devices.
      restored: whether `state` comes from a checkpoint.
    """

    step: int
    state: steps.TrainState
    acc: dict
    restored: bool


def spec(
    model: nn.Module,
    tx: optax.GradientTransformation,
    image_shape: tuple[int, ...],
    rng: jax.Array,
    mesh: jax.sharding.Mesh,
) -> StateSpec:
    """The spec of a train state replicated over `mesh` (shapes only; nothing is computed).

    Args:
      model: the model.
      tx: the optimizer.
      image_shape: the shape of one example, e.g. (28, 28, 1).
      rng: the parameter-initialization key.
      mesh: the 1-D "data" mesh.

    Returns:
      The spec.
    """
    init = functools.partial(steps.create_train_state, model=model, tx=tx, image_shape=image_shape)
    replicated = NamedSharding(mesh, P())

    def on_mesh(abstract: Any) -> Any:
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract
        )

    return StateSpec(
        init=init,
        rng=rng,
        state=on_mesh(jax.eval_shape(init, rng)),
        acc=on_mesh(jax.eval_shape(steps.zero_metrics)),
    )


def restore_or_create(
    manager: ocp.CheckpointManager,
    spec: StateSpec,
    train_iter: input_pipeline.TrainIterator,
    zero_accumulator: Callable[[], dict],
) -> Start:
    """The run's start: its newest readable checkpoint, or a new state at step 0.

    A restore also moves `train_iter` to the checkpoint's data position; checkpoints
    that cannot be read are set aside (`checkpointing.restore_latest`).

    Args:
      manager: the run's checkpoint manager (`checkpointing.make_manager`).
      spec: the state's spec.
      train_iter: the training iterator.
      zero_accumulator: ``() -> acc``: empty train-metric sums, for a new run or a
        checkpoint without them.

    Returns:
      The start.

    Raises:
      checkpointing.CheckpointError: there are checkpoints and none can be read.
    """
    state_sharding, acc_sharding = _shardings(spec.state), _shardings(spec.acc)
    restored = checkpointing.restore_latest(
        manager, spec.state, state_sharding, spec.acc, acc_sharding
    )
    if restored is None:
        state = jax.jit(spec.init, out_shardings=state_sharding)(spec.rng)
        return Start(step=0, state=state, acc=zero_accumulator(), restored=False)
    step, state, data_state, acc = restored
    train_iter.set_state(data_state)
    return Start(
        step=step, state=state, acc=zero_accumulator() if acc is None else acc, restored=True
    )


def _shardings(shapes: Any) -> Any:
    """The sharding of each leaf of a tree of ShapeDtypeStructs."""
    return jax.tree.map(lambda x: x.sharding, shapes)
