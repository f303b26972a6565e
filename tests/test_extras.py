"""gbn_jax.extras: the check that a subpackage's extra is installed."""

import importlib.util
import tomllib
from pathlib import Path

import pytest

from gbn_jax import extras

ROOT = Path(__file__).resolve().parents[1]


def test_a_missing_module_is_named_with_the_install_command(monkeypatch):
    monkeypatch.setitem(extras.EXTRAS, "train", ("json", "no_such_module_xyz"))
    with pytest.raises(ImportError) as e:
        extras.require("train", "gbn_jax.trainer")
    message = str(e.value)
    assert "no_such_module_xyz" in message and "json" not in message.split("installed:")[1]
    assert "pip install 'gbn-jax[train]'" in message


def test_installed_extras_pass():
    for extra in extras.EXTRAS:
        extras.require(extra, "test")


def test_every_listed_module_belongs_to_a_dependency_of_its_extra():
    # Distribution names as pyproject.toml lists them, mapped to their top-level modules.
    modules_of = {
        "optax": "optax",
        "orbax-checkpoint": "orbax",
        "ml-collections": "ml_collections",
        "tensorflow-datasets": "tensorflow_datasets",
        "grain": "grain",
        "pillow": "PIL",
        "tqdm": "tqdm",
        "absl-py": "absl",
        "tensorboardX": "tensorboardX",
        "scipy": "scipy",
        "matplotlib": "matplotlib",
    }
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for extra, listed in extras.EXTRAS.items():
        names = [
            req.split(">")[0].split("<")[0].split("=")[0].strip()
            for req in project["optional-dependencies"][extra]
        ]
        assert sorted(listed) == sorted(modules_of[n] for n in names)
        assert all(importlib.util.find_spec(m) is not None for m in listed)
