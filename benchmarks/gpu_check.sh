#!/usr/bin/env bash
# The GPU check, run from the repository root on a machine with one CUDA device (H100 / H200 class):
#   bash benchmarks/gpu_check.sh all       # versions, eager steps, compiled steps and every lever, tests/test_gpu.py
#   bash benchmarks/gpu_check.sh rerun     # the compiled steps and the levers again (a second try, ~4.5 min)
#   bash benchmarks/gpu_check.sh autotune  # the image step compiled with max-autotune-no-cudagraphs, alone
#   bash benchmarks/gpu_check.sh summary   # the summary table again, from $OUT/rows.jsonl
#   bash benchmarks/gpu_check.sh eager     # the earlier runs: the full eager table (video, captioning and
#   bash benchmarks/gpu_check.sh compiled  #   checkpointing memory too) then the tests; compiled image steps and pairs
# Results go to $OUT (default ./gpu-out), at most 8 files: gpu.txt (GPU, driver, versions), eager.json,
# levers.json (autotune.json), rows.jsonl (every row as it is measured: what a step cut short keeps),
# bench.log (all bench output, a failing case's last lines included), tests.log, summary.txt.
# Python packages the machine lacks sit as wheels in .whl/ (ftfy and its wcwidth, which the tokenizer
# imports for tests/test_gpu.py; the bench imports neither; PyAV is not needed) and are installed to
# /tmp/site, no network needed.
#
# Every step has its own `timeout`, and inside a bench step every case has its own limit (--case-timeout,
# --keep-going: a failing or slow case is an error row, the others still report). Compiled cases warm up
# (compile) side by side in long-lived workers (--jobs) and are then timed one at a time, so compilation
# overlaps but timings never share the GPU; the tests run beside the warm-ups and the timing waits for them.
#
# Wall time on an H100-class GPU with 16 CPU cores, estimated step by step (the previous run compiled a
# base ViT step in 40-90 s per distinct graph; a timed case here is 22 steps of 45-130 ms):
#   setup, nvidia-smi, versions .......................................   ~10 s   (limit  60 s)
#   eager: 8 cases (ours/bert text, ours/timm image, ours pairs, and ours under CUDA graphs) start 4 at a
#     time (~25 s), matmul peak (~5 s), 2 ABBA rounds timed one case at a time (~30 s) .....   ~60 s   (limit 120 s)
#   levers: 16 cases (compiled: ours/bert text, ours/timm image, ours pairs; then on our step: whole-step
#     compile, CUDA graphs, bf16 optimizer state (image), chunked contrastive loss (pairs), all stacked)
#     in 9 compile groups, 6 at a time; a group's later cases find its graph in the compile cache:
#     ~200-240 s, tests/test_gpu.py beside them; then peak and 1 round timed (~16 x 2.5 s) ..  ~270 s  (limit 370 s)
#   summary .............................................................    ~2 s   (limit  20 s)
#   all: ~5.7 min expected, at most 9.6 min (the limits). rerun: levers + summary, ~4.6 min, at most 7.6 min.
#   Every row is appended to rows.jsonl as soon as its case is timed, so a step cut short keeps what it timed.
# max-autotune is not in `all`: it benchmarks every matmul's candidate kernels on the GPU while it compiles,
# so it must not share the GPU with other warm-ups, and alone it adds minutes of compilation to the whole
# step; `autotune` gives it one case (base image, whole step; 260 s to compile) beside the same step
# compiled plainly, warmed one after the other (limit 380 s, expected 3-6 min).
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
ROWS="$OUT/rows.jsonl"
LOG="$OUT/bench.log"
LEVERS="compiled,step,graphs,bf16-optim:image,chunked-loss,stacked"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-4}
# torch.compile's on-disk caches (the defaults of recent torch, set so that a group's later cases hit them).
export TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1
status=0

setup() {
  if compgen -G ".whl/*.whl" >/dev/null; then
    timeout 30 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || status=1
    export PYTHONPATH=/tmp/site
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
}

info() {
  { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
    timeout 30 python3 -c "import sys, torch, triton, transformers, timm; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'timm', timm.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name())"
  } 2>&1 | tee "$OUT/gpu.txt"
}

mark() {  # a marker row: which step the rows after it belong to
  echo "{\"section\": \"step\", \"name\": \"$1\"}" >> "$ROWS"
}

bench() {  # bench STEP LIMIT ARGS...: one `upctl bench` invocation under its own time limit
  local step=$1 limit=$2
  shift 2
  mark "$step"
  echo "== $step: upctl bench $*" | tee -a "$LOG"
  timeout -k 10 "$limit" python3 -m upctl bench --device cuda --sections "${SECTIONS:-peak,train}" --sizes base \
    --keep-going --jsonl "$ROWS" --json "$OUT/$step.json" "$@" 2>&1 | tee -a "$LOG" || {
    echo "== $step: exit $? (124: hit its ${limit} s limit)" | tee -a "$LOG"; status=1; }
}

eager() {
  bench eager 120 --levers eager,eager-graphs --kinds text,image,retrieval --rounds 2 --jobs 4 --case-timeout 90
}

levers() {  # LEVERS with the compiled baselines; with `tests`, tests/test_gpu.py runs beside the warm-ups
  local done_file=""
  if [ "${1:-}" = tests ]; then
    done_file=$(mktemp -u /tmp/gpu-tests-done.XXXXXX)
    ( timeout -k 10 270 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py > "$OUT/tests.log" 2>&1
      echo "pytest exit $?" >> "$OUT/tests.log"; touch "$done_file" ) &
  fi
  bench levers 370 --levers "$LEVERS" --kinds text,image,retrieval --rounds 1 --jobs 6 --case-timeout 240 \
    ${done_file:+--wait-for "$done_file"}
  wait
  if [ -n "$done_file" ]; then
    tail -n 3 "$OUT/tests.log"
    grep -q "pytest exit 0" "$OUT/tests.log" || status=1
    rm -f "$done_file"
  fi
}

autotune() {  # the whole image step compiled plainly (cached if `all` ran on this machine) and max-autotuned
  bench autotune 380 --levers step:image,autotune:image --kinds image --rounds 1 --jobs 1 --case-timeout 260
}

summary() {
  timeout 20 python3 - "$ROWS" <<'PY' 2>&1 | tee "$OUT/summary.txt"
"""The lever table and the targets, from the rows every bench step appended to rows.jsonl."""
import json
import sys

H100_PEAK = 765.5  # TFLOP/s: the bf16 matmul peak of the H100 run (eager), to turn pairs/s into a ratio
steps, current = {}, None
for line in open(sys.argv[1], encoding="utf-8"):
    row = json.loads(line)
    if row["section"] == "step":
        current = row["name"]
        steps[current] = []
    elif current is not None:
        steps[current].append(row)

best_mfu, best_vs, best_pairs = {}, {}, None
nan = float("nan")
for step, rows in steps.items():
    peaks = [r["gflops_per_s"] / 1e3 for r in rows if r["section"] == "peak"]
    peak = peaks[0] if peaks else nan
    print(f"\n== {step}: bf16 matmul peak {peak:.1f} TFLOP/s (the MFU denominator of this step)")
    print(f"{'case':60} {'s/step':>7} {'samples/s':>9} {'MFU':>5} {'pipeMFU':>7} {'syncs':>5} {'peak MB':>7} "
          f"{'rsv MB':>7} {'warm s':>6} {'x comp':>6} {'x base':>6}")
    train = {r["name"]: r for r in rows if r["section"] == "train_step"}
    for name, r in train.items():
        impl, size, kind = name.split(" ")[:3]
        compiled = train.get(f"ours {size} {kind} compiled")
        base = train.get(f"{'bert' if kind == 'text' else 'timm-vit'} {size} {kind} compiled")
        x_comp = compiled["median_s"] / r["median_s"] if compiled and impl == "ours" else None
        x_base = base["median_s"] / r["median_s"] if base and impl == "ours" else None
        print(f"{name:60} {r['median_s']:7.4f} {r['samples_per_s']:9.1f} {r['mfu']:5.3f} "
              f"{r.get('pipelined_mfu', nan):7.3f} {r.get('host_syncs', ''):>5} {r['peak_mem_mb']:7.0f} "
              f"{r.get('peak_reserved_mb', nan):7.0f} {r.get('warmup_s', nan):6.1f} {'' if x_comp is None else f'{x_comp:.3f}':>6} "
              f"{'' if x_base is None else f'{x_base:.3f}':>6}")
        if impl != "ours" or " compiled" not in name:
            continue
        if r["mfu"] > best_mfu.get(kind, (0, ""))[0]:
            best_mfu[kind] = (r["mfu"], name)
        if x_base is not None and x_base > best_vs.get(kind, (0, ""))[0]:
            best_vs[kind] = (x_base, name)
        if kind == "retrieval" and (best_pairs is None or r["samples_per_s"] > best_pairs[0]):
            best_pairs = (r["samples_per_s"], name, peak, r.get("pipelined_samples_per_s", nan))
    for r in rows:
        if r["section"] == "ratio":
            print(f"ratio {r['name']}: {r['ratio']} (per round {r['per_round']})")
        elif r["section"] == "error":
            print(f"ERROR {r['name']}: {r['error']}")

print("\n== targets: the best compiled case of this run for each")
for kind in ("text", "image"):
    if kind in best_mfu:
        value, name = best_mfu[kind]
        print(f"base {kind} step MFU >= 0.50: {value:.3f} ({name}): {'MET' if value >= 0.5 else 'not met'}")
    if kind in best_vs:
        value, name = best_vs[kind]
        other = "BertModel" if kind == "text" else "timm ViT-B/16"
        print(f"base {kind} >= 1.0x {other} compiled: {value:.3f} ({name}): {'MET' if value >= 1.0 else 'not met'}")
if best_pairs:
    value, name, peak, pipelined = best_pairs
    scaled = value * H100_PEAK / peak
    print(f"image-text pairs/s >= 3000 on an H100: {value:.0f} here ({name}; {pipelined:.0f} back to back), "
          f"x {H100_PEAK}/{peak:.1f} (H100 run's peak / this peak) = {scaled:.0f}: {'MET' if scaled >= 3000 else 'not met'}")
PY
}

setup
for mode in "${@:-all}"; do
  case "$mode" in
    all) : > "$ROWS"; info; eager; levers tests; summary ;;
    rerun) : > "$ROWS"; info; levers; summary ;;
    autotune) info; autotune; summary ;;
    eager) : > "$ROWS"; info; SECTIONS=peak,train,memory bench eager-full 330 --rounds 2
      timeout -k 10 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/tests.log" || status=1
      summary ;;
    compiled) : > "$ROWS"; info; bench compiled 300 --compile --rounds 1 --kinds image,retrieval; summary ;;
    summary) summary ;;
    *) echo "usage: bash benchmarks/gpu_check.sh all|rerun|autotune|summary|eager|compiled" >&2; exit 2 ;;
  esac
done
exit $status
