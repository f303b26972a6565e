"""AlexNet with batch norm on ImageNet (ILSVRC-2012).

Launch (the config argument picks a column of the paper's table; options follow it):

  python -m gbn_jax.main --config=configs/imagenet_alexnet.py:lb_lr_gbn_ra \\
      --workdir=runs/imagenet_alexnet/lb_lr_gbn_ra

Variants: sb, lb, lb_lr, lb_lr_gbn, lb_lr_gbn_ra (cumulative, as the paper's columns),
goyal (linear scaling + 5 warm-up epochs) and lars. Options: batch=, ghost=,
epochs_scale=, seed=, dataset=, dtype=, model=, eval_every= (e.g.
``:lb_lr_gbn_ra,batch=2048,ghost=64``); any field also takes ``--config.x.y=...``.

Expected runtime: not measured. Needs ImageNet prepared for TFDS (data_dir=...);
30 epochs = 38M images per column (x16 with RA at batch 4096).

Expected result: Paper (ImageNet top-1, AlexNet): SB 57.10%, LB 41.23%, +LR 53.25%, +GBN 54.92%
(53.93% at LB 8192, use batch=8192), +RA 59.5%.

References:
  Hoffer, Hubara & Soudry (2017), table 1 and section 5.
"""

import ml_collections

from gbn_jax.trainer import config_lib, regimes

# |B_L|: the large batch of this row in the authors' runs; |B_S| comes from the regime.
LARGE_BATCH_SIZE = 4096


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the config of one variant (see the module docstring)."""
    variant, options = config_lib.parse_arg(arg)
    config = config_lib.trainer_defaults()
    config.dataset = "imagenet2012"
    config.model = config_lib.model_config("alexnet")
    config.regime = regimes.base_regime("alexnet")
    # Derived from the variant: batch_size (|B_L|, or |B_S| for sb), model.norm,
    # model.ghost_batch_size (= |B_S| = regime.reference_batch_size unless ghost=),
    # regime.lr_scaling, regime_adaptation, warmup_epochs, grad_clip_norm, optimizer.
    return config_lib.apply_variant(config, variant, options, large_batch_size=LARGE_BATCH_SIZE)
