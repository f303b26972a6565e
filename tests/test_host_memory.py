"""gbn_jax.host_memory: when the CLI restarts with huge pages, and what the restart does.

That the restart changes no result is checked elsewhere: the SIGKILL and SIGTERM tests
of test_train.py run the CLI (restarted here, where THP is in madvise mode) and compare
it bit for bit with the in-process reference run.
"""

import json
import os
import subprocess
import sys

import pytest

from gbn_jax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "text, mode",
    [
        ("always [madvise] never\n", "madvise"),
        ("[always] madvise never\n", "always"),
        ("always madvise [never]\n", "never"),
        ("garbage\n", None),
    ],
)
def test_thp_mode_reads_the_bracketed_word(tmp_path, text, mode):
    path = tmp_path / "enabled"
    path.write_text(text)
    assert host_memory.thp_mode(str(path)) == mode


def test_thp_mode_without_the_file_is_none(tmp_path):
    assert host_memory.thp_mode(str(tmp_path / "missing")) is None


@pytest.mark.parametrize(
    "environ, mode, tunables",
    [
        ({"PATH": "/bin"}, "madvise", "glibc.malloc.hugetlb=1"),
        # Tunables already set stay, in front.
        (
            {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
            "madvise",
            "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1",
        ),
        # The user's own hugetlb choice, the opt-out and the other THP modes: no restart.
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", None),
        ({"GBN_JAX_HUGE_PAGES": "0"}, "madvise", None),
        ({}, "always", None),
        ({}, "never", None),
        ({}, None, None),
    ],
)
def test_environment_with_huge_pages(environ, mode, tunables):
    got = host_memory.environment_with_huge_pages(environ, mode)
    if tunables is None:
        assert got is None
    else:
        assert got == {**environ, "GLIBC_TUNABLES": tunables}


# Run as a script: restart, then report pid, arguments, tunables and how much of a
# 256 MiB malloc'd and written buffer the kernel backs with huge pages.
CHILD = r"""
import ctypes, importlib.util, json, os, sys
spec = importlib.util.spec_from_file_location("host_memory", sys.argv[1])
host_memory = importlib.util.module_from_spec(spec)
spec.loader.exec_module(host_memory)
host_memory.reexec_with_huge_pages()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
size = 256 << 20
buffer = libc.malloc(size)
ctypes.memset(buffer, 1, size)
huge_kb = 0
with open("/proc/self/smaps_rollup") as f:
    for line in f:
        if line.startswith("AnonHugePages:"):
            huge_kb = int(line.split()[1])
print(json.dumps({
    "pid": os.getpid(), "argv": sys.argv[1:], "executable": sys.executable,
    "tunables": os.environ.get("GLIBC_TUNABLES"), "huge_kb": huge_kb,
}))
"""


def run_child(tmp_path, env):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    module = os.path.join(ROOT, "gbn_jax", "host_memory.py")
    proc = subprocess.Popen(
        [sys.executable, str(script), module, "--flag=a b"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    return proc.pid, json.loads(out)


def test_restart_keeps_pid_and_arguments_and_gets_huge_pages(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "GBN_JAX_HUGE_PAGES")}
    pid, got = run_child(tmp_path, env)
    assert got["pid"] == pid
    assert got["argv"] == [os.path.join(ROOT, "gbn_jax", "host_memory.py"), "--flag=a b"]
    assert got["executable"] == sys.executable
    if host_memory.thp_mode() == "madvise":
        assert got["tunables"] == "glibc.malloc.hugetlb=1"
        # Most of the buffer in 2 MiB pages (without the tunable: none on this kernel).
        assert got["huge_kb"] >= 128 << 10
    else:
        assert got["tunables"] is None
    # Turned off: no restart, no tunable, and (madvise mode) no huge pages.
    _, off = run_child(tmp_path, {**env, "GBN_JAX_HUGE_PAGES": "0"})
    assert off["tunables"] is None
    if host_memory.thp_mode() == "madvise":
        assert off["huge_kb"] < 16 << 10


def test_the_command_line_restarts_before_jax_is_imported():
    """Loading gbn_jax and its command line module (everything that runs before the
    restart in `python -m gbn_jax.main`) must not import JAX: a restart would otherwise
    import it twice. The package's public names still resolve, on first use."""
    probe = (
        "import sys, gbn_jax, gbn_jax.main\n"
        "before = 'jax' in sys.modules\n"
        "from gbn_jax import GhostBatchNorm, ghost_batch_norm, ghost_norm\n"
        "same = (GhostBatchNorm is ghost_norm.GhostBatchNorm\n"
        "        and ghost_batch_norm is ghost_norm.ghost_batch_norm)\n"
        "try:\n"
        "    gbn_jax.no_such_name\n"
        "    missing = 'no error'\n"
        "except AttributeError as e:\n"
        "    missing = str(e)\n"
        "print(before, same, missing)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split(maxsplit=2)
    assert out[:2] == ["False", "True"]
    assert "no_such_name" in out[2]
