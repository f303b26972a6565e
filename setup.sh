#!/usr/bin/env bash
# Fresh-machine set-up: Debian's Fashion-MNIST package and a virtualenv in .venv.
# Usage: ./setup.sh [EXTRAS]   the extras to install, "train,research" by default (the
# experiments); ./setup.sh test for the test suite (pytest, ruff, train and research).
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq dataset-fashion-mnist
fi
[ -x .venv/bin/python ] || python3.11 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[${1:-train,research}]"
