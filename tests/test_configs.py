"""Tests of the experiment configs (configs/*.py) and their variant logic (config_lib)."""

import importlib.util
import math
import os

import pytest
from absl import flags
from ml_collections import config_flags

from gbn_jax import models
from gbn_jax.trainer import config_lib, regimes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# file -> (dataset, model, |B_S|, |B_L|, training examples)
CONFIGS = {
    "fashion_mnist_f1": ("fashion_mnist", "f1", 128, 4096, 60_000),
    "mnist_f1": ("mnist", "f1", 128, 4096, 60_000),
    "cifar10_c1": ("cifar10", "c1", 128, 4096, 50_000),
    "cifar10_resnet44": ("cifar10", "resnet_cifar", 128, 2048, 50_000),
    "cifar10_vgg": ("cifar10", "vgg", 128, 4096, 50_000),
    "cifar100_c3": ("cifar100", "c3", 128, 4096, 50_000),
    "cifar100_wrn16_4": ("cifar100", "wide_resnet", 128, 1024, 50_000),
    "imagenet_alexnet": ("imagenet2012", "alexnet", 256, 4096, 1_281_167),
    "imagenet_resnet50": ("imagenet2012", "resnet50", 256, 8192, 1_281_167),
}


def config_path(name):
    return os.path.join(ROOT, "configs", f"{name}.py")


def load_module(name):
    spec = importlib.util.spec_from_file_location(f"configs_{name}", config_path(name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def modules():
    return {name: load_module(name) for name in CONFIGS}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_variant_is_the_papers_column(name, modules):
    dataset, model, small, large, num_train = CONFIGS[name]
    expected = {
        # variant: (batch, norm, lr_scaling, regime_adaptation, warmup, optimizer)
        "sb": (small, "batch", "none", False, 0, "sgd"),
        "lb": (large, "batch", "none", False, 0, "sgd"),
        "lb_lr": (large, "batch", "sqrt", False, 0, "sgd"),
        "lb_lr_gbn": (large, "ghost", "sqrt", False, 0, "sgd"),
        "lb_lr_gbn_ra": (large, "ghost", "sqrt", True, 0, "sgd"),
        "goyal": (large, "batch", "linear", False, 5, "sgd"),
        "lars": (large, "batch", "sqrt", False, 0, "lars"),
    }
    assert set(expected) == set(config_lib.VARIANTS)
    for variant, (batch, norm, scaling, ra, warmup, optimizer) in expected.items():
        config = modules[name].get_config(variant)
        got = (
            config.batch_size,
            config.model.norm,
            config.regime.lr_scaling,
            config.regime.regime_adaptation,
            config.regime.warmup_epochs,
            config.regime.optimizer,
        )
        assert got == (batch, norm, scaling, ra, warmup, optimizer), variant
        assert (config.dataset, config.model.name) == (dataset, model)
        assert config.model.name in models.MODELS
        assert config.model.ghost_batch_size == config.regime.reference_batch_size == small
        assert config.regime.grad_clip_norm == 5.0
        assert config.variant == variant
        resolved = regimes.resolve(config, num_train)
        assert resolved.batch_size == batch
        if variant == "lb_lr_gbn_ra":
            assert resolved.total_steps == int(config.regime.epochs * (num_train // small))


def test_default_variant_and_docstrings(modules):
    for name, module in modules.items():
        assert module.get_config().variant == "lb_lr_gbn_ra"
        doc = module.__doc__
        assert f"--config=configs/{name}.py:" in doc
        assert "Expected runtime:" in doc and "Expected result:" in doc
    assert "no paper number for" in " ".join(modules["fashion_mnist_f1"].__doc__.split())


def test_options_override_the_variant(modules):
    config = modules["fashion_mnist_f1"].get_config(
        "lb_lr_gbn_ra,batch=2048,ghost=64,epochs_scale=0.1,seed=3,dataset=mnist,"
        "dtype=bfloat16,model=resnet44,eval_every=7"
    )
    assert (config.batch_size, config.model.ghost_batch_size, config.seed) == (2048, 64, 3)
    assert (config.dataset, config.model.dtype, config.model.name) == (
        "mnist",
        "bfloat16",
        "resnet44",
    )
    assert config.eval_every_steps == 7
    assert modules["cifar10_c1"].get_config("goyal,epochs_scale=0.1").regime.warmup_epochs == 0.5
    # F1: 50 epochs, LR drops at 10, 20, 30; scaled by 0.1.
    assert config.regime.epochs == pytest.approx(5.0)
    assert [e for e, _ in config.regime.lr_schedule] == pytest.approx([0, 1, 2, 3])
    # RA at 2048 = 16 x 128 on 60,000 examples: 5 epochs of 468 small-batch steps.
    resolved = regimes.resolve(config, 60_000).to_dict()
    assert resolved["total_steps"] == 5 * 468
    assert [s for s, _ in resolved["lr_boundaries"]] == [0, 468, 936, 1404]
    assert resolved["lr_boundaries"][0][1] == pytest.approx(0.1 * math.sqrt(16))


def test_epochs_scale_moves_weight_decay_boundaries(modules):
    base = regimes.base_regime("alexnet")
    config = modules["imagenet_alexnet"].get_config("lb,epochs_scale=0.5")
    # AlexNet's weight decay drops to 0 at epoch 15 (the authors' AlexNet regime).
    assert config.regime.weight_decay == ((0.0, 5e-4), (7.5, 0.0))
    assert config.regime.epochs == base.epochs * 0.5


def test_epochs_cuts_the_regime_and_keeps_its_drops(modules):
    """epochs= (the authors' --epochs 100 for ResNet-44): the CIFAR ResNet regime's
    drops at 81, 122 and 164 stay where they are and those past the end go."""
    assert regimes.base_regime("resnet_cifar").lr_schedule == (
        (0, 0.1),
        (81, 0.01),
        (122, 1e-3),
        (164, 1e-4),
    )
    config = modules["cifar10_resnet44"].get_config("lb_lr_gbn,epochs=100,ghost=256")
    assert config.regime.epochs == 100
    assert config.regime.lr_schedule == ((0, 0.1), (81, 0.01))
    resolved = regimes.resolve(config, 50_000)
    # 2048 examples a step: 24 steps an epoch; LR 0.1 x sqrt(2048 / 128) until epoch 81.
    assert resolved.total_steps == 2400
    assert resolved.lr_boundaries == ((0, 0.4), (81 * 24, 0.04))
    # With epochs_scale both move: 50 epochs, the drop at 40.5.
    config = modules["cifar10_resnet44"].get_config("lb,epochs=100,epochs_scale=0.5")
    assert config.regime.epochs == 50 and config.regime.lr_schedule == ((0, 0.1), (40.5, 0.01))


@pytest.mark.parametrize(
    "arg, message",
    [
        ("lb,epochs=0", "epochs=0 must be positive"),
        ("huge", "unknown config variant 'huge'; valid variants: sb, lb, lb_lr"),
        ("lb,bach=64", "unknown config option key='bach'.*valid options: batch, ghost"),
        ("lb,batch=big", "batch='big' is not a valid int"),
        ("lb,batch=0", "batch=0 must be positive"),
        ("lb,dtype=float8", "dtype='float8'"),
        ("lb,epochs_scale=-1", "epochs_scale=-1.0 must be positive"),
        ("batch=64,lb", "'lb' is not key=value"),
    ],
)
def test_bad_arguments_raise(arg, message, modules):
    with pytest.raises(ValueError, match=message):
        modules["cifar10_c1"].get_config(arg)


def test_absl_flags_override_fields():
    argv = [
        "prog",
        f"--config={config_path('fashion_mnist_f1')}:sb,seed=5",
        "--config.max_steps=10",
        "--config.regime.epochs=2.5",
        "--config.model.bn_momentum=0.99",
        "--config.data_dir=/data",
    ]
    flag_values = flags.FlagValues()
    # config_flags reads the overrides from sys.argv unless given sys_argv.
    config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    config = flag_values.config
    assert (config.max_steps, config.regime.epochs, config.seed) == (10, 2.5, 5)
    assert (config.model.bn_momentum, config.data_dir, config.batch_size) == (0.99, "/data", 128)


# ------------------------------------------------------------ the authors' protocol


@pytest.mark.parametrize(
    ("variant", "batch", "lr0"),
    [
        # run_experiments.sh: LB and +LR with main_normal.py at 2048, LR x sqrt(B/256);
        # +GBN with main_gbn.py at 4096, ghost 128, LR x sqrt(B/128); SB is ours, 128.
        ("sb", 128, 0.1),
        ("lb", 2048, 0.1),
        ("lb_lr", 2048, 0.1 * math.sqrt(2048 / 256)),
        ("lb_lr_gbn", 4096, 0.1 * math.sqrt(4096 / 128)),
    ],
)
def test_protocol_authors_sets_every_switch_and_the_columns_batch(variant, batch, lr0, modules):
    config = modules["fashion_mnist_f1"].get_config(f"{variant},protocol=authors")
    assert config.batch_size == batch
    assert config.regime.momentum_reset and config.keep_last_batch
    assert config.model.bn_scale_init == "uniform" and config.augment == "authors"
    resolved = regimes.resolve(config, 60_000)
    assert math.isclose(resolved.lr_boundaries[0][1], lr0, rel_tol=1e-12)
    assert resolved.steps_per_epoch == -(-60_000 // batch)  # the partial batch is kept


def test_protocol_switches_are_off_by_default_and_override_one_by_one(modules):
    f1 = modules["fashion_mnist_f1"]
    default = f1.get_config("lb_lr")
    assert (default.batch_size, default.regime.momentum_reset, default.keep_last_batch) == (
        4096,
        False,
        False,
    )
    assert default.model.bn_scale_init == "ones" and default.augment == "default"
    assert default.validation_size == 0 and default.regime.lr_scaling_reference is None
    # One switch alone, and protocol=authors with one switch turned back off.
    alone = f1.get_config("lb_lr,keep_last_batch=1")
    assert alone.keep_last_batch and not alone.regime.momentum_reset and alone.batch_size == 4096
    minus = f1.get_config("lb_lr,protocol=authors,lr_rule=paper,momentum_reset=0,validation=7")
    assert minus.batch_size == 4096 and not minus.regime.momentum_reset
    assert minus.keep_last_batch and minus.validation_size == 7
    assert regimes.resolve(minus, 60_000).lr_boundaries[0][1] == pytest.approx(0.1 * math.sqrt(32))
    # Families without an authors' batch table keep their |B_L|.
    c1 = modules["cifar10_c1"].get_config("lb_lr,lr_rule=authors")
    assert c1.batch_size == 4096 and c1.regime.lr_scaling_reference == 256


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("lb,protocol=torch", "protocol"),
        ("lb,bn_scale_init=zeros", "bn_scale_init"),
        ("lb,momentum_reset=maybe", "momentum_reset"),
        ("lb,validation=-1", "validation"),
        ("lb,augment=heavy", "augment"),
    ],
)
def test_bad_protocol_options_raise(arg, message, modules):
    with pytest.raises(config_lib.ConfigArgError, match=message):
        modules["fashion_mnist_f1"].get_config(arg)


@pytest.mark.parametrize("variant", ["sb", "lb", "lb_lr", "goyal", "lars"])
def test_ghost_option_without_ghost_batches_is_an_error(variant, modules):
    module = modules["fashion_mnist_f1"]
    with pytest.raises(config_lib.ConfigArgError, match=rf"ghost=100 does nothing for .*{variant}"):
        module.get_config(f"{variant},ghost=100")
    # With ghost batches switched on, the same option sets their size.
    assert module.get_config(f"{variant},norm=ghost,ghost=64").model.ghost_batch_size == 64
