"""Tests for gbn_jax.trainer.regimes against hand-computed steps and hand-written updates."""

import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from gbn_jax.trainer import regimes

# F1 on MNIST: N = 60,000, |B_S| = 128, |B_L| = 4096, by hand:
#   floor(60000 / 128) = 468 steps per SB epoch, floor(60000 / 4096) = 14 per LB epoch,
#   r = 4096 / 128 = 32. F1's base regime: 50 epochs, LR 0.1 / 0.01 / 1e-3 / 1e-4 from
#   epochs 0 / 10 / 20 / 30.
N_MNIST = 60_000
F1_LRS = [0.1, 0.01, 1e-3, 1e-4]
F1_STEPS = {  # regime_adaptation -> (total_steps, boundary steps)
    True: (50 * 468, [0, 10 * 468, 20 * 468, 30 * 468]),  # 23400; 4680, 9360, 14040
    False: (50 * 14, [0, 10 * 14, 20 * 14, 30 * 14]),  # 700; 140, 280, 420
}
LR_FACTOR = {"none": 1.0, "linear": 32.0, "sqrt": 4.0 * math.sqrt(2.0)}
WARMUP_EPOCHS = 2
WARMUP_STEPS = 2 * 14  # warm-up counts epochs of the run itself, with or without RA


def _f1_config(**overrides):
    config = ml_collections.ConfigDict()
    config.batch_size = 4096
    config.regime = regimes.base_regime("f1")
    config.regime.update(overrides)
    return config


def _reference_lr(step, boundaries, lrs, factor, warmup_steps):
    """The paper's regime by hand: scaled piecewise LR, linear warm-up from unscaled."""
    index = max(i for i, b in enumerate(boundaries) if b <= step)
    lr = lrs[index] * factor
    if step < warmup_steps:
        unscaled = lrs[index]
        lr = unscaled + (lr - unscaled) * step / warmup_steps
    return lr


def test_f1_base_regime_is_the_papers():
    base = regimes.base_regime("f1")
    assert base.reference_batch_size == 128
    assert base.epochs == 50
    assert [e for e, _ in base.lr_schedule] == [0, 10, 20, 30]
    assert [lr for _, lr in base.lr_schedule] == F1_LRS
    assert (base.momentum, base.weight_decay) == (0.9, 1e-4)


@pytest.mark.parametrize("warmup", [0, WARMUP_EPOCHS])
@pytest.mark.parametrize("regime_adaptation", [True, False])
@pytest.mark.parametrize("lr_scaling", ["none", "linear", "sqrt"])
def test_f1_large_batch_variants(lr_scaling, regime_adaptation, warmup):
    config = _f1_config(
        lr_scaling=lr_scaling, regime_adaptation=regime_adaptation, warmup_epochs=warmup
    )
    resolved = regimes.resolve(config, N_MNIST)
    total, boundaries = F1_STEPS[regime_adaptation]
    factor = LR_FACTOR[lr_scaling]
    warmup_steps = WARMUP_STEPS if warmup else 0

    assert resolved.steps_per_epoch == 14
    assert resolved.total_steps == total
    assert resolved.warmup_steps == warmup_steps
    summary = json.loads(json.dumps(resolved.to_dict()))
    assert summary["reference_batch_size"] == 128
    assert summary["batch_size"] == 4096
    assert summary["ratio"] == 32.0
    assert summary["steps_per_epoch"] == 14
    assert summary["total_steps"] == total
    assert summary["epochs"] == pytest.approx(total / 14)
    assert summary["warmup_steps"] == warmup_steps
    assert summary["optimizer"] == "sgd"
    assert (summary["momentum"], summary["weight_decay"]) == (0.9, 1e-4)
    assert [s for s, _ in summary["lr_boundaries"]] == boundaries
    np.testing.assert_allclose(
        [lr for _, lr in summary["lr_boundaries"]], np.array(F1_LRS) * factor, rtol=1e-12
    )

    probes = sorted(
        {0, 1, 13, 14, 27, 28, 29, total - 1} | {s + d for s in boundaries[1:] for d in (-1, 0, 1)}
    )
    got = jax.jit(resolved.learning_rate)(jnp.asarray(probes))
    want = [_reference_lr(s, boundaries, F1_LRS, factor, warmup_steps) for s in probes]
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-6)


def test_warmup_ramps_from_unscaled_to_scaled_lr():
    resolved = regimes.resolve(
        _f1_config(lr_scaling="linear", regime_adaptation=True, warmup_epochs=2), N_MNIST
    )
    lr = jax.jit(resolved.learning_rate)
    # 28 steps from 0.1 to 3.2: +0.1107142857... per step, by hand (3.1 / 28).
    np.testing.assert_allclose(float(lr(0)), 0.1, rtol=1e-6)
    np.testing.assert_allclose(float(lr(7)), 0.1 + 7 * 3.1 / 28, rtol=1e-6)
    np.testing.assert_allclose(float(lr(28)), 3.2, rtol=1e-6)
    # The warm-up sits inside the run: the first drop stays at SB step 4680.
    assert resolved.total_steps == 23400
    np.testing.assert_allclose(float(lr(4680)), 0.32, rtol=1e-6)


def test_regime_adaptation_reproduces_small_batch_steps():
    small = regimes.resolve(_f1_config(batch_size=128), N_MNIST)
    large = regimes.resolve(_f1_config(regime_adaptation=True), N_MNIST)
    assert large.total_steps == small.total_steps == 23400
    assert [s for s, _ in large.lr_boundaries] == [s for s, _ in small.lr_boundaries]
    # 23400 updates at 14 per epoch: 1671.43 passes instead of the nominal 32 * 50.
    assert large.epochs == pytest.approx(23400 / 14)
    assert large.epoch_of(4680) == pytest.approx(4680 / 14)


def test_fractional_epochs_truncate_to_steps():
    # N = 1000: 15 steps per epoch at 64, 31 at 32. int(2.5 * 15) = 37, int(1.7 * 15) = 25,
    # int(0.45 * 15) = 6; with RA int(2.5 * 31) = 77, int(1.7 * 31) = 52 (truncated, not
    # rounded: 6.75 and 52.7 would round up).
    regime = dict(
        reference_batch_size=32,
        batch_size=64,
        epochs=2.5,
        lr_schedule=((0, 0.2), (1.7, 0.02)),
        weight_decay=((0.0, 1e-3), (0.45, 1e-4)),
    )
    off = regimes.resolve(regime, 1000)
    assert (off.total_steps, off.lr_boundaries) == (37, ((0, 0.2), (25, 0.02)))
    assert off.weight_decay_boundaries == ((0, 1e-3), (6, 1e-4))
    on = regimes.resolve(dict(regime, regime_adaptation=True), 1000)
    assert (on.total_steps, on.lr_boundaries) == (77, ((0, 0.2), (52, 0.02)))
    assert on.to_dict()["epochs"] == pytest.approx(77 / 15)


def test_config_forms_agree():
    schedule = ((0, 0.1), (10, 0.01), (20, 1e-3), (30, 1e-4))
    flat = dict(reference_batch_size=128, batch_size=4096, epochs=50, lr_schedule=schedule)
    forms = [
        flat,
        ml_collections.ConfigDict(flat),
        dict(batch_size=4096, regime={k: v for k, v in flat.items() if k != "batch_size"}),
        # The regime's batch_size wins over the experiment's.
        dict(batch_size=64, regime=flat),
        dict(flat, lr_schedule={0: 0.1, 10: 0.01, 20: 1e-3, 30: 1e-4}),
        ml_collections.ConfigDict(
            dict(flat, lr_schedule={"0": 0.1, "10": 0.01, "20": 1e-3, "30": 1e-4})
        ),
    ]
    for form in forms:
        resolved = regimes.resolve(form, N_MNIST)
        assert resolved.batch_size == 4096
        assert resolved.lr_boundaries == ((0, 0.1), (140, 0.01), (280, 1e-3), (420, 1e-4))


def _sgd_regime(nesterov):
    # N = 40 at batch 8: 5 steps per epoch, so every change below happens at step 5.
    return dict(
        reference_batch_size=8,
        batch_size=8,
        epochs=2,
        lr_schedule=((0, 0.5), (1, 0.1)),
        momentum=0.9,
        nesterov=nesterov,
        weight_decay=((0, 0.05), (1, 0.01)),
        optimizer="sgd",
    )


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_pytorch_style_update(nesterov):
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 2)), "b": rng.normal(size=(2,))}
    grads = [{k: rng.normal(size=v.shape) for k, v in params.items()} for _ in range(7)]
    tx = regimes.resolve(_sgd_regime(nesterov), 40).optimizer()

    state = tx.init(jax.tree.map(jnp.asarray, params))
    got = jax.tree.map(jnp.asarray, params)
    update = jax.jit(tx.update)
    want = {k: v.copy() for k, v in params.items()}
    buf = {k: np.zeros_like(v) for k, v in params.items()}
    for t, g in enumerate(grads):
        updates, state = update(jax.tree.map(jnp.asarray, g), state, got)
        got = optax.apply_updates(got, updates)
        # torch.optim.SGD: d = g + wd * w; buf = mu * buf + d; Nesterov d += mu * buf.
        lr, wd = (0.5, 0.05) if t < 5 else (0.1, 0.01)
        for k in want:
            d = g[k] + wd * want[k]
            buf[k] = 0.9 * buf[k] + d
            step = d + 0.9 * buf[k] if nesterov else buf[k]
            want[k] = want[k] - lr * step
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("clip", "norm", "expected_norm"),
    [(5.0, 10.0, 5.0), (5.0, 2.0, 2.0), (None, 10.0, 10.0), (0, 10.0, 10.0)],
)
def test_gradient_clipping_by_global_norm(clip, norm, expected_norm):
    rng = np.random.default_rng(1)
    grads = {"w": rng.normal(size=(2, 2)), "b": rng.normal(size=(3,))}
    global_norm = math.sqrt(sum(float(np.sum(v**2)) for v in grads.values()))
    grads = {k: v * norm / global_norm for k, v in grads.items()}  # global norm = `norm`
    regime = dict(
        reference_batch_size=4,
        batch_size=4,
        epochs=1,
        lr_schedule=((0, 1.0),),
        grad_clip_norm=clip,
    )
    tx = regimes.resolve(regime, 8).optimizer()
    params = {k: jnp.ones_like(v) for k, v in grads.items()}
    updates, _ = tx.update(jax.tree.map(jnp.asarray, grads), tx.init(params), params)
    for k in grads:  # lr 1, no momentum, no decay: the update is minus the clipped grad
        np.testing.assert_allclose(
            np.asarray(updates[k]), -grads[k] * expected_norm / norm, rtol=1e-5
        )


def _layer_params(rng):
    return {
        "dense": {"kernel": rng.normal(size=(4, 3)), "bias": rng.normal(size=(3,))},
        "norm": {"scale": 1 + 0.1 * rng.normal(size=(3,)), "bias": rng.normal(size=(3,))},
    }


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_lars_lamb_skip_decay_and_trust_ratio_on_1d_params(name):
    rng = np.random.default_rng(2)
    params = _layer_params(rng)
    grads = jax.tree.map(lambda p: 0.3 * rng.normal(size=p.shape), params)
    lr, wd, tc = 0.7, 0.01, 0.02
    regime = dict(
        reference_batch_size=4,
        batch_size=4,
        epochs=1,
        lr_schedule=((0, lr),),
        momentum=0.9,
        weight_decay=wd,
        trust_coefficient=tc,
        optimizer=name,
    )
    tx = regimes.resolve(regime, 8).optimizer()
    jparams = jax.tree.map(jnp.asarray, params)
    updates, _ = tx.update(jax.tree.map(jnp.asarray, grads), tx.init(jparams), jparams)

    def first_step(g, w, decayed):
        if name == "lamb":  # bias-corrected Adam direction after one step: g / (|g| + eps)
            g = g / (np.abs(g) + 1e-6)
        if not decayed:  # 1-D parameters: plain step, no decay, no trust ratio
            return -lr * g
        u = g + wd * w
        trust = (tc if name == "lars" else 1.0) * np.linalg.norm(w) / np.linalg.norm(u)
        return -lr * trust * u

    for path, got in jax.tree_util.tree_leaves_with_path(updates):
        keys = [p.key for p in path]
        w, g = params[keys[0]][keys[1]], grads[keys[0]][keys[1]]
        want = first_step(g, w, decayed=w.ndim > 1)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, err_msg=str(keys))


def test_alexnet_weight_decay_switches_off_at_epoch_15():
    # N = 2560: 10 steps per epoch at the reference 256, 5 at 512.
    base = regimes.base_regime("alexnet")
    assert base.reference_batch_size == 256
    for regime_adaptation, clock in [(False, 5), (True, 10)]:
        regime = dict(base, batch_size=512, regime_adaptation=regime_adaptation)
        resolved = regimes.resolve(regime, 2560)
        assert resolved.weight_decay_boundaries == ((0, 5e-4), (15 * clock, 0.0))
        steps = [s for s, _ in resolved.lr_boundaries]
        assert steps == [e * clock for e in (0, 10, 15, 20, 25)]
        assert resolved.to_dict()["weight_decay"] == [[0, 5e-4], [15 * clock, 0.0]]
        decay = jax.jit(resolved.weight_decay)(jnp.asarray([0, 15 * clock - 1, 15 * clock]))
        np.testing.assert_allclose(np.asarray(decay), [5e-4, 5e-4, 0.0], rtol=1e-6)


def test_base_regimes_cover_every_model():
    names = {"f1", "c1", "c3", "resnet_cifar", "wide_resnet", "vgg", "alexnet", "resnet50"}
    assert names <= set(regimes.BASE_REGIMES)
    assert regimes.base_regime("c3").to_dict() == regimes.base_regime("c1").to_dict()
    assert (
        regimes.base_regime("resnet44").to_dict() == regimes.base_regime("resnet_cifar").to_dict()
    )
    assert dict(regimes.base_regime("resnet_cifar").lr_schedule) == {
        0: 0.1,
        81: 0.01,
        122: 1e-3,
        164: 1e-4,
    }
    assert dict(regimes.base_regime("wide_resnet").lr_schedule)[60] == 0.02
    assert dict(regimes.base_regime("c1").lr_schedule)[60] == 1e-2  # the LR rises
    assert regimes.base_regime("c1").momentum == 0.0
    for name in names:
        base = regimes.base_regime(name)
        resolved = regimes.resolve(dict(base, batch_size=base.reference_batch_size), 50_000)
        per_epoch = 50_000 // base.reference_batch_size
        assert resolved.total_steps == int(base.epochs * per_epoch), name
        assert [s for s, _ in resolved.lr_boundaries] == [
            int(e * per_epoch) for e, _ in base.lr_schedule
        ], name


def _valid():
    return dict(
        reference_batch_size=128,
        batch_size=4096,
        epochs=50,
        lr_schedule=((0, 0.1), (10, 0.01)),
        regime_adaptation=True,
    )


@pytest.mark.parametrize(
    ("change", "num_train", "match"),
    [
        (dict(batch_size=0), N_MNIST, "batch_size=0"),
        (dict(batch_size=-8), N_MNIST, "batch_size=-8"),
        (dict(reference_batch_size=0), N_MNIST, "reference_batch_size=0"),
        ({}, 0, "num_train_examples=0"),
        (dict(epochs=0), N_MNIST, "epochs=0"),
        (dict(epochs=-3), N_MNIST, "epochs=-3"),
        (dict(batch_size=64), N_MNIST, "batch_size=64"),
        (dict(lr_schedule=((0, 0.1), (60, 0.01))), N_MNIST, "epoch 60"),
        (dict(lr_schedule=((0, 0.1), (20, 0.01), (10, 1e-3))), N_MNIST, "increasing"),
        (dict(lr_schedule=((1, 0.1), (10, 0.01))), N_MNIST, "start at epoch 0"),
        (dict(weight_decay=((0, 1e-4), (70, 0.0))), N_MNIST, "epoch 70"),
        (dict(lr_scaling="cubic"), N_MNIST, "lr_scaling='cubic'"),
        (dict(optimizer="adamw"), N_MNIST, "adamw"),
        ({}, 4000, "num_train_examples=4000"),  # smaller than one batch of 4096
        (dict(warmup_epochs=51, regime_adaptation=False), N_MNIST, "warmup_epochs=51"),
        (dict(grad_clip_norm=-5.0), N_MNIST, "grad_clip_norm=-5.0"),
        (dict(momentum=1.0), N_MNIST, "momentum=1.0"),
        (dict(weight_decay=-1e-4), N_MNIST, "weight_decay=-0.0001"),
    ],
)
def test_bad_regimes_raise(change, num_train, match):
    with pytest.raises(ValueError, match=match):
        regimes.resolve(dict(_valid(), **change), num_train)


def test_unknown_base_regime_raises():
    with pytest.raises(ValueError, match="name='mlp'"):
        regimes.base_regime("mlp")
    with pytest.raises(ValueError, match="regime='f1'"):
        regimes.resolve(dict(batch_size=4096, regime="f1"), N_MNIST)


# ------------------------------------------------------------ the authors' protocol


def test_momentum_reset_matches_numpy_sgd_restarted_every_epoch():
    # N = 40 at batch 8: 5 steps per epoch, so the buffer restarts at steps 5 and 10.
    config = dict(_sgd_regime(False), epochs=3, momentum_reset=True, grad_clip_norm=2.0)
    resolved = regimes.resolve(config, 40)
    assert resolved.steps_per_epoch == 5 and resolved.to_dict()["momentum_reset"]
    rng = np.random.default_rng(4)
    params = {"w": rng.normal(size=(4, 3)), "b": rng.normal(size=(3,))}
    grads = [{k: 3 * rng.normal(size=v.shape) for k, v in params.items()} for _ in range(13)]
    tx = resolved.optimizer()
    state = tx.init(jax.tree.map(jnp.asarray, params))
    got = jax.tree.map(jnp.asarray, params)
    update = jax.jit(tx.update)
    want = {k: v.copy() for k, v in params.items()}
    buf = {k: np.zeros_like(v) for k, v in params.items()}
    for t, g in enumerate(grads):
        updates, state = update(jax.tree.map(jnp.asarray, g), state, got)
        got = optax.apply_updates(got, updates)
        # The authors: a new torch.optim.SGD (empty buffers) at every epoch's start.
        if t % 5 == 0:
            buf = {k: np.zeros_like(v) for k, v in params.items()}
        norm = np.sqrt(sum(np.sum(v**2) for v in g.values()))
        scale = min(1.0, 2.0 / norm)
        lr, wd = (0.5, 0.05) if t < 5 else (0.1, 0.01)
        for k in want:
            d = scale * g[k] + wd * want[k]
            buf[k] = 0.9 * buf[k] + d
            want[k] = want[k] - lr * buf[k]
        if t == 5:  # Right after a boundary the buffer holds that update's gradient only.
            trace = [s for s in jax.tree.leaves(state) if np.shape(s) == (4, 3)]
            np.testing.assert_allclose(np.asarray(trace[0]), buf["w"], rtol=1e-5, atol=1e-6)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-5, atol=1e-6)


def test_momentum_reset_changes_only_the_buffer_not_the_schedule():
    config = dict(_sgd_regime(False), momentum_reset=True)
    plain = regimes.resolve(dict(_sgd_regime(False)), 40)
    reset = regimes.resolve(config, 40)
    assert reset.lr_boundaries == plain.lr_boundaries and reset.total_steps == plain.total_steps
    with pytest.raises(ValueError, match="momentum_reset"):
        regimes.resolve(dict(config, optimizer="lars"), 40).optimizer()
    with pytest.raises(ValueError, match="period"):
        regimes.reset_every(optax.trace(0.9), 0)


def test_keep_last_batch_counts_the_partial_batch():
    # 60000 = 14 * 4096 + 2656: 15 steps per epoch with the partial batch, 14 without.
    kept = regimes.resolve(_f1_config(batch_size=4096, keep_last_batch=True), 60_000)
    dropped = regimes.resolve(_f1_config(batch_size=4096), 60_000)
    assert (kept.steps_per_epoch, dropped.steps_per_epoch) == (15, 14)
    assert kept.total_steps == 750 and kept.lr_boundaries[1] == (150, 0.01)
    ra = regimes.resolve(
        _f1_config(batch_size=4096, keep_last_batch=True, regime_adaptation=True), 60_000
    )
    assert ra.reference_steps_per_epoch == 469 and ra.total_steps == 50 * 469


@pytest.mark.parametrize(
    ("batch", "reference", "lr_scaling", "expected"),
    [
        (2048, 256, "sqrt", 0.1 * math.sqrt(8)),
        (4096, 128, "sqrt", 0.1 * math.sqrt(32)),
        (2048, 256, "linear", 0.8),
        (2048, 256, "none", 0.1),
        (2048, None, "sqrt", 0.4),
    ],
)
def test_lr_scaling_reference(batch, reference, lr_scaling, expected):
    config = _f1_config(batch_size=batch, lr_scaling=lr_scaling, lr_scaling_reference=reference)
    resolved = regimes.resolve(config, 60_000)
    assert math.isclose(resolved.lr_boundaries[0][1], expected, rel_tol=1e-12)
    # Only the LR moves: the clock still runs on |B_S| = 128.
    assert resolved.reference_steps_per_epoch == 468
