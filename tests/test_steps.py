"""Tests of gbn_jax/trainer/steps.py: several steps per dispatch compute what one step per
dispatch does, bit for bit; metrics accumulate on the device as numpy sums them."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gbn_jax.trainer import steps


class TinyNet(nn.Module):
    """Dense -> BatchNorm -> ReLU -> dropout -> Dense: every kind of state the trainer carries."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(16)(x.reshape(len(x), -1))
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        x = nn.Dropout(0.25, deterministic=not train)(x)
        return nn.Dense(3)(x)


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    arrays = {
        "image": rng.integers(0, 256, (40, 4, 4, 1)).astype(np.uint8),
        "label": rng.integers(0, 3, 40).astype(np.int32),
    }
    model = TinyNet()
    schedule = optax.piecewise_constant_schedule(0.3, {3: 0.1})
    tx = optax.chain(optax.clip_by_global_norm(5.0), optax.sgd(schedule, momentum=0.9))
    state = steps.create_train_state(jax.random.key(1), model, tx, (4, 4, 1))
    train_step = steps.make_train_step(model, tx, schedule)

    def batch_fn(arrays, x):
        return {
            "image": arrays["image"][x["index"]].astype(jnp.float32) / 255.0,
            "label": arrays["label"][x["index"]],
        }

    # Seven steps of 8 examples, drawn with repetition.
    index = rng.integers(0, 40, (7, 8)).astype(np.int32)
    return arrays, state, train_step, batch_fn, index


def run_chunks(problem, chunks, length):
    """Runs the 7 steps as dispatches of the given lengths through make_train_loop."""
    arrays, state, train_step, batch_fn, index = problem
    loop = steps.make_train_loop(train_step, batch_fn, jax.random.key(2))
    full = jax.jit(lambda s, a, ar, xs: loop(s, a, ar, xs), donate_argnums=(0, 1))
    first = jax.jit(loop, donate_argnums=(0, 1))
    state = jax.tree.map(jnp.copy, state)
    acc, start = jax.jit(steps.zero_metrics)(), 0  # distinct buffers, to donate
    for n in chunks:
        rows = np.zeros((length, 8), np.int32)
        rows[:n] = index[start : start + n]
        if n == length:
            state, acc, step = full(state, acc, arrays, {"index": rows})
        else:
            state, acc, step = first(state, acc, arrays, {"index": rows}, np.int32(n))
        start += n
        assert int(step) == start
    return jax.device_get((state, acc))


def test_steps_per_dispatch_change_nothing(problem):
    arrays, state, train_step, batch_fn, index = problem
    # The reference: each batch built by its own jitted function, then one jitted step,
    # as the trainer did before it ran several steps per dispatch; metrics summed here.
    step_fn, make_batch = jax.jit(train_step), jax.jit(batch_fn)
    ref = jax.tree.map(jnp.copy, state)
    losses, grad_norms = [], []
    for t in range(7):
        batch = make_batch(arrays, {"index": index[t]})
        ref, metrics = step_fn(ref, batch, jax.random.fold_in(jax.random.key(2), t))
        losses.append(np.float32(metrics["loss"]))
        grad_norms.append(np.float32(metrics["grad_norm"]))
    ref = jax.device_get(ref)
    for chunks, length in [((1,) * 7, 1), ((4, 3), 4), ((2, 2, 2, 1), 3), ((7,), 7)]:
        state_k, acc = run_chunks(problem, chunks, length)
        for a, b in zip(jax.tree.leaves(state_k), jax.tree.leaves(ref), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=f"{chunks=}")
        # Sums in float32, in step order, as the accumulator adds them.
        assert acc["loss"] == np.cumsum(np.asarray(losses, np.float32), dtype=np.float32)[-1]
        assert acc["grad_norm"] == np.cumsum(np.asarray(grad_norms, np.float32))[-1]
        assert acc["count"] == 7 and acc["first_bad_step"] == -1
        assert acc["learning_rate"] == pytest.approx(0.3 * 0.1)  # the last step's rate


@pytest.mark.parametrize("device_loop", [False, True], ids=["program_per_step", "device_loop"])
def test_compiled_loop_matches_with_and_without_a_device_loop(problem, device_loop):
    """`compile_train_loop` as the trainer runs it: one program per step (the CPU's
    default) and the device loop (fori_loop, and the scan for a full chunk) compute
    what `make_train_loop` jitted directly does, bit for bit."""
    arrays, state, train_step, batch_fn, index = problem
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    loop = steps.make_train_loop(train_step, batch_fn, jax.random.key(2))
    state = jax.device_put(jax.tree.map(jnp.copy, state), device)
    acc = jax.jit(steps.zero_metrics, out_shardings=device)()  # distinct buffers
    arrays = jax.device_put(arrays, device)
    shapes = lambda tree: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree
    )
    chunk = {"index": jax.ShapeDtypeStruct((4, 8), jnp.int32, sharding=device)}
    run = steps.compile_train_loop(
        loop, shapes(state), shapes(acc), arrays, chunk,
        compiler_options={}, device_loop=device_loop, scan=True,
    )  # fmt: skip
    start = 0
    for n in (4, 3):  # a full chunk (the scan), then a cut one (the fori_loop)
        rows = np.zeros((4, 8), np.int32)
        rows[:n] = index[start : start + n]
        state, acc, step = run(state, acc, arrays, {"index": jax.device_put(rows, device)}, n)
        start += n
        assert int(step) == start
    expected = run_chunks(problem, (4, 3), 4)
    for a, b in zip(jax.tree.leaves((state, acc)), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_accumulator_records_the_first_bad_step():
    acc = steps.zero_metrics()
    good = {"loss": 1.5, "accuracy": 0.5, "grad_norm": 2.0, "learning_rate": 0.1}
    acc = steps.accumulate_metrics(acc, good, jnp.int32(1))
    acc = steps.accumulate_metrics(acc, dict(good, grad_norm=jnp.inf), jnp.int32(2))
    acc = steps.accumulate_metrics(acc, dict(good, loss=jnp.nan), jnp.int32(3))
    assert int(acc["first_bad_step"]) == 2 and int(acc["count"]) == 3
    assert float(acc["accuracy"]) == 1.5


def test_eval_pass_sums_every_batch_once(problem):
    arrays, state, _, _, _ = problem
    model = TinyNet()
    eval_step = steps.make_eval_step(model)
    positions = np.arange(48).reshape(3, 16)
    mask = positions < 40

    def batch_fn(arrays, x):
        return {
            "image": arrays["image"][x["index"]].astype(jnp.float32) / 255.0,
            "label": arrays["label"][x["index"]],
            "mask": x["mask"],
        }

    xs = {"index": np.where(mask, positions, 0).astype(np.int32), "mask": mask}
    sums = jax.jit(steps.make_eval_pass(eval_step, batch_fn))(state, arrays, xs)
    # Independent: logits of all 40 examples at once, cross-entropy and accuracy in numpy.
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits = np.asarray(
        model.apply(variables, arrays["image"].astype(np.float32) / 255.0, train=False),
        np.float64,
    )
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    labels = arrays["label"]
    assert float(sums["count"]) == 40
    assert float(sums["loss"]) == pytest.approx(-log_probs[np.arange(40), labels].sum(), rel=1e-5)
    assert float(sums["correct"]) == np.sum(logits.argmax(-1) == labels)
