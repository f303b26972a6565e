"""Transparent huge pages for the host memory of a CPU run (the CLI and the benchmarks).

XLA:CPU allocates each step's temporaries as large host buffers (hundreds of MB for
ResNet-44 at batch 128, 129 MB for F1 at batch 4096) and frees them after the step.
glibc serves buffers that large with mmap and returns them with munmap, so every step
faults its temporaries in again, 4 KiB at a time: 141k page faults and ~0.5 s of
kernel time per ResNet-44 step, 34k faults per F1 step at 4096, on the 2-core EPYC of
experiments/results. With glibc's ``glibc.malloc.hugetlb=1`` tunable, malloc asks for
transparent huge pages (madvise), and a step takes a few hundred faults of 2 MiB.

A tunable is read once, when the process starts, so `reexec_with_huge_pages` restarts
the running command (same pid, arguments and environment, plus the tunable) before it
does anything else; the command line and the experiment scripts call it first thing.
Only the allocator changes: every result is the same bit for bit (the SIGTERM and
SIGKILL tests of tests/test_train.py compare such a CLI run with an in-process run).

It acts only where it helps: Linux with glibc, and the kernel's THP mode ``madvise``
(with ``always`` large mappings get huge pages anyway; with ``never`` they cannot).
``GBN_JAX_HUGE_PAGES=0`` in the environment turns it off; a ``glibc.malloc.hugetlb``
already in ``GLIBC_TUNABLES`` is left as it is. Programs of your own that import
gbn_jax get the same effect from ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` in their
environment.

References:
  The GNU C Library manual, "Memory Allocation Tunables" (glibc.malloc.hugetlb, 2.35+).
  The Linux kernel documentation, admin-guide/mm/transhuge.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "GBN_JAX_HUGE_PAGES"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_ENABLED) -> str | None:
    """The kernel's transparent-huge-page mode (``always``, ``madvise`` or ``never``),
    the bracketed word of ``path``; None where the file is missing or unreadable."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def environment_with_huge_pages(
    environ: Mapping[str, str], mode: str | None
) -> dict[str, str] | None:
    """The environment to restart with, or None when there is nothing to change.

    Args:
      environ: the current environment.
      mode: `thp_mode`'s answer.

    Returns:
      ``environ`` with ``glibc.malloc.hugetlb=1`` added to ``GLIBC_TUNABLES`` (after
      any tunables already there), or None: THP mode other than ``madvise``, the
      tunable already set, or ``GBN_JAX_HUGE_PAGES=0``.
    """
    if environ.get(OPT_OUT, "1").strip() == "0" or mode != "madvise":
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if TUNABLE in tunables:
        return None
    setting = f"{TUNABLE}=1"
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{setting}" if tunables else setting}


def reexec_with_huge_pages() -> None:
    """Restarts this command with huge pages for malloc when that helps, else returns.

    Call it first thing in a command's ``__main__`` block, before any JAX computation
    (the restart discards the process's state). It replaces the process image with
    ``sys.executable`` and ``sys.orig_argv`` (pid, arguments and open files kept), so a
    launcher or a test that signals the pid still reaches the run.
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return
    environ = environment_with_huge_pages(os.environ, thp_mode())
    if environ is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
