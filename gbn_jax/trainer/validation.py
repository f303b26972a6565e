"""The checks of an experiment config run before any compute; each error names the fix.

References:
  Hoffer, Hubara & Soudry (2017), section 4 (ghost batches of |B_S| examples);
  McCandlish et al. (2018), appendix A.1 (the two batch sizes of B_simple).
"""

import ml_collections

from gbn_jax import models
from gbn_jax.ghost_norm import nearest_divisor
from gbn_jax.trainer import input_pipeline
from gbn_jax.trainer.cadence import LOG_SCHEDULES


def validate_config(
    config: ml_collections.ConfigDict, *, device_count: int, process_count: int
) -> None:
    """Checks a config before any compute; every message names the value and the fix.

    Args:
      config: the experiment config.
      device_count: devices of all processes.
      process_count: number of processes.

    Raises:
      ValueError: a bad model, norm, batch or cadence.

    References:
      Hoffer, Hubara & Soudry (2017), section 4 (ghost batches of |B_S| examples).
    """
    if config.model.name not in models.MODELS:
        raise ValueError(
            f"unknown model {config.model.name!r}; use one of {sorted(models.MODELS)} "
            f"(--config.model.name=... or the model= option)."
        )
    if config.model.norm not in ("batch", "ghost"):
        raise ValueError(f"model.norm={config.model.norm!r}; use 'batch' or 'ghost'.")
    batch = config.batch_size
    if not isinstance(batch, int) or batch <= 0:
        raise ValueError(f"batch_size={batch!r} must be a positive integer.")
    if batch % process_count:
        raise ValueError(
            f"batch_size={batch} is not divisible by the {process_count} processes; use a "
            f"multiple of {process_count} (e.g. {round_up(batch, process_count)})."
        )
    if batch % device_count:
        raise ValueError(
            f"batch_size={batch} is not divisible by the {device_count} devices; use a "
            f"multiple of {device_count} (e.g. batch={round_up(batch, device_count)})."
        )
    if config.model.norm == "ghost":
        ghost = config.model.ghost_batch_size
        per_device = batch // device_count
        if not isinstance(ghost, int) or ghost <= 0:
            raise ValueError(f"model.ghost_batch_size={ghost!r} must be a positive integer.")
        if per_device % ghost:
            raise ValueError(
                f"the per-device batch {per_device} (batch_size={batch} over {device_count} "
                f"device(s)) is not divisible by the ghost batch size {ghost}: ghost "
                f"batches must not straddle devices or be cut short. Use "
                f"ghost={nearest_divisor(per_device, ghost)} (a divisor of {per_device}) or "
                f"batch={round_up(batch, ghost * device_count)} (a multiple of "
                f"ghost x devices = {ghost * device_count})."
            )
    validation_size = config.get("validation_size", 0)
    if (
        isinstance(validation_size, bool)
        or not isinstance(validation_size, int)
        or (validation_size < 0)
    ):
        raise ValueError(
            f"validation_size={validation_size!r} must be an integer >= 0 (0: no split held "
            f"out; e.g. validation=10000 in the config argument)."
        )
    if config.get("augment", "default") not in input_pipeline.AUGMENTS:
        raise ValueError(f"augment={config.augment!r}; use one of {input_pipeline.AUGMENTS}.")
    if config.log_schedule not in LOG_SCHEDULES:
        raise ValueError(f"log_schedule={config.log_schedule!r}; use one of {LOG_SCHEDULES}.")
    for name in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        if config[name] <= 0:
            raise ValueError(f"{name}={config[name]} must be positive.")
    for name in ("eval_every_steps", "max_steps", "steps_per_loop"):
        if config.get(name) is not None and config[name] <= 0:
            raise ValueError(f"{name}={config[name]} must be positive (or unset).")
    noise_scale_small_batch(config, device_count=device_count)


def noise_scale_small_batch(config: ml_collections.ConfigDict, *, device_count: int) -> int | None:
    """b, the small batch of the B_simple measurement, or None when it is off.

    ``config.noise_scale.small_batch_size``, or unset: the regime's |B_S|
    (``regime.reference_batch_size``), or B / 4 when the batch is |B_S| or smaller
    (the small-batch column has no smaller regime batch to shard into).

    Args:
      config: the experiment config; ``noise_scale.every_steps`` unset turns it off.
      device_count: devices of all processes.

    Returns:
      b, or None.

    Raises:
      ValueError: a cadence that is not positive, or a b that does not give at least
        two whole shards per batch on every device, or that ghost batches do not divide.

    References:
      McCandlish et al. (2018), appendix A.1 (two batch sizes, b < B).
    """
    settings = config.get("noise_scale") or {}
    every = settings.get("every_steps")
    if every is None:
        return None
    if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
        raise ValueError(
            f"noise_scale.every_steps={every!r} must be a positive number of steps between "
            "B_simple measurements (e.g. noise_scale_every=25 in the config argument); "
            "unset it to measure nothing."
        )
    batch = config.batch_size
    small = settings.get("small_batch_size")
    if small is None:
        reference = config.regime.get("reference_batch_size") or batch
        small = reference if reference < batch else batch // 4
    per_device = batch // device_count
    fix = "set --config.noise_scale.small_batch_size to a divisor of"
    if isinstance(small, bool) or not isinstance(small, int) or small <= 0:
        raise ValueError(f"noise_scale.small_batch_size={small!r} must be a positive integer.")
    if small >= batch or batch % small:
        raise ValueError(
            f"noise_scale.small_batch_size={small} must divide batch_size={batch} at least "
            f"twice: B_simple needs two batch sizes b < B. {fix} {batch} below it "
            f"(e.g. {batch // 4 or 1})."
        )
    if per_device % small:
        raise ValueError(
            f"noise_scale.small_batch_size={small} does not divide the per-device batch "
            f"{per_device} (batch_size={batch} over {device_count} devices): each shard of b "
            f"examples must lie on one device. {fix} {per_device}."
        )
    ghost = config.model.ghost_batch_size if config.model.norm == "ghost" else None
    if ghost and small % ghost:
        raise ValueError(
            f"noise_scale.small_batch_size={small} is not a multiple of the ghost batch size "
            f"{ghost}: a shard of b examples must hold whole ghost batches, as the step "
            f"normalizes them. {fix.replace('a divisor of', 'a multiple of')} {ghost}."
        )
    return small


def round_up(n: int, multiple: int) -> int:
    """The least multiple of `multiple` at or above `n`."""
    return -(-n // multiple) * multiple
