"""Experiments: the paper's tables and figures (``paper``), the benchmarks (``bench``)
and the harness they share (``harness``). Run each as ``python -m experiments.<folder>.<name>``
from the repository root; ``gpu/`` holds the shell scripts for a GPU or TPU machine."""
