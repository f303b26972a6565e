"""Tests of gbn_jax/trainer/validation.py: configs checked before any compute."""

import importlib.util
import os

import pytest

from gbn_jax.trainer import validation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def f1_config(arg, **overrides):
    path = os.path.join(ROOT, "configs", "fashion_mnist_f1.py")
    spec = importlib.util.spec_from_file_location("experiment_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    config.update_from_flattened_dict(overrides)
    return config


def test_a_good_config_passes():
    validation.validate_config(
        f1_config("lb_lr_gbn,batch=256,ghost=32"), device_count=8, process_count=2
    )


@pytest.mark.parametrize(
    "arg, overrides, message",
    [
        ("lb,batch=100", {}, r"not divisible by the 8 devices.*e\.g\. batch=104"),
        ("lb_lr_gbn,batch=256,ghost=48", {}, r"Use ghost=32 .* or batch=384"),
        ("lb", {"log_schedule": "cubic"}, "log_schedule='cubic'"),
        ("lb", {"checkpoint_every_steps": 0}, "checkpoint_every_steps=0 must be positive"),
        ("lb", {"validation_size": -1}, "validation_size=-1 must be an integer >= 0"),
    ],
)
def test_bad_configs_name_the_fix(arg, overrides, message):
    with pytest.raises(ValueError, match=message):
        validation.validate_config(f1_config(arg, **overrides), device_count=8, process_count=1)


def test_noise_scale_small_batch():
    small = validation.noise_scale_small_batch
    assert small(f1_config("lb,batch=256"), device_count=8) is None  # off
    # Unset: the regime's |B_S| (128 for F1) below the batch, else a quarter of it.
    on = "noise_scale_every=5"
    assert small(f1_config(f"lb,batch=256,{on}"), device_count=1) == 128
    assert small(f1_config(f"sb,{on}"), device_count=1) == 32
    config = f1_config(f"lb,batch=256,{on}", **{"noise_scale.small_batch_size": 16})
    assert small(config, device_count=8) == 16
    with pytest.raises(ValueError, match="does not divide the per-device batch 32"):
        small(f1_config(f"lb,batch=256,{on}"), device_count=8)


def test_round_up():
    assert [validation.round_up(n, 8) for n in (1, 8, 9, 16)] == [8, 8, 16, 16]
