"""The compiled programs the trainer's loop dispatches, built once before it starts.

`build` compiles every program from the shapes and shardings of its inputs, so that no
dispatch waits for a compile, and returns them as one `Programs`. What each program
computes is in ``gbn_jax.trainer.steps``; here they are jitted with the trainer's shardings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gbn_jax.trainer import steps
from gbn_jax.trainer.data import feed


@dataclasses.dataclass(frozen=True)
class Programs:
    """The trainer's compiled programs.

    Attributes:
      train_chunk: ``(state, acc, arrays, xs, n) -> (state, acc, step)``: the first n
        steps of a chunk (`steps.compile_train_loop`), state and accumulator donated.
      zero_accumulator: ``() -> acc``: empty train-metric sums (`steps.zero_metrics`).
      weight_distance: ``state -> ||w_t - w_0||``.
      eval_pass: per device-resident split, ``(state, arrays, xs) -> sums``: its whole
        evaluation in one program.
      eval_batch: ``(state, sums, batch) -> sums``: one host-fed evaluation batch added
        to the sums (donated).
      zero_eval_sums: ``() -> sums``: empty evaluation sums to start a host-fed split.
      noise_scale: ``(state, arrays, xs) -> metrics``: B_simple on row 0 of a chunk
        (`steps.make_noise_scale_measurement`); None when not measured.
    """

    train_chunk: Callable[..., tuple[steps.TrainState, dict, jax.Array]]
    zero_accumulator: Callable[[], dict]
    weight_distance: Callable[[steps.TrainState], jax.Array]
    eval_pass: dict[str, Callable[[steps.TrainState, Any, Any], dict]]
    eval_batch: Callable[[steps.TrainState, dict, dict], dict]
    zero_eval_sums: Callable[[], dict]
    noise_scale: Callable[[steps.TrainState, Any, Any], dict] | None


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying shardings, to lower a program before its inputs exist."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )


def build(
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    learning_rate: optax.Schedule,
    mesh: jax.sharding.Mesh,
    state_shapes: Any,
    acc_shapes: Any,
    train_feed: feed.TrainFeed,
    eval_feeds: dict[str, feed.EvalFeed],
    loop_steps: int,
    dropout_rng: jax.Array,
    compiler_options: dict[str, Any],
    device_loop: bool,
    noise_small_batch: int | None,
) -> Programs:
    """Compiles the trainer's programs.

    Args:
      model: the model.
      tx: the optimizer.
      learning_rate: the schedule inside ``tx`` (reported in the train metrics).
      mesh: the 1-D "data" mesh.
      state_shapes: the TrainState as ShapeDtypeStructs with shardings.
      acc_shapes: the train-metric accumulator likewise.
      train_feed: the training input.
      eval_feeds: the device-resident evaluation splits by metrics prefix.
      loop_steps: K, the rows of a chunk.
      dropout_rng: the run's dropout key.
      compiler_options: XLA options of the train and noise-scale programs.
      device_loop: a chunk's steps in one program (`steps.device_loop`).
      noise_small_batch: b of the B_simple measurement; None: no measurement.

    Returns:
      The programs.
    """
    replicated = NamedSharding(mesh, P())
    on_accelerator = jax.default_backend() != "cpu"
    train_loop = steps.make_train_loop(
        steps.make_train_step(model, tx, learning_rate), train_feed.batch, dropout_rng
    )
    # On accelerators also the K-row scan, whose static trip count spares a host round
    # trip per step; on the CPU (device_loop off) one program per step, since XLA:CPU
    # runs convolutions in a loop body in a slow layout (steps.device_loop).
    train_chunk = steps.compile_train_loop(
        train_loop,
        state_shapes,
        acc_shapes,
        train_feed.arrays,
        train_feed.chunk_shapes(loop_steps),
        compiler_options=compiler_options,
        device_loop=device_loop,
        scan=on_accelerator,
    )
    acc_sharding = jax.tree.map(lambda x: x.sharding, acc_shapes)
    eval_step = steps.make_eval_step(model)
    noise_scale = None
    if noise_small_batch is not None:
        measure = steps.make_noise_scale_measurement(
            model,
            train_feed.batch,
            dropout_rng,
            mesh,
            small_batch_size=noise_small_batch,
            # Micro-batches side by side on accelerators, one after another on the CPU.
            vectorize=on_accelerator,
        )
        # Traced in the options' context, as the train programs are (steps.tracing).
        with steps.tracing(compiler_options):
            noise_scale = (
                jax.jit(measure, out_shardings=replicated, compiler_options=compiler_options)
                .lower(state_shapes, train_feed.arrays, train_feed.chunk_shapes(loop_steps))
                .compile()
            )
    return Programs(
        train_chunk=train_chunk,
        zero_accumulator=jax.jit(steps.zero_metrics, out_shardings=acc_sharding),
        weight_distance=jax.jit(lambda s: steps.weight_distance(s.params, s.params0))
        .lower(state_shapes)
        .compile(),
        eval_pass={
            name: jax.jit(steps.make_eval_pass(eval_step, f.batch))
            .lower(state_shapes, f.arrays, f.xs)
            .compile()
            for name, f in eval_feeds.items()
        },
        eval_batch=jax.jit(
            lambda state, sums, batch: jax.tree.map(jnp.add, sums, eval_step(state, batch)),
            donate_argnums=(1,),
        ),
        zero_eval_sums=jax.jit(
            lambda: {k: jnp.zeros((), jnp.float32) for k in ("loss", "correct", "count")},
            out_shardings=replicated,
        ),
        noise_scale=noise_scale,
    )
