"""Shared pytest set-up: 8 fake CPU devices, set before JAX starts its backend, and one
persistent compilation cache for the test run."""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Compiling is most of the suite's time on 2 cores, and it compiles many programs more
# than once: the command-line runs of test_train.py (each a fresh process) and models
# built anew in several tests. XLA's persistent cache, in a directory that lives as long
# as one pytest run (JAX reads the variable at import, and the subprocesses inherit it), serves a
# program compiled before from disk: the same executable, so no result depends on it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="gbn_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache

import jax
import pytest


@pytest.fixture(scope="session")
def devices():
    devs = jax.devices()
    assert len(devs) == 8, f"expected 8 fake CPU devices, got {len(devs)}"
    return devs
