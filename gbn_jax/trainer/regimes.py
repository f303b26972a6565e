"""Training regimes: small-batch base regimes and their large-batch resolutions.

A *base regime* is what a paper trains a model with at its reference (small) batch
size |B_S|: the number of epochs, a piecewise-constant learning rate by epoch,
momentum and weight decay (a float, or piecewise constant by epoch as for AlexNet).
`resolve` turns a base regime plus a run's batch size |B_L| into the concrete
step-indexed schedule and optax optimizer of one large-batch variant:

* ``lr_scaling``: "none", "linear" (lr * r) or "sqrt" (lr * sqrt(r)), r = |B_L|/|B_S|.
* ``regime_adaptation`` ("train longer"): the run takes as many updates as the
  small-batch run, ``int(epochs * floor(N/|B_S|))``, and each LR or weight-decay change
  at epoch e happens at step ``int(e * floor(N/|B_S|))``, the step at which the
  small-batch run makes it. Off: ``int(epochs * floor(N/|B_L|))`` steps and changes at
  ``int(e * floor(N/|B_L|))``. Epoch keys may be floats (quick runs scale a regime's
  epochs by a factor); ``int`` truncates, which is exact for integer epochs.
* ``warmup_epochs`` (Goyal et al. 2017): the LR ramps linearly from the unscaled to the
  scaled value over the first ``int(warmup_epochs * floor(N/|B_L|))`` steps. Warm-up
  epochs are passes over the data *of the run itself* (at |B_L|), also when regime
  adaptation is on: warm-up tames the first updates of the large LR, which is a matter
  of updates taken at |B_L|, not of the small-batch clock. The warm-up lies inside the
  run (it replaces the start of the first LR phase; total_steps does not change).
* ``lr_scaling_reference``: the batch that ``r`` is taken against for the LR scaling
  only (default |B_S|). The authors' code scales by sqrt(|B_L|/256) without ghost
  batch norm and by sqrt(|B_L|/ghost) with it.
* ``keep_last_batch``: an epoch is ceil(N/B) steps, the last one partial (PyTorch's
  DataLoader default, which the authors' code uses), instead of floor(N/B).
* ``momentum_reset``: the momentum buffer is zeroed at the start of every epoch of the
  run, as in the authors' code, which builds a new ``torch.optim.SGD`` every epoch.
* ``grad_clip_norm``: clipping by global L2 norm before anything else (paper: 5).
* ``optimizer``: "sgd" (heavy-ball momentum, optional Nesterov, weight decay added to
  the gradient before momentum, on every parameter, as in the authors' PyTorch code),
  "lars" or "lamb" (weight decay and trust ratio skip 1-D parameters: biases and
  normalization scales/offsets).

Example:
  >>> from gbn_jax.trainer import regimes
  >>> cfg = regimes.base_regime("f1")
  >>> cfg.batch_size, cfg.lr_scaling, cfg.regime_adaptation = 4096, "sqrt", True
  >>> resolved = regimes.resolve(cfg, num_train_examples=60_000)
  >>> resolved.steps_per_epoch, resolved.total_steps
  (14, 23400)
  >>> [step for step, _ in resolved.lr_boundaries]
  [0, 4680, 9360, 14040]

References:
  Hoffer, Hubara & Soudry, "Train longer, generalize better", NeurIPS 2017:
  section 4 (sqrt learning-rate scaling, regime adaptation) and section 5 / Table 1
  (base regimes). Goyal et al. 2017 (linear scaling, warm-up); You et al. 2017 (LARS)
  and 2020 (LAMB).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

LR_SCALINGS = ("none", "linear", "sqrt")
OPTIMIZERS = ("sgd", "lars", "lamb")

# Reference (small) batch sizes. CIFAR/MNIST nets: 128, the |B_S| of the paper's runs.
# ImageNet nets: 256, the batch for which lr 0.1 (ResNet-50) was tuned by He et al.
# and the reference of Goyal et al.; the authors' main script also scales by B/256.
_CIFAR_REFERENCE_BATCH = 128
_IMAGENET_REFERENCE_BATCH = 256

# Epoch counts. F1 (50) and C1/C3 (200) are what the authors' run script passes;
# ResNet44, WRN-16-4 and VGG use the script's default of 200 (for WRN also Zagoruyko's
# count), keeping every LR key of the paper's regimes reachable. AlexNet trains one
# 5-epoch period past its last key (30); ResNet-50 one 10-epoch period past its last
# key (100), so the 1e-4 phase of the authors' table is actually run.
BASE_REGIMES: dict[str, dict[str, Any]] = {
    "f1": dict(
        reference_batch_size=_CIFAR_REFERENCE_BATCH,
        epochs=50,
        lr_schedule=((0, 0.1), (10, 0.01), (20, 1e-3), (30, 1e-4)),
        momentum=0.9,
        nesterov=False,
        weight_decay=1e-4,
    ),
    "resnet_cifar": dict(
        reference_batch_size=_CIFAR_REFERENCE_BATCH,
        epochs=200,
        lr_schedule=((0, 0.1), (81, 0.01), (122, 1e-3), (164, 1e-4)),
        momentum=0.9,
        nesterov=False,
        weight_decay=1e-4,
    ),
    "wide_resnet": dict(
        reference_batch_size=_CIFAR_REFERENCE_BATCH,
        epochs=200,
        lr_schedule=((0, 0.1), (60, 0.02), (120, 0.004), (140, 1e-4)),
        momentum=0.9,
        nesterov=False,
        weight_decay=1e-4,
    ),
    # Keskar's shallow nets: the LR *rises* at epoch 60 in the authors' regime.
    "c1": dict(
        reference_batch_size=_CIFAR_REFERENCE_BATCH,
        epochs=200,
        lr_schedule=((0, 1e-3), (60, 1e-2), (120, 1e-3), (180, 1e-4)),
        momentum=0.0,
        nesterov=False,
        weight_decay=5e-4,
    ),
    # VGG is not in the authors' table. It trains on the same CIFAR-10 pipeline as
    # ResNet44, so it takes ResNet44's schedule (lr 0.1 is stable with batch norm);
    # weight decay 5e-4 is the usual value for VGG-16-BN on CIFAR (Zagoruyko's
    # cifar.torch, Liu et al.), which the larger fully-connected head needs.
    "vgg": dict(
        reference_batch_size=_CIFAR_REFERENCE_BATCH,
        epochs=200,
        lr_schedule=((0, 0.1), (81, 0.01), (122, 1e-3), (164, 1e-4)),
        momentum=0.9,
        nesterov=False,
        weight_decay=5e-4,
    ),
    "alexnet": dict(
        reference_batch_size=_IMAGENET_REFERENCE_BATCH,
        epochs=30,
        lr_schedule=((0, 1e-2), (10, 5e-3), (15, 1e-3), (20, 5e-4), (25, 1e-4)),
        momentum=0.9,
        nesterov=False,
        weight_decay=((0, 5e-4), (15, 0.0)),
    ),
    "resnet50": dict(
        reference_batch_size=_IMAGENET_REFERENCE_BATCH,
        epochs=100,
        lr_schedule=((0, 0.1), (30, 0.01), (60, 1e-3), (90, 1e-4)),
        momentum=0.9,
        nesterov=False,
        weight_decay=1e-4,
    ),
}
BASE_REGIMES["c3"] = BASE_REGIMES["c1"]  # C3 (CIFAR-100) trains exactly like C1.

_ALIASES = {"resnet44": "resnet_cifar", "wrn16_4": "wide_resnet", "vgg16": "vgg"}


def base_regime(name: str) -> ml_collections.ConfigDict:
    """Returns the small-batch regime of model `name` (from `BASE_REGIMES`).

    Args:
      name: a model name of `gbn_jax.models` ("f1", "c1", "c3", "resnet_cifar",
        "wide_resnet", "vgg", "alexnet", "resnet50", or an alias such as "resnet44").

    Returns:
      A fresh ConfigDict with reference_batch_size, epochs, lr_schedule (tuple of
      (epoch, lr) pairs from epoch 0), momentum, nesterov and weight_decay (a float, or
      a tuple of (epoch, weight_decay) pairs). Add the run fields (batch_size,
      lr_scaling, regime_adaptation, ...) before passing it to `resolve`.

    Raises:
      ValueError: for an unknown name.
    """
    key = _ALIASES.get(name, name)
    if key not in BASE_REGIMES:
        raise ValueError(
            f"Unknown regime {name=}; use one of {sorted(BASE_REGIMES)} "
            f"(aliases: {sorted(_ALIASES)})."
        )
    return ml_collections.ConfigDict(dict(BASE_REGIMES[key]))


@dataclasses.dataclass(frozen=True)
class ResolvedRegime:
    """One run's regime on the step axis: its schedule, optimizer and bookkeeping.

    Attributes:
      reference_batch_size: |B_S|, the batch the base regime was written for.
      batch_size: |B_L|, the run's global batch.
      num_train_examples: N, examples in one pass over the training set.
      steps_per_epoch: floor(N / |B_L|) (ceil with keep_last_batch), updates per
        pass of the run.
      reference_steps_per_epoch: floor(N / |B_S|) (ceil with keep_last_batch),
        updates per pass of the SB run.
      total_steps: the number of updates the run takes.
      lr_boundaries: (step, lr) pairs from step 0, the (scaled) LR from that step on.
      weight_decay_boundaries: (step, weight_decay) pairs from step 0.
      warmup_steps: steps of linear warm-up from the unscaled to the scaled LR.
      lr_scale: the factor applied to every LR of the base regime.
      momentum, nesterov, grad_clip_norm, optimizer_name, lr_scaling,
      regime_adaptation, base_epochs, warmup_epochs, trust_coefficient: as configured.
      lr_scaling_reference: the batch the LR scale is taken against (None: |B_S|).
      keep_last_batch: epochs end with a partial batch (ceil(N/B) steps).
      momentum_reset: the momentum buffer restarts at every epoch of the run.
    """

    reference_batch_size: int
    batch_size: int
    num_train_examples: int
    steps_per_epoch: int
    reference_steps_per_epoch: int
    total_steps: int
    lr_boundaries: tuple[tuple[int, float], ...]
    weight_decay_boundaries: tuple[tuple[int, float], ...]
    warmup_steps: int
    lr_scale: float
    momentum: float
    nesterov: bool
    grad_clip_norm: float | None
    optimizer_name: str
    lr_scaling: str
    regime_adaptation: bool
    base_epochs: float
    warmup_epochs: float
    trust_coefficient: float = 0.001
    lr_scaling_reference: int | None = None
    keep_last_batch: bool = False
    momentum_reset: bool = False

    @property
    def ratio(self) -> float:
        """r = |B_L| / |B_S|."""
        return self.batch_size / self.reference_batch_size

    @property
    def epochs(self) -> float:
        """Passes over the data the run makes (r * base epochs under regime adaptation)."""
        return self.total_steps / self.steps_per_epoch

    def epoch_of(self, step: int) -> float:
        """Returns the epoch of the run (passes over the data at |B_L|) at `step`."""
        return step / self.steps_per_epoch

    @property
    def learning_rate(self) -> optax.Schedule:
        """The jit-able optax schedule: update count -> learning rate."""
        schedule = _piecewise_constant(self.lr_boundaries)
        if self.warmup_steps == 0:
            return schedule
        # Multiplying the scaled schedule by a factor rising from 1/lr_scale to 1 gives
        # the linear ramp from the unscaled to the scaled LR, and stays well defined if
        # a warm-up ever reaches past an LR change.
        warmup_factor = optax.linear_schedule(1.0 / self.lr_scale, 1.0, self.warmup_steps)
        return lambda count: schedule(count) * warmup_factor(count)

    @property
    def weight_decay(self) -> float | optax.Schedule:
        """The weight decay: a float when constant, else a step-indexed schedule."""
        if len(self.weight_decay_boundaries) == 1:
            return self.weight_decay_boundaries[0][1]
        return _piecewise_constant(self.weight_decay_boundaries)

    def optimizer(self) -> optax.GradientTransformation:
        """Builds the run's optax optimizer: clipping first, then the update rule.

        Returns:
          "sgd": clip -> g + wd * w (all parameters, as the authors' torch.optim.SGD)
          -> momentum trace (PyTorch form, optional Nesterov; restarted every epoch
          with ``momentum_reset``) -> -lr. "lars": clip ->
          optax.lars. "lamb": clip -> Adam moments -> + wd * w -> trust ratio -> -lr.
          For LARS and LAMB the weight decay and the trust ratio skip 1-D parameters
          (biases, normalization scale and bias).
        """
        parts = []
        if self.momentum_reset and self.optimizer_name != "sgd":
            raise ValueError(
                f"momentum_reset is implemented for optimizer='sgd' (the authors' "
                f"torch.optim.SGD), not {self.optimizer_name!r}; turn momentum_reset off."
            )
        if self.grad_clip_norm:
            parts.append(optax.clip_by_global_norm(self.grad_clip_norm))
        if self.optimizer_name == "sgd":
            parts.append(optax.add_decayed_weights(self.weight_decay))
            if self.momentum:
                momentum = optax.trace(decay=self.momentum, nesterov=self.nesterov)
                if self.momentum_reset:
                    momentum = reset_every(momentum, self.steps_per_epoch)
                parts.append(momentum)
            parts.append(optax.scale_by_learning_rate(self.learning_rate))
        elif self.optimizer_name == "lars":
            parts.append(
                optax.lars(
                    self.learning_rate,
                    weight_decay=self.weight_decay,
                    weight_decay_mask=_is_matrix,
                    trust_coefficient=self.trust_coefficient,
                    trust_ratio_mask=_is_matrix,
                    momentum=self.momentum,
                    nesterov=self.nesterov,
                )
            )
        else:
            # optax.lamb masks only the weight decay; the trust ratio must skip 1-D
            # parameters too, so LAMB is assembled from its parts here.
            parts += [
                optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-6),
                optax.add_decayed_weights(self.weight_decay, mask=_is_matrix),
                optax.masked(optax.scale_by_trust_ratio(), _is_matrix),
                optax.scale_by_learning_rate(self.learning_rate),
            ]
        return optax.chain(*parts)

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-able summary (written to regime.json by the trainer)."""
        wd = self.weight_decay_boundaries
        return dict(
            reference_batch_size=self.reference_batch_size,
            batch_size=self.batch_size,
            ratio=self.ratio,
            num_train_examples=self.num_train_examples,
            steps_per_epoch=self.steps_per_epoch,
            reference_steps_per_epoch=self.reference_steps_per_epoch,
            base_epochs=self.base_epochs,
            epochs=self.epochs,
            total_steps=self.total_steps,
            lr_scaling=self.lr_scaling,
            lr_scale=self.lr_scale,
            lr_boundaries=[[s, v] for s, v in self.lr_boundaries],
            warmup_epochs=self.warmup_epochs,
            warmup_steps=self.warmup_steps,
            regime_adaptation=self.regime_adaptation,
            optimizer=self.optimizer_name,
            momentum=self.momentum,
            nesterov=self.nesterov,
            weight_decay=wd[0][1] if len(wd) == 1 else [[s, v] for s, v in wd],
            grad_clip_norm=self.grad_clip_norm,
            trust_coefficient=self.trust_coefficient,
            lr_scaling_reference=self.lr_scaling_reference or self.reference_batch_size,
            keep_last_batch=self.keep_last_batch,
            momentum_reset=self.momentum_reset,
        )


def resolve(config: Any, num_train_examples: int) -> ResolvedRegime:
    """Resolves a base regime for the run's batch size into a step-indexed regime.

    Args:
      config: a ConfigDict or dict. Regime fields are read from `config.regime` when
        present, else from `config`: reference_batch_size, epochs, lr_schedule ((epoch,
        lr) pairs from epoch 0, or a dict epoch -> lr with int or str keys), momentum
        (0), nesterov (False), weight_decay (0; float or (epoch, wd) pairs), lr_scaling
        ("none"), regime_adaptation (False), warmup_epochs (0), grad_clip_norm (None;
        None or 0 is off), optimizer ("sgd"), trust_coefficient (0.001, LARS only).
        batch_size comes from the regime if set there, else from `config.batch_size`.
      num_train_examples: N, the training-set size.

    Returns:
      The ResolvedRegime (see the module docstring for the step arithmetic).

    Raises:
      ValueError: naming the offending value, for non-positive sizes or epochs, a
        dataset smaller than a batch, a batch below the reference with regime
        adaptation, schedules that are unsorted, do not start at epoch 0 or reach past
        the last epoch, and unknown lr_scaling or optimizer names.

    References:
      Hoffer, Hubara & Soudry (2017), section 4: lr * sqrt(|B_L|/|B_S|) and regime
      adaptation; Goyal et al. 2017: linear scaling with warm-up.
    """
    regime = _get(config, "regime", None) or config
    if isinstance(regime, str):
        raise ValueError(
            f"config.regime must hold the regime's fields, got the name {regime=}; "
            f"use config.regime = gbn_jax.trainer.regimes.base_regime({regime!r})."
        )
    batch_size = _get(regime, "batch_size", None)
    if batch_size is None:
        batch_size = _get(config, "batch_size", None)
    reference_batch_size = _get(regime, "reference_batch_size", None)
    epochs = _get(regime, "epochs", None)
    lr_scaling = _get(regime, "lr_scaling", "none")
    regime_adaptation = bool(_get(regime, "regime_adaptation", False))
    warmup_epochs = _get(regime, "warmup_epochs", 0) or 0
    grad_clip_norm = _get(regime, "grad_clip_norm", None)
    optimizer_name = _get(regime, "optimizer", "sgd")
    momentum = float(_get(regime, "momentum", 0.0))
    trust_coefficient = float(_get(regime, "trust_coefficient", 0.001))
    lr_scaling_reference = _get(regime, "lr_scaling_reference", None)
    keep_last_batch = bool(_get(regime, "keep_last_batch", _get(config, "keep_last_batch", False)))
    momentum_reset = bool(_get(regime, "momentum_reset", False))

    _check_positive_int(batch_size, "batch_size")
    _check_positive_int(reference_batch_size, "reference_batch_size")
    _check_positive_int(num_train_examples, "num_train_examples")
    if lr_scaling_reference is not None:
        _check_positive_int(lr_scaling_reference, "lr_scaling_reference")
    # Plain ints from here on (NumPy integers would leak into the JSON summary).
    batch_size, reference_batch_size = int(batch_size), int(reference_batch_size)
    num_train_examples = int(num_train_examples)
    if not isinstance(epochs, numbers.Real) or isinstance(epochs, bool) or not epochs > 0:
        raise ValueError(f"epochs must be a positive number, got {epochs=}.")
    if lr_scaling not in LR_SCALINGS:
        raise ValueError(f"Unknown {lr_scaling=}; use one of {LR_SCALINGS}.")
    if optimizer_name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {optimizer_name=}; use one of {OPTIMIZERS}.")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must lie in [0, 1), got {momentum=}.")
    if not (isinstance(warmup_epochs, numbers.Real) and warmup_epochs >= 0):
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs=}.")
    if grad_clip_norm is not None and not grad_clip_norm >= 0:
        raise ValueError(
            f"grad_clip_norm must be positive (or None/0 for no clipping), got {grad_clip_norm=}."
        )
    if regime_adaptation and batch_size < reference_batch_size:
        raise ValueError(
            f"Regime adaptation stretches a regime to a larger batch, but {batch_size=} "
            f"is below {reference_batch_size=}; lower reference_batch_size or turn "
            f"regime_adaptation off."
        )

    if num_train_examples < batch_size:
        raise ValueError(
            f"The dataset is smaller than one batch ({num_train_examples=} < "
            f"{batch_size=}); use a smaller batch_size."
        )
    steps_per_epoch = _steps_per_pass(num_train_examples, batch_size, keep_last_batch)
    reference_steps_per_epoch = _steps_per_pass(
        num_train_examples, reference_batch_size, keep_last_batch
    )
    # The clock that maps the base regime's epochs to steps: under regime adaptation
    # the small-batch run's, so the run makes the same updates with the same drops.
    clock = reference_steps_per_epoch if regime_adaptation else steps_per_epoch
    total_steps = int(epochs * clock)
    if total_steps == 0:
        raise ValueError(f"{epochs=} gives no training step at {clock} steps per epoch.")

    lr_ratio = batch_size / (lr_scaling_reference or reference_batch_size)
    lr_scale = {"none": 1.0, "linear": lr_ratio, "sqrt": math.sqrt(lr_ratio)}[lr_scaling]
    lr_pairs = _epoch_pairs(_get(regime, "lr_schedule", None), "lr_schedule", epochs)
    lr_boundaries = _to_steps([(e, lr * lr_scale) for e, lr in lr_pairs], clock)

    weight_decay = _get(regime, "weight_decay", 0.0)
    if isinstance(weight_decay, int | float) and not isinstance(weight_decay, bool):
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay=}.")
        wd_boundaries = ((0, float(weight_decay)),)
    else:
        wd_boundaries = _to_steps(_epoch_pairs(weight_decay, "weight_decay", epochs), clock)

    warmup_steps = int(warmup_epochs * steps_per_epoch)
    if warmup_steps > total_steps:
        raise ValueError(
            f"Warm-up of {warmup_epochs=} ({warmup_steps} steps) is longer than the run "
            f"({total_steps} steps); shorten it."
        )

    return ResolvedRegime(
        reference_batch_size=reference_batch_size,
        batch_size=batch_size,
        num_train_examples=num_train_examples,
        steps_per_epoch=steps_per_epoch,
        reference_steps_per_epoch=reference_steps_per_epoch,
        total_steps=total_steps,
        lr_boundaries=lr_boundaries,
        weight_decay_boundaries=wd_boundaries,
        warmup_steps=warmup_steps,
        lr_scale=lr_scale,
        momentum=momentum,
        nesterov=bool(_get(regime, "nesterov", False)),
        grad_clip_norm=float(grad_clip_norm) if grad_clip_norm else None,
        optimizer_name=optimizer_name,
        lr_scaling=lr_scaling,
        regime_adaptation=regime_adaptation,
        base_epochs=int(epochs) if isinstance(epochs, numbers.Integral) else float(epochs),
        warmup_epochs=float(warmup_epochs),
        trust_coefficient=trust_coefficient,
        lr_scaling_reference=None if lr_scaling_reference is None else int(lr_scaling_reference),
        keep_last_batch=keep_last_batch,
        momentum_reset=momentum_reset,
    )


class _ResetEveryState(NamedTuple):
    count: jax.Array
    inner: Any


def reset_every(inner: optax.GradientTransformation, period: int) -> optax.GradientTransformation:
    """Restarts ``inner`` from its initial state every ``period`` updates.

    Update ``t`` (counting from 0) with ``t % period == 0`` runs on a freshly initialized
    state of ``inner``, as when the authors' code builds a new ``torch.optim.SGD`` at the
    start of every epoch: with ``optax.trace`` the momentum buffer restarts from zero, so
    the first update of an epoch is the plain (clipped, decayed) gradient.

    Args:
      inner: the transformation whose state restarts (e.g. ``optax.trace``); its
        ``init`` must depend on the shapes of its argument only.
      period: updates between restarts (the run's steps per epoch), > 0.

    Returns:
      A GradientTransformation with state ``(count, inner_state)``.

    Raises:
      ValueError: a period that is not a positive integer.
    """
    _check_positive_int(period, "period")

    def init(params):
        return _ResetEveryState(jnp.zeros((), jnp.int32), inner.init(params))

    def update(updates, state, params=None):
        restart = state.count % period == 0
        fresh = inner.init(updates)
        inner_state = jax.tree.map(
            lambda new, old: jnp.where(restart, new, old), fresh, state.inner
        )
        updates, inner_state = inner.update(updates, inner_state, params)
        return updates, _ResetEveryState(state.count + 1, inner_state)

    return optax.GradientTransformation(init, update)


def _steps_per_pass(num_examples: int, batch_size: int, keep_last_batch: bool) -> int:
    """Steps in one pass over the data: the partial last batch dropped or kept."""
    return -(-num_examples // batch_size) if keep_last_batch else num_examples // batch_size


def _get(config: Any, name: str, default: Any) -> Any:
    """Reads `name` from a ConfigDict or dict; a missing or None field gives `default`."""
    value = config.get(name, None) if hasattr(config, "get") else getattr(config, name, None)
    return default if value is None else value


def _check_positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {name}={value!r}.")


def _epoch_pairs(schedule: Any, name: str, epochs: float) -> list[tuple[float, float]]:
    """Validates an epoch-keyed piecewise-constant schedule; returns (epoch, value)."""
    if schedule is None:
        raise ValueError(f"The regime has no {name}; give (epoch, value) pairs from 0.")
    try:
        if hasattr(schedule, "items"):  # a mapping has no order to check: sort it
            pairs = sorted((float(e), float(v)) for e, v in schedule.items())
        else:
            pairs = [(float(e), float(v)) for e, v in schedule]
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{name} must be (epoch, value) pairs or a dict epoch -> value, got "
            f"{name}={schedule!r}."
        ) from err
    epoch_keys = [e for e, _ in pairs]
    if not pairs or epoch_keys[0] != 0:
        raise ValueError(f"{name} must start at epoch 0, got {name}={schedule!r}.")
    if any(b <= a for a, b in itertools.pairwise(epoch_keys)):
        raise ValueError(f"{name} epochs must be strictly increasing, got {name}={schedule!r}.")
    if epoch_keys[-1] > epochs:
        raise ValueError(
            f"{name} changes at epoch {epoch_keys[-1]}, beyond the last {epochs=}; "
            f"drop that key or train longer."
        )
    if any(v < 0 or not math.isfinite(v) for _, v in pairs):
        raise ValueError(f"{name} values must be finite and >= 0, got {name}={schedule!r}.")
    return pairs


def _to_steps(
    pairs: Sequence[tuple[float, float]], steps_per_epoch: int
) -> tuple[tuple[int, float], ...]:
    """Maps (epoch, value) to (int(epoch * steps_per_epoch), value).

    Two keys landing on one step (possible for fractional epochs) keep the later value,
    which is the one the run would see from that step on.
    """
    by_step: dict[int, float] = {}
    for epoch, value in pairs:
        by_step[int(epoch * steps_per_epoch)] = value
    return tuple(sorted(by_step.items()))


def _piecewise_constant(boundaries: Sequence[tuple[int, float]]) -> optax.Schedule:
    """Step-indexed piecewise-constant schedule: value of the last boundary <= count.

    Values are looked up directly rather than through optax.piecewise_constant_schedule,
    whose multiplicative scales cannot express a change from or to 0 (AlexNet's weight
    decay) and accumulate rounding across drops.
    """
    # NumPy constants: they become literals of whatever jitted step traces this, with no
    # device placement of their own to clash with the trainer's shardings.
    steps = np.asarray([s for s, _ in boundaries], dtype=np.int32)
    values = np.asarray([v for _, v in boundaries], dtype=np.float32)

    def schedule(count: jax.typing.ArrayLike) -> jax.Array:
        index = jnp.searchsorted(steps, jnp.asarray(count, jnp.int32), side="right") - 1
        return jnp.asarray(values)[jnp.maximum(index, 0)]

    return schedule


def _is_matrix(params: Any) -> Any:
    """Mask for LARS/LAMB: True for weights, False for 1-D biases and norm params."""
    return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


__all__ = [
    "BASE_REGIMES",
    "LR_SCALINGS",
    "OPTIMIZERS",
    "ResolvedRegime",
    "base_regime",
    "reset_every",
    "resolve",
]
