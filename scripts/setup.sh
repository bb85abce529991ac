#!/usr/bin/env bash
# Create ./.venv and install upctl with the test and mini extras.
# torch 2.14.1 / torchvision 0.29.1 are pinned first so pip takes them from this machine's local
# wheel store instead of resolving a multi-GB download (see README, "Set-up").
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" || python -m pip install -q torch torchvision
python -m pip install -q -e ".[test,mini,eval]"
