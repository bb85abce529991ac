#!/usr/bin/env bash
# The GPU check, run from the repository root on a machine with one CUDA device:
#   bash benchmarks/gpu_check.sh eager     # the bf16 bench table (steps, ratios, MFU, pairs/s, memory), then tests/test_gpu.py
#   bash benchmarks/gpu_check.sh compiled  # image steps (ours vs timm) and image-text pairs with torch.compile
# Results go to $OUT (default ./gpu-out): JSON reports and logs. Python packages the machine lacks may
# sit as wheels in .whl/ (installed to /tmp/site, no network needed). Each step has its own time limit
# so that one slow part cannot take the others' results with it.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
case "${1:-eager}" in
  eager)
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
    python3 -c "import torch, transformers, timm; print('torch', torch.__version__, 'transformers', transformers.__version__, 'timm', timm.__version__)" | tee -a "$OUT/gpu.txt"
    timeout 330 python3 -m upctl bench --device cuda --sections peak,train,memory --sizes base --rounds 2 \
      --json "$OUT/gpu-eager.json" 2>&1 | tee "$OUT/bench-eager.log" || status=1
    timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/tests.log" || status=1
    ;;
  compiled)
    timeout 300 python3 -m upctl bench --device cuda --compile --rounds 1 --kinds image,retrieval \
      --sections peak,train --sizes base --json "$OUT/gpu-compiled.json" 2>&1 | tee "$OUT/bench-compiled.log" || status=1
    ;;
  *) echo "usage: bash benchmarks/gpu_check.sh eager|compiled" >&2; exit 2 ;;
esac
exit $status
