"""The trainer's pieces, each a module of its own with explicit arguments.

* `cadence`: when to log, evaluate, checkpoint and measure B_simple, and how many steps
  the next dispatch runs.
* `metric_writer`: metrics.jsonl, the TensorBoard events, the progress bar and
  summary.json (process 0 only).
* `programs`: the compiled programs the loop dispatches.
* `records`: a boundary's log and evaluation, started on the devices and written one
  dispatch later.
* `inputs`: the training and evaluation iterators, on the devices when they fit.
* `validation`: the config checks run before any compute.

The loop that drives them is ``gbn_jax.train.train_and_evaluate``. Importing this
package loads none of them (nor JAX).
"""
