"""Tools for studying the generalization gap (``pip install gbn-jax[train,research]``).

* `analysis`: a run's curves and the weight-distance fits of the diffusion analysis.
* `sharpness`: the largest Hessian eigenvalue and the worst-case sharpness of a trained
  model.

The gradient noise scale B_simple is measured inside a run by the trainer
(`gbn_jax.trainer.noise_scale`). Importing this package loads neither module; it
checks that the ``research`` extra is installed (``analysis`` reads a run's files with
`gbn_jax.trainer.run_files` and so also needs ``train``).
"""

from gbn_jax import extras

extras.require("research", "gbn_jax.research")
