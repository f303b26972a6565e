"""WideResNet-16-4 (Zagoruyko & Komodakis) on CIFAR-100.

Launch (the config argument picks a column of the paper's table; options follow it):

  python -m gbn_jax.main --config=configs/cifar100_wrn16_4.py:lb_lr_gbn_ra \\
      --workdir=runs/cifar100_wrn16_4/lb_lr_gbn_ra

Variants: sb, lb, lb_lr, lb_lr_gbn, lb_lr_gbn_ra (cumulative, as the paper's columns),
goyal (linear scaling + 5 warm-up epochs) and lars. Options: batch=, ghost=,
epochs_scale=, seed=, dataset=, dtype=, model=, eval_every= (e.g.
``:lb_lr_gbn_ra,batch=2048,ghost=64``); any field also takes ``--config.x.y=...``.

Expected runtime: not measured. 200 epochs = 10M images per column (x8 with RA at
batch 1024).

Expected result: Paper (CIFAR-100, WResNet16-4): SB 73.70%, LB 68.15%, +LR 69.05%, +GBN 71.20%,
+RA 73.57%. The authors' large batch for this row is 1024.

References:
  Hoffer, Hubara & Soudry (2017), table 1 and section 5.
"""

import ml_collections

from gbn_jax.trainer import config_lib, regimes

# |B_L|: the large batch of this row in the authors' runs; |B_S| comes from the regime.
LARGE_BATCH_SIZE = 1024


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the config of one variant (see the module docstring)."""
    variant, options = config_lib.parse_arg(arg)
    config = config_lib.trainer_defaults()
    config.dataset = "cifar100"
    config.model = config_lib.model_config("wide_resnet")
    config.regime = regimes.base_regime("wide_resnet")
    # Derived from the variant: batch_size (|B_L|, or |B_S| for sb), model.norm,
    # model.ghost_batch_size (= |B_S| = regime.reference_batch_size unless ghost=),
    # regime.lr_scaling, regime_adaptation, warmup_epochs, grad_clip_norm, optimizer.
    return config_lib.apply_variant(config, variant, options, large_batch_size=LARGE_BATCH_SIZE)
