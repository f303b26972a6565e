"""Tests for gbn_jax.models: shapes, parameter counts, norm swap, dropout, dtypes.

Big models are only traced (jax.eval_shape); real forward passes run on tiny inputs.
Parameter counts are checked against published figures and against layer-by-layer
arithmetic written here from each network's definition.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from gbn_jax.ghost_norm import GhostBatchNorm
from gbn_jax.models import MODELS, base, get_model, make_norm

# (name, num_classes, input shape, kwargs) for shape and count checks.
ZOO = {
    "f1": (10, (4, 28, 28, 1), {}),
    "c1": (10, (4, 32, 32, 3), {}),
    "c3": (100, (4, 32, 32, 3), {}),
    "resnet_cifar": (10, (4, 32, 32, 3), {}),
    "resnet44": (10, (4, 32, 32, 3), {}),
    "resnet44_a": (10, (4, 32, 32, 3), {"shortcut": "A"}),
    "wide_resnet": (100, (4, 32, 32, 3), {}),
    "wrn16_4": (100, (4, 32, 32, 3), {"dropout_rate": 0.3}),
    "vgg": (10, (4, 32, 32, 3), {}),
    "vgg16_mlp": (10, (4, 32, 32, 3), {"classifier_width": 4096}),
    "alexnet": (1000, (4, 224, 224, 3), {}),
    "resnet50": (1000, (4, 224, 224, 3), {}),
}


def _registry_name(key):
    return {"resnet44_a": "resnet44", "vgg16_mlp": "vgg16"}.get(key, key)


def _num(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _key(seed):
    # "rbg" keys compile far faster than threefry on CPU, which keeps the tests quick.
    return jax.random.key(seed, impl="rbg")


def _init_rngs(seed=0):
    return {"params": _key(seed), "dropout": _key(seed + 1000)}


def _normal(seed, shape, scale=1.0, shift=0.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape) + shift).astype(np.float32)


# Hand arithmetic for parameter counts.
def conv_p(k, cin, cout, bias=False):
    return k * k * cin * cout + (cout if bias else 0)


def dense_p(fan_in, fan_out, bias=True):
    return fan_in * fan_out + (fan_out if bias else 0)


def bn_p(c):
    return 2 * c  # scale and bias


@pytest.fixture(scope="module")
def traced():
    """Per zoo entry: (param shapes, batch_stats shapes, train output, eval output)."""
    out = {}
    for key, (num_classes, shape, kwargs) in ZOO.items():
        model = get_model(_registry_name(key), num_classes=num_classes, **kwargs)
        x = jax.ShapeDtypeStruct(shape, jnp.float32)
        variables = jax.eval_shape(lambda x, m=model: m.init(_init_rngs(), x, train=False), x)
        train_out = jax.eval_shape(
            lambda v, x, m=model: m.apply(
                v, x, train=True, rngs={"dropout": _key(1)}, mutable=["batch_stats"]
            ),
            variables,
            x,
        )
        eval_out = jax.eval_shape(lambda v, x, m=model: m.apply(v, x, train=False), variables, x)
        out[key] = (variables["params"], variables["batch_stats"], train_out, eval_out)
    return out


def test_registry_names_match_interface():
    expected = {"f1", "c1", "c3", "resnet_cifar", "resnet44", "wide_resnet", "wrn16_4"}
    expected |= {"vgg", "vgg16", "alexnet", "resnet50"}
    assert set(MODELS) == expected


@pytest.mark.parametrize("key", sorted(ZOO))
def test_output_shapes_and_float32_logits(traced, key):
    num_classes, shape, _ = ZOO[key]
    params, batch_stats, (logits, updates), eval_logits = traced[key]
    for out in (logits, eval_logits):
        assert out.shape == (shape[0], num_classes)
        assert out.dtype == jnp.float32
    # training returns new running statistics of exactly the stored structure
    assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(batch_stats)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))


def test_f1_count(traced):
    hand = dense_p(784, 512) + 4 * dense_p(512, 512) + 5 * bn_p(512) + dense_p(512, 10)
    assert _num(traced["f1"][0]) == hand
    assert _num(traced["f1"][1]) == 5 * 2 * 512  # running mean and var per layer


@pytest.mark.parametrize("key,classes", [("c1", 10), ("c3", 100)])
def test_keskar_c_count(traced, key, classes):
    flat = 64 * 7 * 7  # 32 -> conv (pad 2) 32 -> pool 3/2 15 -> conv 15 -> pool 7
    hand = conv_p(5, 3, 64) + bn_p(64) + conv_p(5, 64, 64) + bn_p(64)
    hand += dense_p(flat, 384, bias=False) + bn_p(384) + dense_p(384, 192, bias=False)
    hand += bn_p(192) + dense_p(192, classes)
    assert _num(traced[key][0]) == hand


def _resnet_cifar_hand(n, classes, shortcut):
    total = conv_p(3, 3, 16) + bn_p(16)
    cin = 16
    for width in (16, 32, 64):
        for _ in range(n):
            total += conv_p(3, cin, width) + conv_p(3, width, width) + 2 * bn_p(width)
            if cin != width and shortcut == "B":
                total += conv_p(1, cin, width) + bn_p(width)
            cin = width
    return total + dense_p(64, classes)


def test_resnet44_count(traced):
    option_a = _resnet_cifar_hand(7, 10, "A")
    assert _num(traced["resnet44_a"][0]) == option_a
    assert abs(option_a - 0.66e6) < 0.005e6  # He et al.: 0.66M
    assert _num(traced["resnet44"][0]) == _resnet_cifar_hand(7, 10, "B")
    assert _num(traced["resnet_cifar"][0]) == _num(traced["resnet44"][0])
    # option B adds exactly the two projections (16->32, 32->64) with their norms
    extra = conv_p(1, 16, 32) + bn_p(32) + conv_p(1, 32, 64) + bn_p(64)
    assert _num(traced["resnet44"][0]) - option_a == extra


def test_wrn16_4_count(traced):
    total = conv_p(3, 3, 16)
    cin = 16
    for width in (64, 128, 256):
        for _ in range(2):
            total += bn_p(cin) + conv_p(3, cin, width) + bn_p(width) + conv_p(3, width, width)
            if cin != width:
                total += conv_p(1, cin, width)
            cin = width
    total += bn_p(256) + dense_p(256, 100)
    assert _num(traced["wide_resnet"][0]) == total
    assert _num(traced["wrn16_4"][0]) == total  # dropout adds no parameters
    assert abs(total - 2.7e6) < 0.1e6  # Zagoruyko & Komodakis: 2.7M


def _vgg16_features():
    total, cin = 0, 3
    for width in (64, 64, 128, 128, 256, 256, 256) + (512,) * 6:
        total += conv_p(3, cin, width, bias=True) + bn_p(width)
        cin = width
    return total


def test_vgg16_count(traced):
    assert _num(traced["vgg"][0]) == _vgg16_features() + dense_p(512, 10)
    mlp = dense_p(512, 4096) + dense_p(4096, 4096) + dense_p(4096, 10)
    assert _num(traced["vgg16_mlp"][0]) == _vgg16_features() + mlp


def test_alexnet_count(traced):
    convs = [(11, 3, 64), (5, 64, 192), (3, 192, 384), (3, 384, 256), (3, 256, 256)]
    total = sum(conv_p(k, cin, cout) + bn_p(cout) for k, cin, cout in convs)
    total += dense_p(256 * 6 * 6, 4096, bias=False) + bn_p(4096)
    total += dense_p(4096, 4096, bias=False) + bn_p(4096) + dense_p(4096, 1000)
    assert _num(traced["alexnet"][0]) == total


def test_resnet50_count(traced):
    assert _num(traced["resnet50"][0]) == 25_557_032  # torchvision resnet50 (v1 and v1.5)


def _module_log(model, variables, x, **apply_kwargs):
    """Every submodule instance called during apply (module-tree inspection, traced only)."""
    seen = []

    def record(module, method_name):
        seen.append(module)
        return False

    apply = lambda v, x: model.apply(v, x, capture_intermediates=record, **apply_kwargs)
    jax.eval_shape(apply, variables, x)
    return seen


@pytest.fixture(scope="module")
def f1_pair():
    """F1 in batch and ghost (size 4, "mean" update) mode sharing the same variables."""
    batch = get_model("f1", num_classes=10, norm="batch", bn_momentum=0.8)
    ghost = get_model(
        "f1",
        num_classes=10,
        norm="ghost",
        ghost_batch_size=4,
        running_update="mean",
        bn_momentum=0.8,
    )
    x = _normal(3, (8, 28, 28, 1))
    variables = jax.jit(lambda x: batch.init(_init_rngs(4), x, train=False))(x)
    # non-trivial scale/bias so the comparison is not only about the centering
    params = jax.tree.map(lambda p: p + _normal(5, p.shape, 0.1), variables["params"])
    return batch, ghost, {**variables, "params": params}, x


@functools.partial(jax.jit, static_argnums=0)
def _train_logits(model, variables, x):
    return model.apply(variables, x, train=True, mutable=["batch_stats"])[0]


def test_norm_choice_swaps_the_layer(f1_pair):
    batch, ghost, variables, x = f1_pair
    kw = dict(train=True, mutable=["batch_stats", "intermediates"])
    batch_norms = [m for m in _module_log(batch, variables, x, **kw) if "norm" in (m.name or "")]
    ghost_norms = [m for m in _module_log(ghost, variables, x, **kw) if "norm" in (m.name or "")]
    assert len(batch_norms) == len(ghost_norms) == 5
    assert all(type(m) is nn.BatchNorm for m in batch_norms)
    assert all(type(m) is GhostBatchNorm for m in ghost_norms)
    for m in ghost_norms:
        assert (m.ghost_batch_size, m.running_update, m.momentum) == (4, "mean", 0.8)
        assert m.layout == "ghost_batches"  # F1's committed runs' rounding
    assert all(m.use_running_average is False for m in batch_norms + ghost_norms)
    # both modes have the same variable tree, so checkpoints move between them
    ghost_vars = jax.eval_shape(lambda x: ghost.init(_init_rngs(4), x, train=False), x)
    assert jax.tree.structure(ghost_vars) == jax.tree.structure(variables)


def test_ghost_groups_are_independent_and_batch_is_not(f1_pair):
    batch, ghost, variables, x = f1_pair
    other = x.copy()
    other[4:] = _normal(6, x[4:].shape, 3.0, 1.0)

    def train_logits(model, inputs):
        return _train_logits(model, variables, inputs)

    ghost_a, ghost_b = train_logits(ghost, x), train_logits(ghost, other)
    np.testing.assert_allclose(ghost_a[:4], ghost_b[:4], rtol=1e-5, atol=1e-5)
    assert not np.allclose(ghost_a[4:], ghost_b[4:], atol=1e-3)
    # a ghost batch is normalized exactly like plain batch norm on those 4 examples
    np.testing.assert_allclose(ghost_a[:4], train_logits(batch, x[:4]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ghost_a[4:], train_logits(batch, x[4:]), rtol=1e-4, atol=1e-5)
    batch_a, batch_b = train_logits(batch, x), train_logits(batch, other)
    assert not np.allclose(batch_a[:4], batch_b[:4], atol=1e-3)


def test_ghost_layout_is_the_split_one_for_f1_only_and_changes_only_rounding(f1_pair):
    """F1 keeps the split layout by default; another model gets the layer's default;
    F1 with layout "input" gives the same outputs and running statistics to rounding."""
    _, ghost, variables, x = f1_pair
    fast = ghost.clone(ghost_layout="input")
    kw = dict(train=True, mutable=["batch_stats", "intermediates"])
    assert {
        m.layout for m in _module_log(fast, variables, x, **kw) if "norm" in (m.name or "")
    } == {"input"}
    for name in MODELS:
        model = get_model(name, num_classes=10, norm="ghost", ghost_batch_size=4)
        assert model.ghost_layout == ("ghost_batches" if name == "f1" else "input"), name
    assert make_norm("ghost", ghost_batch_size=4).keywords["layout"] == "input"
    apply = jax.jit(
        lambda model, v, x: model.apply(v, x, train=True, mutable=["batch_stats"]),
        static_argnums=0,
    )
    (split_logits, split_stats), (own_logits, own_stats) = (
        apply(model, variables, x) for model in (ghost, fast)
    )
    np.testing.assert_allclose(own_logits, split_logits, rtol=1e-4, atol=1e-4)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), own_stats, split_stats
    )


def test_bn_momentum_reaches_running_mean(f1_pair):
    batch, _, variables, x = f1_pair
    apply = jax.jit(lambda v, x: batch.apply(v, x, train=True, mutable=["batch_stats"]))
    _, updates = apply(variables, x)
    dense1 = variables["params"]["dense1"]
    pre = np.asarray(x).reshape(8, -1) @ np.asarray(dense1["kernel"]) + np.asarray(dense1["bias"])
    old = np.asarray(variables["batch_stats"]["norm1"]["mean"])
    expected = 0.8 * old + 0.2 * pre.mean(axis=0)
    np.testing.assert_allclose(updates["batch_stats"]["norm1"]["mean"], expected, atol=1e-5)
    # evaluation normalizes with the running statistics: examples no longer interact
    other = x.copy()
    other[4:] = _normal(9, x[4:].shape, 3.0, 1.0)
    evaluate = jax.jit(lambda v, x: batch.apply(v, x, train=False))
    eval_vars = {**variables, **updates}
    np.testing.assert_allclose(
        evaluate(eval_vars, x)[:4], evaluate(eval_vars, other)[:4], rtol=1e-5, atol=1e-6
    )


@pytest.fixture(scope="module")
def c1_small():
    model = get_model("c1", num_classes=10)
    x = _normal(7, (4, 16, 16, 3))
    return model, jax.jit(lambda x: model.init(_init_rngs(8), x, train=False))(x), x


def test_dropout_only_in_training(c1_small):
    model, variables, x = c1_small

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def apply(model, train, key):
        out = model.apply(variables, x, train=train, rngs={"dropout": key}, mutable=["batch_stats"])
        return out[0]

    run = lambda train, key: np.asarray(apply(model, train, key))
    k1, k2 = _key(10), _key(11)
    np.testing.assert_array_equal(run(True, k1), run(True, k1))
    assert not np.allclose(run(True, k1), run(True, k2), atol=1e-4)
    np.testing.assert_array_equal(run(False, k1), run(False, k2))
    # evaluation needs no dropout rng at all
    eval_fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
    np.testing.assert_allclose(eval_fn(variables, x), run(False, k1), rtol=1e-5, atol=1e-6)
    # with the rate at 0 the two training runs agree: dropout is the only randomness
    no_drop = get_model("c1", num_classes=10, dropout_rate=0.0)
    np.testing.assert_array_equal(apply(no_drop, True, k1), apply(no_drop, True, k2))


@pytest.mark.parametrize(
    "name,kwargs,rates",
    [
        ("c3", {}, [0.5, 0.5]),
        ("alexnet", {}, [0.5, 0.5]),
        ("wide_resnet", {"dropout_rate": 0.3}, [0.3] * 6),
        ("vgg", {"classifier_width": 64}, [0.5, 0.5]),
    ],
)
def test_dropout_layers_where_the_nets_have_them(name, kwargs, rates):
    model = get_model(name, num_classes=10, **kwargs)
    shape = (2, 224, 224, 3) if name == "alexnet" else (2, 32, 32, 3)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)

    variables = jax.eval_shape(lambda x: model.init(_init_rngs(), x, train=False), x)
    kw = dict(rngs={"dropout": _key(0)}, mutable=["batch_stats", "intermediates"])
    train_mods = _module_log(model, variables, x, train=True, **kw)
    assert [m.rate for m in train_mods if isinstance(m, nn.Dropout)] == rates
    assert all(m.deterministic is False for m in train_mods if isinstance(m, nn.Dropout))
    eval_mods = _module_log(model, variables, x, train=False, **kw)
    assert all(m.deterministic is True for m in eval_mods if isinstance(m, nn.Dropout))


def test_bfloat16_compute_float32_params_and_logits():
    model = get_model("resnet_cifar", num_classes=10, depth=8, dtype="bfloat16")
    ref = get_model("resnet_cifar", num_classes=10, depth=8)
    x = _normal(12, (4, 8, 8, 3))
    variables = jax.jit(lambda x: model.init(_init_rngs(13), x, train=False))(x)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))

    @jax.jit
    def train_apply(variables, x):
        bf16 = model.apply(
            variables,
            x,
            train=True,
            capture_intermediates=True,
            mutable=["batch_stats", "intermediates"],
        )
        return bf16, ref.apply(variables, x, train=True, mutable=["batch_stats"])[0]

    (logits, state), ref_logits = train_apply(variables, x)
    assert logits.dtype == jnp.float32 and ref_logits.dtype == jnp.float32
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(state["batch_stats"]))
    acts = state["intermediates"]["stage1_block1"]
    assert acts["conv1"]["__call__"][0].dtype == jnp.bfloat16
    assert acts["norm1"]["__call__"][0].dtype == jnp.bfloat16
    # the same parameters computed in float32 give nearly the same logits
    np.testing.assert_allclose(logits, ref_logits, rtol=0.1, atol=0.1)


def test_make_norm_returns_the_chosen_layer():
    assert make_norm("batch").func is nn.BatchNorm
    ghost = make_norm("ghost", ghost_batch_size=np.int64(32), momentum=0.95)
    assert ghost.func is GhostBatchNorm
    assert ghost.keywords["ghost_batch_size"] == 32
    assert ghost.keywords["momentum"] == 0.95
    assert ghost.keywords["param_dtype"] == jnp.float32
    # The layer's own rule for momentum: [0, 1], 1 keeping the running statistics fixed.
    assert make_norm("ghost", ghost_batch_size=8, momentum=1.0).keywords["momentum"] == 1.0


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: get_model("resnet18", num_classes=10), "known models.*resnet44"),
        (lambda: get_model("c1", num_classes=10, norm="layer"), "norm='layer'"),
        (lambda: get_model("c1", num_classes=10, norm="ghost"), "ghost_batch_size=128"),
        (lambda: make_norm("ghost", ghost_batch_size=0), "ghost_batch_size=0"),
        (lambda: make_norm("ghost", ghost_batch_size=8, running_update="x"), "'x'"),
        (lambda: make_norm("ghost", ghost_batch_size=8, layout="NHWC"), "layout='NHWC'"),
        (
            lambda: get_model(
                "f1", num_classes=10, norm="ghost", ghost_batch_size=4, ghost_layout="x"
            ),
            "layout='x'",
        ),
        (lambda: make_norm("batch", momentum=1.5), "momentum=1.5"),
        (lambda: make_norm("ghost", ghost_batch_size=True), "ghost_batch_size=True"),
        (lambda: get_model("c1", num_classes=10, dtype="int8"), "int8"),
        (lambda: get_model("c1", num_classes=10, dtype="float33"), "float33"),
        (lambda: get_model("resnet_cifar", num_classes=10, depth=45), "depth=45"),
        (lambda: get_model("resnet_cifar", num_classes=10, shortcut="C"), "'C'"),
        (lambda: get_model("wide_resnet", num_classes=10, depth=18), "depth=18"),
        (lambda: get_model("resnet44", num_classes=10, depth=56), "resnet_cifar"),
        (lambda: get_model("vgg", num_classes=10, depht=16), "depht"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------------ conv_input barriers


def test_conv_input_places_barriers_only_when_switched_on():
    x = jax.random.normal(jax.random.key(3), (4, 5, 5, 3))

    def barriers() -> bool:
        # A fresh function each time: JAX reuses the trace of a function it has seen.
        return "optimization_barrier" in str(jax.make_jaxpr(lambda v: base.conv_input(v))(x))

    assert not barriers()
    with base.conv_input_barriers():
        assert barriers()
        with base.conv_input_barriers(False):
            assert not barriers()
        assert barriers()
        np.testing.assert_array_equal(base.conv_input(x), x)
        grad = jax.grad(lambda v: jnp.sum(jnp.sin(base.conv_input(v))))(x)
    np.testing.assert_allclose(grad, np.cos(np.asarray(x)), rtol=1e-6)
    assert not barriers()


def test_cpu_options_keep_barriers_and_the_gradients():
    """Traced in steps.tracing(XLA_CPU_FAST_OPTIONS) and compiled with those options, a
    ResNet keeps conv_input's barriers; its loss gradient then differs from the plain
    program's only by rounding."""
    from gbn_jax.trainer import steps

    model = get_model(
        "resnet_cifar", num_classes=10, depth=8, width=4, norm="ghost", ghost_batch_size=4
    )
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(16, 8, 8, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, 16))
    # Parameters and statistics drawn with numpy in the model's shapes: its own init
    # would compile a random-number program per parameter shape (most of this test's
    # time on 2 cores), and any values serve to compare two compilations.
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(6), x, train=False), x[:1])
    variables = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.5, s.dtype), shapes)

    def loss(params):
        logits, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        picked = jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)
        return -picked.mean()

    options = steps.XLA_CPU_FAST_OPTIONS
    with steps.tracing(options):
        kept = jax.jit(jax.grad(loss)).lower(variables["params"]).compile(compiler_options=options)
    with steps.tracing({}):
        plain = jax.jit(jax.grad(loss)).lower(variables["params"]).compile()
    assert "opt-barrier" in kept.as_text()
    assert "opt-barrier" not in plain.as_text()
    g_kept = jax.tree.leaves(kept(variables["params"]))
    g_plain = jax.tree.leaves(plain(variables["params"]))
    for a, b in zip(g_kept, g_plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------ normalization scale init


@pytest.mark.parametrize("norm", ["batch", "ghost"])
def test_bn_scale_init_uniform_is_u01_and_ones_by_default(norm):
    x = jnp.zeros((4, 28, 28, 1))
    scales = {}
    for init in ("ones", "uniform"):
        model = get_model("f1", num_classes=10, norm=norm, ghost_batch_size=2, bn_scale_init=init)
        params = model.init(_init_rngs(3), x, train=False)["params"]
        scales[init] = np.concatenate(
            [np.asarray(params[f"norm{i}"]["scale"]) for i in range(1, 6)]
        )
    assert np.all(scales["ones"] == 1.0)
    u = scales["uniform"]
    assert u.shape == (5 * 512,) and np.all((u >= 0) & (u < 1))
    # 2560 draws of U[0, 1): Kolmogorov-Smirnov against the uniform CDF, and the five
    # layers draw different values.
    assert scipy.stats.kstest(u, "uniform").pvalue > 1e-3
    assert len(np.unique(u.reshape(5, 512)[:, 0])) == 5


def test_bn_scale_init_keeps_a_models_own_scale_init():
    # ResNet-50's zero-initialized residual branch wins over the model-wide init.
    model = get_model("resnet50", num_classes=10, bn_scale_init="uniform", zero_init_residual=True)
    params = model.init(_init_rngs(), jnp.zeros((1, 32, 32, 3)), train=False)["params"]
    blocks = [v for v in params.values() if "norm3" in v]
    assert len(blocks) == 16
    assert all(np.all(np.asarray(b["norm3"]["scale"]) == 0.0) for b in blocks)
    stem = np.asarray(params["stem_norm"]["scale"])
    assert np.all((stem >= 0) & (stem < 1)) and stem.std() > 0.1


def test_bn_scale_init_unknown_raises():
    with pytest.raises(ValueError, match="scale_init"):
        get_model("f1", num_classes=10, bn_scale_init="normal")
