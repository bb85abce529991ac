#!/usr/bin/env bash
# Build everything the README's examples need, then run them, printing their real output
# (the README quotes it; tests/test_readme.py runs this script and compares the output's shape).
#
#   bash scripts/readme_examples.sh [OUT]      # default OUT: readme-examples/ (created, reused when re-run)
#   PRETRAIN_STEPS=5 bash scripts/readme_examples.sh /tmp/ex    # a short pre-training (numbers not meaningful)
#
# What it builds in OUT, the folder the examples then run in:
#   data/               `upctl prepare mini` (real images, clips and sentences from PyPI packages)
#   coco/               the official VQAv2 download layout in miniature (tests/fixtures/layouts.py): COCO
#                       images + the four v2 question / annotation JSON files; 2 validation questions
#   tiny-random/        an untrained `tiny` model (seed 0), saved with uniperceiver.modeling.save_model
#   runs/pretrain-s1/   the demo's seed-1 pre-training (recipes/mini/pretrain.yaml, train.seed=1, 200
#                       steps: a few minutes on a 2-core CPU; skipped when its final/ weights exist)
#   inputs/<class>/     digits-by-example inputs: the first 5 images of each class in mini-digits' validation
#                       manifest (50 images)
#   examples/<class>/   digits-by-example candidates: the first 3 images of each class in its training manifest
#   digits-by-example.yaml
#   my-digits/, my-photos/, my-reviews/   "your own data": 300 training digits in class folders, the photos
#                       with an open_clip-style captions.csv, the review sentences as JSONL with label words
# Logs of the building steps go to OUT/logs/; the examples (and a few mistakes, each answered with one
# error line and a non-zero exit status) print to the terminal.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-readme-examples}"
mkdir -p "$OUT/logs"
cd "$OUT"
if ! command -v upctl >/dev/null 2>&1; then
  . "$REPO/.venv/bin/activate"
fi

build() {  # build <log name> <command...>: run quietly, show the log's tail if it fails
  local log="logs/$1.log"
  shift
  echo "building: $* (log: $OUT/$log)"
  if ! "$@" >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    echo "readme_examples.sh: building step failed: $*" >&2
    exit 1
  fi
}

example() {  # example <command...>: print it like a shell transcript (quoting arguments with spaces), then run it
  local shown="" arg
  for arg in "$@"; do
    case "$arg" in
      *[[:space:]]*) shown+=" \"$arg\"" ;;
      *) shown+=" $arg" ;;
    esac
  done
  printf '\n$%s\n' "$shown"
  "$@"
}

mistake() {  # mistake <command...>: an example of bad input; it must fail with one line, not a traceback
  local status=0
  example "$@" || status=$?
  if [ "$status" -eq 0 ]; then
    echo "readme_examples.sh: expected this command to fail: $*" >&2
    exit 1
  fi
  echo "(exit status $status)"
}

# ---------------------------------------------------------------------------------------- building

build prepare-mini upctl prepare mini

build vqav2-layout python - "$REPO/tests" <<'EOF'
import sys
from pathlib import Path

sys.path.insert(0, sys.argv[1])
from fixtures.layouts import make_vqav2  # noqa: E402

print(make_vqav2(Path("coco")))
EOF

build tiny-random python - <<'EOF'
import torch

from uniperceiver.modeling import build_model, save_model

torch.manual_seed(0)
print(save_model(build_model("tiny"), "tiny-random"))
EOF

build digits-by-example python - <<'EOF'
"""inputs/: the first 5 validation images of each digit class; examples/: the first 3 training images."""
import json
import shutil
from pathlib import Path

import yaml

meta = json.loads(Path("data/mini-digits/meta.json").read_text())
classes = meta["targets"]["classes"]
raw = Path(meta["raw_root"])
for split, folder, per_class in (("val", "inputs", 5), ("train", "examples", 3)):
    shutil.rmtree(folder, ignore_errors=True)
    taken = {c: 0 for c in classes}
    for line in Path(f"data/mini-digits/{split}.jsonl").read_text().splitlines():
        row = json.loads(line)
        name = classes[row["label"]]
        if taken[name] < per_class:
            taken[name] += 1
            dest = Path(folder) / name / Path(row["media"]).name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(raw / row["media"], dest)
    print(folder, taken)
spec = {"name": "digits-by-example", "inputs": {"images": "inputs"}, "candidates": {"images": "examples"},
        "top_k": 3}
Path("digits-by-example.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
EOF

build own-data python - <<'EOF'
"""Your own data, made from files you have: my-digits/<class>/*.png (mini-digits' training images by
class), my-photos/img/* with an open_clip-style captions.csv (mini-photos), my-reviews/reviews.jsonl
(mini-sentiment's sentences with their label words)."""
import csv
import json
import shutil
from pathlib import Path


def rows(name, split):
    return [json.loads(line) for line in Path(f"data/{name}/{split}.jsonl").read_text().splitlines()]


def meta(name):
    return json.loads(Path(f"data/{name}/meta.json").read_text())


digits = meta("mini-digits")
shutil.rmtree("my-digits", ignore_errors=True)
for row in rows("mini-digits", "train")[:300]:
    dest = Path("my-digits") / digits["targets"]["classes"][row["label"]] / Path(row["media"]).name
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(digits["raw_root"]) / row["media"], dest)
shutil.rmtree("my-photos", ignore_errors=True)
(Path("my-photos") / "img").mkdir(parents=True)
with open("my-photos/captions.csv", "w", newline="", encoding="utf-8") as fh:
    writer = csv.writer(fh)
    writer.writerow(["filepath", "title"])
    for split in ("train", "val"):
        for row in rows("mini-photos", split):
            name = Path(row["media"]).name
            shutil.copyfile(Path(meta("mini-photos")["raw_root"]) / row["media"], Path("my-photos/img") / name)
            writer.writerows([f"img/{name}", text] for text in row["texts"])
words = meta("mini-sentiment")["targets"]["classes"]
Path("my-reviews").mkdir(exist_ok=True)
with open("my-reviews/reviews.jsonl", "w", encoding="utf-8") as fh:
    for split in ("train", "val"):
        fh.writelines(json.dumps({"text": r["text"], "label": words[r["label"]]}) + "\n" for r in rows("mini-sentiment", split))
print("my-digits, my-photos, my-reviews written")
EOF

if [ -f runs/pretrain-s1/final/model.safetensors ]; then
  echo "building: runs/pretrain-s1 exists, reused"
else
  build pretrain-s1 upctl pretrain "$REPO/recipes/mini/pretrain.yaml" --set train.seed=1 --output runs/pretrain-s1 \
    ${PRETRAIN_STEPS:+--max-steps "$PRETRAIN_STEPS"}
fi

# ---------------------------------------------------------------------------------------- the README's examples

example upctl prepare vqav2 --root coco --option min_count=1
example upctl zeroshot --task vqa --checkpoint tiny-random --json vqa.json
example upctl zeroshot --task digits-by-example.yaml --checkpoint runs/pretrain-s1 --json custom.json
example upctl predict --image data/raw/mini/photos/chelsea.png --targets "a cat,a dog,a car" --checkpoint runs/pretrain-s1
example upctl prepare imagefolder --root my-digits --name my-digits
example upctl prepare captions --root my-photos --name my-photos --option file=captions.csv
example upctl prepare textcls --root my-reviews --name my-reviews --option file=reviews.jsonl
example upctl tasks --kind user
example upctl zeroshot --task my-digits --checkpoint runs/pretrain-s1
example upctl zeroshot --task my-reviews --checkpoint runs/pretrain-s1
example upctl prompt-tune --task my-reviews --fraction 0.1 --checkpoint runs/pretrain-s1 --max-steps 40 --output runs/prompt-my-reviews
example upctl evaluate --task my-reviews --checkpoint runs/prompt-my-reviews

# ---------------------------------------------------------------------------------------- mistakes: one line each

mistake upctl evaluate --task mini-face
mistake upctl prepare cocoo
mistake upctl prepare captions --root my-photos --name my-photos --option file=captions.csv --option text_key=caption
mistake upctl predict --image data/raw/mini/video/bikes.mp4 --targets "cooking,dancing,surfing"
mistake upctl evaluate --checkpoint tiny-random
mistake upctl pretrain recipes/base.yaml
