"""Input pipeline internals; the public entry point is `gbn_jax.trainer.input_pipeline`.

- `sources`: dataset names, IDX and TFDS readers, `DatasetInfo`, missing-data errors.
- `augment`: on-device crop/flip/normalize and host-side ImageNet crops.
- `iterators`: the resumable, multi-host train and evaluation iterators.
- `feed`: the trainer's view: splits held on the devices, per-dispatch chunks of steps,
  and one-pass evaluation.
"""
