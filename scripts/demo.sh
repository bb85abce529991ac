#!/usr/bin/env bash
# The README's main command: install into ./.venv (scripts/setup.sh), then run the mini benchmark.
#
#   bash scripts/demo.sh                 # 3 seeds, about 10 minutes on a 2-core CPU; results in demo-out/
#   bash scripts/demo.sh --quick         # a 2-minute smoke run (1 seed, a few steps; numbers not meaningful)
#   bash scripts/demo.sh --out my-run    # any `upctl demo` option (see `upctl demo --help`)
#
# Stages, each a real `upctl` command (their output is in demo-out/logs/): prepare mini, pretrain
# recipes/mini/pretrain.yaml per seed, zeroshot / prompt-tune + evaluate / finetune + evaluate on the
# held-out tasks. The table is printed and written to demo-out/results.md, .json and .png.
# Set UPCTL_SKIP_SETUP=1 to reuse an existing ./.venv without running pip (e.g. offline).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
if [ "${UPCTL_SKIP_SETUP:-0}" = "1" ] && [ -x .venv/bin/upctl ]; then
  echo "setup: skipped (UPCTL_SKIP_SETUP=1), using ./.venv"
else
  echo "setup: installing upctl into ./.venv (scripts/setup.sh)"
  bash scripts/setup.sh
fi
. .venv/bin/activate
echo "setup: done in $(( $(date +%s) - start )) s"
upctl demo "$@"
echo "scripts/demo.sh: finished in $(( $(date +%s) - start )) s"
