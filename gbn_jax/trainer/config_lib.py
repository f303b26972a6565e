"""The paper's columns as config variants, shared by every file in ``configs/``.

A config argument reads ``<variant>[,key=value...]``, e.g.
``configs/fashion_mnist_f1.py:lb_lr_gbn_ra,batch=2048,ghost=64``. The variants are the
paper's cumulative columns plus the later alternatives it is compared with:

=================  =========  ======  ==========  =====  ======  ==========
variant            batch      norm    lr_scaling  RA     warmup  optimizer
=================  =========  ======  ==========  =====  ======  ==========
``sb``             |B_S|      batch   none        no     0       sgd
``lb``             |B_L|      batch   none        no     0       sgd
``lb_lr``          |B_L|      batch   sqrt        no     0       sgd
``lb_lr_gbn``      |B_L|      ghost   sqrt        no     0       sgd
``lb_lr_gbn_ra``   |B_L|      ghost   sqrt        yes    0       sgd
``goyal``          |B_L|      batch   linear      no     5       sgd
``lars``           |B_L|      batch   sqrt        no     0       lars
=================  =========  ======  ==========  =====  ======  ==========

Every variant clips gradients at global L2 norm 5, as the authors' code does. The
ghost batch size defaults to the reference batch |B_S|; ``ghost=`` is an error for a
variant without ghost batches. ``epochs_scale=`` multiplies
the epochs, every learning-rate and weight-decay boundary and the warm-up, so a quick
run keeps the regime's shape. ``epochs=`` is the authors' ``--epochs``: the base regime
cut to that many epochs, its drops where they were (those at or past the end dropped).

Protocol switches, each off by default, where the authors' code (eladhoffer/bigBatch)
departs from the paper's text; ``protocol=authors`` turns them all on (an explicit
switch still overrides it):

======================  ===================================  ======================
option                  authors' code                        default (off)
======================  ===================================  ======================
``momentum_reset=1``    a new torch.optim.SGD every epoch    one momentum buffer
``bn_scale_init=``      ``uniform``: gamma ~ U[0, 1)         ``ones``
``augment=``            ``authors``: pad, crop, flip, 0.5    ``default``
``keep_last_batch=1``   the partial last batch is trained    dropped
``lr_rule=``            ``authors``: their batch per column  ``paper``
======================  ===================================  ======================

``lr_rule=authors`` takes each column's batch from the experiment family's
``authors_batch_sizes`` (the batches of the authors' run script) and scales the LR
against 256 without ghost batches and against the ghost size with them, as their code
does. ``validation=N`` holds N training examples out as a validation split (metrics
``val_*``), on which protocols are chosen; the test split stays the reported one. Best
and final accuracies are both in every run's summary.json (the authors report the best
test accuracy over epochs).
``noise_scale_every=N`` logs the gradient noise scale B_simple every N steps
(``config.noise_scale``, off by default; training unchanged bit for bit).
``norm=batch|ghost`` and ``lr_scaling=none|sqrt|linear`` replace one ingredient of a
column and leave the rest as the variant sets it (batch, LR reference, regime
adaptation), e.g. ``lb_lr_gbn_ra,norm=batch`` is +RA with plain batch norm.

References:
  Hoffer, Hubara & Soudry (2017), sections 4-5 and table 1 (the columns, sqrt LR
  scaling); Goyal et al. (2017) for linear scaling with warm-up; You et al. (2017) for
  LARS.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import ml_collections
from ml_collections import config_dict


@dataclasses.dataclass(frozen=True)
class Variant:
    """How one column of the paper's table departs from the small-batch baseline.

    Attributes:
      large_batch: train with the config's large batch |B_L| (else |B_S|).
      norm: "batch" or "ghost".
      lr_scaling: "none", "sqrt" or "linear".
      regime_adaptation: stretch the regime to the small-batch number of updates.
      warmup_epochs: linear learning-rate warm-up length.
      optimizer: "sgd" or "lars".
    """

    large_batch: bool
    norm: str = "batch"
    lr_scaling: str = "none"
    regime_adaptation: bool = False
    warmup_epochs: float = 0.0
    optimizer: str = "sgd"


VARIANTS: dict[str, Variant] = {
    "sb": Variant(large_batch=False),
    "lb": Variant(large_batch=True),
    "lb_lr": Variant(large_batch=True, lr_scaling="sqrt"),
    "lb_lr_gbn": Variant(large_batch=True, norm="ghost", lr_scaling="sqrt"),
    "lb_lr_gbn_ra": Variant(
        large_batch=True, norm="ghost", lr_scaling="sqrt", regime_adaptation=True
    ),
    "goyal": Variant(large_batch=True, lr_scaling="linear", warmup_epochs=5.0),
    "lars": Variant(large_batch=True, lr_scaling="sqrt", optimizer="lars"),
}

# The authors' code clips every run at this global L2 norm.
GRAD_CLIP_NORM = 5.0


def _flag(text: str) -> bool:
    """Parses an on/off option value."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not on/off")


_flag.__name__ = "flag (1/0, true/false)"

OPTIONS: dict[str, Callable[[str], Any]] = {
    "batch": int,
    "ghost": int,
    "epochs_scale": float,
    "epochs": int,
    "seed": int,
    "dataset": str,
    "dtype": str,
    "model": str,
    "eval_every": int,
    "protocol": str,
    "momentum_reset": _flag,
    "bn_scale_init": str,
    "augment": str,
    "keep_last_batch": _flag,
    "lr_rule": str,
    "validation": int,
    "noise_scale_every": int,
    "norm": str,
    "lr_scaling": str,
}

DTYPES = ("float32", "bfloat16")
# Values of the string-valued options: the default first, then the authors' value.
CHOICES = {
    "protocol": ("default", "authors"),
    "bn_scale_init": ("ones", "uniform"),
    "augment": ("default", "authors"),
    "lr_rule": ("paper", "authors"),
    "norm": ("batch", "ghost"),
    "lr_scaling": ("none", "sqrt", "linear"),
}
# What protocol=authors sets; each is also an option of its own.
AUTHORS_PROTOCOL = {
    "momentum_reset": True,
    "bn_scale_init": "uniform",
    "augment": "authors",
    "keep_last_batch": True,
    "lr_rule": "authors",
}
# Without ghost batches the authors' code scales the LR by sqrt(B / 256) (with them,
# by sqrt(B / ghost)).
AUTHORS_NORMAL_LR_REFERENCE = 256


class ConfigArgError(ValueError):
    """A config argument names an unknown variant or option, or a bad value."""


def parse_arg(arg: str | None, default_variant: str = "lb_lr_gbn_ra") -> tuple[str, dict]:
    """Splits a config argument into its variant and typed options.

    Args:
      arg: ``"<variant>[,key=value...]"``; None or "" selects ``default_variant``. The
        variant may be left out (``"batch=2048"``).
      default_variant: the variant used when ``arg`` names none.

    Returns:
      ``(variant, options)`` with options converted to their types (see ``OPTIONS``).

    Raises:
      ConfigArgError: an unknown variant or option, or a value of the wrong type.

    >>> parse_arg("lb_lr,batch=2048,epochs_scale=0.5")
    ('lb_lr', {'batch': 2048, 'epochs_scale': 0.5})
    """
    variant, options = default_variant, {}
    for i, part in enumerate(p.strip() for p in (arg or "").split(",")):
        if not part:
            continue
        if "=" not in part:
            if i != 0:
                raise ConfigArgError(
                    f"config argument {arg!r}: {part!r} is not key=value; the variant "
                    f"comes first, options after it, e.g. 'lb_lr_gbn_ra,batch=2048'."
                )
            variant = part
            continue
        key, value = (s.strip() for s in part.split("=", 1))
        if key not in OPTIONS:
            raise ConfigArgError(
                f"unknown config option {key=} in {arg!r}; valid options: {', '.join(OPTIONS)}."
            )
        try:
            options[key] = OPTIONS[key](value)
        except ValueError:
            raise ConfigArgError(
                f"config option {key}={value!r} is not a valid {OPTIONS[key].__name__}."
            ) from None
    if variant not in VARIANTS:
        raise ConfigArgError(
            f"unknown config variant {variant!r}; valid variants: {', '.join(VARIANTS)}."
        )
    if "dtype" in options and options["dtype"] not in DTYPES:
        raise ConfigArgError(f"config option dtype={options['dtype']!r}; use one of {DTYPES}.")
    for key, choices in CHOICES.items():
        if key in options and options[key] not in choices:
            raise ConfigArgError(f"config option {key}={options[key]!r}; use one of {choices}.")
    if "validation" in options and options["validation"] < 0:
        raise ConfigArgError(
            f"config option validation={options['validation']} must be >= 0 (examples held "
            "out of the training set; 0 for none)."
        )
    for key in ("batch", "ghost", "eval_every", "epochs"):
        if key in options and options[key] <= 0:
            raise ConfigArgError(f"config option {key}={options[key]} must be positive.")
    if "noise_scale_every" in options and options["noise_scale_every"] <= 0:
        raise ConfigArgError(
            f"config option noise_scale_every={options['noise_scale_every']} must be a "
            "positive number of steps between B_simple measurements (e.g. 25); leave it "
            "out to measure nothing."
        )
    if "epochs_scale" in options and not options["epochs_scale"] > 0:
        raise ConfigArgError(
            f"config option epochs_scale={options['epochs_scale']} must be positive."
        )
    return variant, options


def scale_epochs(regime: ml_collections.ConfigDict, factor: float) -> ml_collections.ConfigDict:
    """Shrinks or stretches a base regime in time, for quick runs.

    Multiplies the number of epochs and every epoch boundary of the learning-rate and
    weight-decay schedules by ``factor``, so the schedule keeps its shape. Epochs
    become floats so that ``--config.regime.epochs=2.5`` overrides work either way.

    Args:
      regime: a base regime (``gbn_jax.trainer.regimes.base_regime``).
      factor: the time scale, > 0.

    Returns:
      A new ConfigDict with the scaled regime.

    >>> r = scale_epochs(ml_collections.ConfigDict(
    ...     {"epochs": 40, "lr_schedule": ((0, 0.1), (10, 0.01)), "weight_decay": 1e-4}), 0.5)
    >>> r.epochs, r.lr_schedule
    (20.0, ((0.0, 0.1), (5.0, 0.01)))
    """
    fields = regime.to_dict()
    fields["epochs"] = float(fields["epochs"] * factor)
    fields["lr_schedule"] = tuple(
        (float(epoch * factor), lr) for epoch, lr in fields["lr_schedule"]
    )
    if isinstance(fields["weight_decay"], tuple | list):
        fields["weight_decay"] = tuple(
            (float(epoch * factor), wd) for epoch, wd in fields["weight_decay"]
        )
    return ml_collections.ConfigDict(fields)


def trainer_defaults() -> ml_collections.ConfigDict:
    """The trainer fields every experiment config starts from.

    Returns:
      A ConfigDict with data_dir, seed, eval/log/checkpoint cadences, max_steps,
      execution settings, protocol switches and the noise-scale cadence.
    """
    config = ml_collections.ConfigDict()
    config.data_dir = config_dict.placeholder(str)
    config.seed = 0
    # Evaluate once per epoch of the run unless eval_every_steps is set.
    config.eval_every_epochs = 1.0
    config.eval_every_steps = config_dict.placeholder(int)
    config.eval_batch_size = 1024
    config.log_every_steps = 50
    # "log" adds ~20 log-spaced steps per decade, for the weight-distance curves.
    config.log_schedule = "linear"
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3
    config.max_steps = config_dict.placeholder(int)
    # Steps per dispatch; unset: the shortest of the log, eval, checkpoint and
    # noise-scale cadences. No effect on the results, bit for bit.
    config.steps_per_loop = config_dict.placeholder(int)
    # The K steps of a dispatch as one loop program on the device (True) or one program
    # per step, dispatched back to back (False); unset: True on accelerators, False on
    # the CPU, whose convolutions run slowly in a loop body. No effect on the results.
    config.device_loop = config_dict.placeholder(bool)
    # Hold the uint8 splits on the devices (replicated) and gather batches there; unset:
    # when they are in host memory and take at most a quarter of a device's memory.
    config.device_resident_data = config_dict.placeholder(bool)
    # XLA compiler options for faster CPU steps, on by default (same training to float32
    # rounding; False gives XLA's defaults): gbn_jax.trainer.steps.XLA_CPU_FAST_OPTIONS. Ignored
    # off the CPU. (Huge pages for host memory are a process setting, not a config
    # field: GLIBC_TUNABLES=glibc.malloc.hugetlb=1, docs/training.md.)
    config.xla_cpu_fast_options = True
    # Protocol switches (apply_variant sets them from the config argument).
    config.augment = "default"
    config.validation_size = 0
    config.keep_last_batch = False
    # The gradient noise scale B_simple (gbn_jax/trainer/noise_scale.py), measured every
    # every_steps steps on the batch of the next step, in shards of small_batch_size
    # (unset: the regime's |B_S| = regime.reference_batch_size, or B / 4 when the batch
    # is |B_S| or smaller). Off (unset) by default; on, it costs extra forward and
    # backward passes per measurement and changes no training result, bit for bit.
    config.noise_scale = ml_collections.ConfigDict(
        {
            "every_steps": config_dict.placeholder(int),
            "small_batch_size": config_dict.placeholder(int),
        }
    )
    return config


def apply_variant(
    config: ml_collections.ConfigDict,
    variant: str,
    options: dict,
    *,
    large_batch_size: int,
    authors_batch_sizes: dict[str, int] | None = None,
) -> ml_collections.ConfigDict:
    """Sets batch size, normalization, regime and protocol fields for one paper column.

    ``config.regime`` must already hold the base regime and ``config.model`` the model
    fields. Options from the config argument override the variant's defaults, and an
    explicit protocol switch overrides ``protocol=authors``.

    Args:
      config: the experiment config, modified in place.
      variant: a key of ``VARIANTS``.
      options: parsed options (``parse_arg``).
      large_batch_size: |B_L| for this experiment family.
      authors_batch_sizes: variant -> the batch the authors' run script used for it
        (``lr_rule=authors``); variants not listed use ``large_batch_size``.

    Returns:
      ``config``, for chaining.
    """
    v = VARIANTS[variant]
    protocol = options.get("protocol", "default")

    def switch(name: str, default: Any) -> Any:
        """An option's value: explicit, else the authors' under protocol=authors."""
        if name in options:
            return options[name]
        return AUTHORS_PROTOCOL[name] if protocol == "authors" else default

    lr_rule = switch("lr_rule", "paper")
    reference_batch_size = config.regime.reference_batch_size
    large_batch = large_batch_size
    if lr_rule == "authors":
        large_batch = (authors_batch_sizes or {}).get(variant, large_batch_size)
    config.batch_size = options.get("batch", large_batch if v.large_batch else reference_batch_size)
    # norm= and lr_scaling= change one ingredient of a column and nothing else: the LR
    # reference of lr_rule=authors and the regime adaptation stay the variant's.
    config.model.norm = options.get("norm", v.norm)
    if "ghost" in options and config.model.norm != "ghost":
        raise ConfigArgError(
            f"config option ghost={options['ghost']} does nothing for variant {variant!r}, "
            "which normalizes over the whole batch. Ghost batches are used by lb_lr_gbn and "
            "lb_lr_gbn_ra (or any variant with norm=ghost): drop ghost= or add norm=ghost."
        )
    # Ghost batches reproduce the small-batch normalization noise: |B_S| by default.
    config.model.ghost_batch_size = options.get("ghost", reference_batch_size)
    config.model.dtype = options.get("dtype", config.model.get("dtype", "float32"))
    if "model" in options:
        config.model.name = options["model"]
    if "dataset" in options:
        config.dataset = options["dataset"]
    if "seed" in options:
        config.seed = options["seed"]
    if "eval_every" in options:
        config.eval_every_steps = options["eval_every"]
    if "epochs" in options:
        # The authors' --epochs: the base regime cut (or extended) to this many epochs,
        # its LR drops where they were (a drop at or past the end never happens).
        epochs = options["epochs"]
        config.regime.epochs = epochs
        config.regime.lr_schedule = tuple(p for p in config.regime.lr_schedule if p[0] < epochs)
        if isinstance(config.regime.weight_decay, tuple):
            config.regime.weight_decay = tuple(
                p for p in config.regime.weight_decay if p[0] < epochs
            )
    epochs_scale = options.get("epochs_scale", 1.0)
    config.regime = scale_epochs(config.regime, epochs_scale)
    config.regime.lr_scaling = options.get("lr_scaling", v.lr_scaling)
    config.regime.regime_adaptation = v.regime_adaptation
    # Warm-up is part of the schedule's shape, so a quick run shortens it too.
    config.regime.warmup_epochs = v.warmup_epochs * epochs_scale
    config.regime.grad_clip_norm = GRAD_CLIP_NORM
    config.regime.optimizer = v.optimizer
    config.regime.lr_scaling_reference = None
    if lr_rule == "authors" and v.large_batch:
        config.regime.lr_scaling_reference = (
            config.model.ghost_batch_size if v.norm == "ghost" else AUTHORS_NORMAL_LR_REFERENCE
        )
    config.regime.momentum_reset = switch("momentum_reset", False)
    config.model.bn_scale_init = switch("bn_scale_init", "ones")
    config.augment = switch("augment", "default")
    config.keep_last_batch = switch("keep_last_batch", False)
    config.validation_size = options.get("validation", 0)
    if "noise_scale_every" in options:
        config.noise_scale.every_steps = options["noise_scale_every"]
    config.protocol = protocol
    config.lr_rule = lr_rule
    config.variant = variant
    return config


def model_config(name: str, **kwargs: Any) -> ml_collections.ConfigDict:
    """The model fields of an experiment config (``gbn_jax.models.get_model`` kwargs).

    Args:
      name: a model registry name ("f1", "c1", "resnet_cifar", ...).
      **kwargs: extra constructor arguments (e.g. ``depth=44``).

    Returns:
      A ConfigDict with name, norm, ghost_batch_size, running_update, bn_momentum,
      dtype and the extra kwargs; ``apply_variant`` fills norm and ghost size.
    """
    return ml_collections.ConfigDict(
        {
            "name": name,
            "norm": "batch",
            "ghost_batch_size": 128,
            # Algorithm 1: one running-statistics update per ghost batch, in order.
            "running_update": "sequential",
            # Flax convention; 0.9 equals PyTorch's default momentum 0.1 (authors' code).
            "bn_momentum": 0.9,
            "dtype": "float32",
            **kwargs,
        }
    )
