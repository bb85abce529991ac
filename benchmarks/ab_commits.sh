#!/usr/bin/env bash
# Same-run A/B of one training-step case between two commits (or a commit and the working tree):
#   bash benchmarks/ab_commits.sh BEFORE_REV [AFTER_REV|worktree] '<worker case JSON>' [ROUNDS]
# e.g. bash benchmarks/ab_commits.sh HEAD~1 worktree \
#        '{"impl":"ours","size":"small","kind":"image","batch":16,"frames":1,"measure_memory":true}' 3
# BEFORE (and AFTER unless "worktree") are checked out into temporary git worktrees; each round runs
# before then after, each in a fresh process (uniperceiver.bench.worker), with the fixed glibc mmap
# threshold the bench's memory section uses. Prints one line per run and the median after/before ratio.
# Run it with the project's environment active (the `python` on PATH must import torch).
set -euo pipefail
before=$1; after=${2:-worktree}; spec=$3; rounds=${4:-3}
root=$(git rev-parse --show-toplevel)
tmp=$(mktemp -d)
trap 'git -C "$root" worktree remove --force "$tmp/before" >/dev/null 2>&1 || true;
      git -C "$root" worktree remove --force "$tmp/after" >/dev/null 2>&1 || true; rm -rf "$tmp"' EXIT
git -C "$root" worktree add -q --detach "$tmp/before" "$before"
if [ "$after" = worktree ]; then after_dir=$root; else git -C "$root" worktree add -q --detach "$tmp/after" "$after"; after_dir=$tmp/after; fi
run() {  # dir -> "seconds fwd_bwd_MB"
  (cd "$1" && MALLOC_MMAP_THRESHOLD_=131072 PYTHONPATH="$1" python -m uniperceiver.bench.worker "$spec" \
    | python -c "import json,sys; d=json.loads(sys.stdin.read().split('RESULT ',1)[1]); print(d['median_s'], round(d['fwd_bwd_mem_bytes']/2**20, 1))")
}
ratios=()
for r in $(seq 1 "$rounds"); do
  read -r tb mb < <(run "$tmp/before")
  read -r ta ma < <(run "$after_dir")
  echo "round $r: before ${tb}s (fwd+bwd ${mb} MB)  after ${ta}s (fwd+bwd ${ma} MB)  after/before $(python -c "print(round($ta/$tb, 3))")"
  ratios+=("$(python -c "print($ta/$tb)")")
done
python -c "import statistics,sys; print('median after/before time ratio:', round(statistics.median(map(float, sys.argv[1:])), 3))" "${ratios[@]}"
