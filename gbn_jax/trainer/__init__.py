"""The trainer (``pip install gbn-jax[train]``): ``python -m gbn_jax.main``.

* `main`: the command line.
* `train`: `train_and_evaluate`, the loop.
* `config_lib`, `regimes`: the experiment configs' options and the training regimes
  (LR schedule, optimizer, clipping, regime adaptation).
* `validation`: the config checks run before any compute.
* `inputs`, `input_pipeline`, `data`: the datasets, their iterators and the feed onto
  the devices.
* `steps`, `programs`: the train and evaluation steps and the compiled programs the
  loop dispatches.
* `noise_scale`: the gradient noise scale B_simple, measured during a run.
* `cadence`: when to log, evaluate, checkpoint and measure B_simple, and how many steps
  the next dispatch runs.
* `records`, `metric_writer`: a boundary's log and evaluation, and the files they go
  to (metrics.jsonl, TensorBoard, summary.json).
* `checkpointing`, `workdir`, `run_files`: checkpoints, the workdir's identity and the
  reading and writing of a run's files.

Importing this package loads none of them; it checks that the ``train`` extra is
installed and otherwise raises an ImportError that says how to install it.
"""

from gbn_jax import extras

extras.require("train", "gbn_jax.trainer")
