"""Command line: train one experiment config into a workdir (rerun to resume).

  python -m gbn_jax.main --config=configs/fashion_mnist_f1.py:lb_lr_gbn_ra,batch=2048 \\
      --workdir=runs/f1_lb_lr_gbn_ra --config.max_steps=100

A workdir holds one run (docs/workdir.md): rerunning with another config stops before
any compute; ``--allow_config_change`` continues the run with changes that leave its
updates as they were (more steps, cadences, paths: ``gbn_jax.trainer.workdir.ALLOWED_CHANGES``).

Multi-process (one process per host, or several on one machine): set
``--coordinator_address=host:port --num_processes=N --process_id=i`` (or the
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID environment variables);
on a multi-host Cloud TPU slice or a multi-task SLURM job JAX finds them itself
(``--distributed`` forces that auto-detection elsewhere).
"""

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from gbn_jax.trainer import checkpointing, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output and checkpoint directory.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"), "host:port of process 0."
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", int(os.environ.get("JAX_NUM_PROCESSES", 0)) or None, "Process count."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", int(os.environ.get("JAX_PROCESS_ID", -1)), "This process's index."
)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Continue the run in --workdir with a config that differs from its own only in "
    "fields that leave its updates as they were (gbn_jax.trainer.workdir.ALLOWED_CHANGES: "
    "max_steps, cadences, data_dir, ...); the change is recorded in the workdir.",
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() with auto-detection (TPU, SLURM)."
)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        # Orbax logs every save at INFO; the trainer prints what a user needs.
        logging.set_verbosity(logging.WARNING)
    auto_cluster = (
        int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")  # multi-host TPU slice
    )
    if _COORDINATOR.value or _DISTRIBUTED.value or auto_cluster:
        # CPU-only clusters need a collectives backend; GPUs and TPUs ignore this flag.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=None if _PROCESS_ID.value < 0 else _PROCESS_ID.value,
        )
    logging.warning(
        "process %d/%d, %d devices (%s)",
        jax.process_index(),
        jax.process_count(),
        jax.device_count(),
        jax.devices()[0].device_kind,
    )
    try:
        # After a preemption notice (SIGTERM) this returns early, its checkpoint saved:
        # a clean exit, and rerunning the command continues the run.
        train.train_and_evaluate(
            _CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value
        )
    except (ValueError, train.NonFiniteLossError, checkpointing.CheckpointError) as e:
        # Bad or changed configurations, diverged runs, checkpoints that cannot be
        # written or read: the message says what to do.
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


def run() -> None:
    """The command line's entry point (also ``python -m gbn_jax.main``)."""
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)


if __name__ == "__main__":
    run()
