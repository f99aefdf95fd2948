#!/usr/bin/env bash
# Create .venv with everything the demo and the tests need, at the versions CI uses.
# torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
export PIP_NO_CACHE_DIR=1  # CI machines have little disk to spare: no second copy of every wheel
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt torch torchvision
.venv/bin/python -m pip install -q -c constraints.txt -e ".[export,dev,serve]"
