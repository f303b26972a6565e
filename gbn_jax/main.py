"""``python -m gbn_jax.main``: the trainer's command line, `gbn_jax.trainer.main`."""

from gbn_jax.trainer.main import run

if __name__ == "__main__":
    run()
