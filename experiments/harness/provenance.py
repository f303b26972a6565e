"""Where a record comes from: commit, whole-tree dirty flag, config, hardware, date.

Every record the experiments write (a training run, a sharpness measurement, a
benchmark, a GPU run) carries ``provenance(...)``; the hardware part is
``hardware()``, whose CPU is read from /proc/cpuinfo by ``cpu_model()`` (its name) and
``cpu_id()`` (family, model and vector instruction sets).

Run as a module it writes the record of this checkout and machine as JSON (the GPU
scripts keep one next to their outputs):

  python -m experiments.harness.provenance [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO_ROOT / "experiments" / "results"
PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy")


def git_commit(repo: Path = REPO_ROOT) -> str | None:
    """The checked-out commit, with '+dirty' when anything in the tree is uncommitted.

    The dirty flag looks at the whole tree (``git status --porcelain`` without path
    filters): an uncommitted change anywhere may change what ran.
    """
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def split_commit(commit: str | None) -> tuple[str | None, bool | None]:
    """``git_commit()``'s string as (sha, dirty)."""
    if not commit:
        return None, None
    return commit.removesuffix("+dirty"), commit.endswith("+dirty")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


# The vector instruction sets XLA:CPU can compile for; two CPUs that differ in these
# round the same program differently.
VECTOR_ISA = (
    *("avx", "avx2", "fma", "avx_vnni"),
    *("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16", "amx_tile"),
)


def cpu_id(cpuinfo: str | None = None) -> str | None:
    """The CPU's family, model and stepping and its vector instruction sets, from
    /proc/cpuinfo (or the text given), e.g. "family 25 model 17 stepping 1; avx avx2 fma
    avx512f". A virtual machine may name two CPUs alike ("AMD EPYC"); this tells them
    apart. None where /proc/cpuinfo cannot be read."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # the first processor's block is enough
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    if "cpu family" not in fields:
        return None
    flags = set(fields.get("flags", "").split())
    isa = " ".join(f for f in VECTOR_ISA if f in flags)
    return (
        f"family {fields['cpu family']} model {fields.get('model', '?')} "
        f"stepping {fields.get('stepping', '?')}; {isa or 'no AVX'}"
    )


def package_versions(packages: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    """Installed versions (None for a package that is not installed)."""
    versions = {}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def hardware(packages: Sequence[str] = PACKAGES) -> dict[str, Any]:
    """What the numbers were measured on: CPU model (name and `cpu_id`) and count, OS,
    Python, versions."""
    return dict(
        cpu=cpu_model(),
        cpu_id=cpu_id(),
        cpu_count=os.cpu_count(),
        platform=platform.platform(),
        python=platform.python_version(),
        versions=package_versions(packages),
    )


def utc_date() -> str:
    """Now, as the records write it: ``YYYY-MM-DD HH:MM UTC``."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def provenance(
    config: dict[str, Any] | None = None,
    *,
    commit: str | None = None,
    packages: Sequence[str] = PACKAGES,
) -> dict[str, Any]:
    """The provenance fields of a record.

    Args:
      config: the resolved config of what ran, where there is one.
      commit: ``git_commit()`` taken when the work started (default: now).
      packages: the packages whose versions go into ``hardware``.

    Returns:
      ``commit`` (sha), ``dirty`` (bool, whole tree), ``config``, ``hardware``, ``date``.
    """
    sha, dirty = split_commit(commit if commit is not None else git_commit())
    return dict(
        commit=sha, dirty=dirty, config=config, hardware=hardware(packages), date=utc_date()
    )


def module_command(module: str, argv: Sequence[str] | None = None) -> str:
    """How to run ``module`` with ``argv`` (default: this process's) from the repository
    root: ``python -m <module> <args>``."""
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", "-m", module, *args])


def environment(module: str, args: argparse.Namespace | None = None) -> dict[str, Any]:
    """A benchmark's record of where it ran: devices, library versions, compiler and
    allocator settings, the command, the load at the start, its arguments, and
    ``provenance()``.

    Args:
      module: the benchmark's module (``experiments.bench.<name>``), for the command.
      args: its parsed arguments.
    """
    import flax
    import jax
    import jaxlib
    import optax

    env = {
        "cpu": cpu_model(),
        "cpu_id": cpu_id(),
        "cpu_count": os.cpu_count(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        # glibc.malloc.hugetlb=1 when the process runs with huge pages (docs/performance.md).
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "command": module_command(module),
        "load_average_start": os.getloadavg(),
        "args": vars(args) if args is not None else None,
    }
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
    except ImportError:
        env["torch"] = None
    return {**env, **provenance(packages=(*PACKAGES, "torch"))}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="JSON file (default: print)")
    args = parser.parse_args(argv)
    text = json.dumps(provenance(), indent=1) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
