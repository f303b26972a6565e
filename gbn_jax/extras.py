"""The optional dependencies of the trainer and the research tools, and a clear error
when they are missing."""

import importlib.util

# Top-level modules of each extra in pyproject.toml (`pip install gbn-jax[<extra>]`).
EXTRAS = {
    "train": (
        "optax",
        "orbax",
        "ml_collections",
        "tensorflow_datasets",
        "grain",
        "PIL",
        "tqdm",
        "absl",
        "tensorboardX",
    ),
    "research": ("optax", "scipy", "matplotlib", "tqdm"),
}


def require(extra: str, user: str) -> None:
    """Raises ImportError naming the fix if a module of `extra` is not installed.

    Args:
      extra: "train" or "research".
      user: the module that needs it, for the message.
    """
    missing = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"{user} needs gbn-jax's '{extra}' extra; not installed: {', '.join(missing)}. "
            f"Install it with: pip install 'gbn-jax[{extra}]'"
        )
