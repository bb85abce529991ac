"""Scale rows for the data path: manifests read as a Python list vs memory-mapped Arrow, and evaluation
loading samples in the main process vs DataLoader workers.

Manifest rows: a pair-dataset manifest (CC3M-like: id, media path, one caption) of N rows is
written with the real `ManifestWriter`; then, in a fresh interpreter per case (memory figures stay
separate), either `load_split` (the JSONL as `list[dict]`) or `rows` (the Arrow file) opens it and
reads 10,000 random rows. Per process we report the open time and the resident-set growth
(`extra_rss_mb`), split into `private_mb` (anonymous memory, the heap: what every extra rank pays
again) and `shared_file_mb` (file pages of the memory map: one copy in the page cache, the same
physical pages in every process that maps the file), and `worker_epoch_copy_mb`, what a forked loader
worker copies (its private dirty pages) while it reads every row once, as an epoch does.

Token cache row: the first-use build of an MLM corpus's token cache (`TokenCorpus.open`) with one process
vs two spawned tokenising workers, on real sentences, wall seconds (the point of workers is wall time).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from uniperceiver.bench.timing import current_rss_bytes, run_for_result

_WORDS = ("a man riding a wave on top of a surfboard two dogs play with a red frisbee in the park "
          "people walking down a busy city street at night view of the mountains from the lake").split()


def _smaps(field: str) -> int:
    """Bytes of one field of /proc/self/smaps_rollup (Anonymous, Private_Dirty, ...)."""
    with open("/proc/self/smaps_rollup") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/smaps_rollup has no {field} line")


def write_pairs_manifest(data_dir: Path, rows: int, name: str = "pairs") -> Path:
    """A prepared CC3M-like dataset of `rows` image-caption rows (no media: nothing here decodes them)."""
    from uniperceiver.data.format import ManifestWriter, write_meta

    rng = np.random.default_rng(0)
    out = Path(data_dir) / name
    words = np.array(_WORDS)
    with ManifestWriter(out, "train") as writer:
        for i in range(rows):
            caption = " ".join(words[rng.integers(0, len(words), size=int(rng.integers(6, 16)))])
            writer.add({"id": f"{i:09d}", "media": f"{i // 10_000:05d}/{i:09d}.jpg", "media_type": "image",
                        "texts": [caption]})
    write_meta(out, {"dataset": name, "raw_root": str(Path(data_dir) / "raw"), "splits": {"train": rows},
                     "media_type": "image"})
    return out


def _epoch_copy_bytes(rows: Any) -> int:
    """Fork a child that reads every row once (a loader worker's epoch); its private dirty growth."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, report through the pipe, leave without cleanup handlers
        try:
            before = _smaps("Private_Dirty")
            for i in range(len(rows)):
                rows[i]
            os.write(write_fd, str(_smaps("Private_Dirty") - before).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as fh:
        copied = int(fh.read() or -1)
    os.waitpid(pid, 0)
    return copied


def manifest_worker(data_dir: str, name: str, mode: str, reads: int = 10_000) -> dict[str, Any]:
    """One case in this process: open `name`/train as a list ("jsonl") or by index ("arrow")."""
    import pyarrow  # noqa: F401  imported before the baseline in both modes: we measure data, not libraries

    from uniperceiver.data.format import open_dataset

    ds = open_dataset(name, data_dir)
    convert_s = 0.0
    if mode == "arrow":  # the one-off conversion a first open does (prepare does it ahead)
        from uniperceiver.data.arrow_manifest import is_current

        start = time.perf_counter()
        ds.rows("train")
        convert_s = time.perf_counter() - start
        assert is_current(ds.manifest_path("train"))
    rss, anon = current_rss_bytes(), _smaps("Anonymous")
    start = time.perf_counter()
    rows = ds.load_split("train") if mode == "jsonl" else ds.rows("train")
    open_s = time.perf_counter() - start
    picks = np.random.default_rng(0).integers(0, len(rows), size=min(reads, len(rows)))
    start = time.perf_counter()
    for i in picks:
        rows[int(i)]
    read_s = time.perf_counter() - start
    return {"rows": len(rows), "convert_s": convert_s, "open_s": open_s, "reads_per_s": len(picks) / read_s,
            "extra_rss_mb": (current_rss_bytes() - rss) / 2**20, "extra_anon_mb": (_smaps("Anonymous") - anon) / 2**20,
            "worker_epoch_copy_mb": _epoch_copy_bytes(rows) / 2**20}


def _in_subprocess(fn: str, *args: Any) -> dict[str, Any]:
    code = (f"import json; from uniperceiver.bench.data_section import {fn} as f; "
            f"print('RESULT ' + json.dumps(f(*{list(args)!r})))")
    return run_for_result([sys.executable, "-c", code])


def manifest_rows(report: Any, quick: bool, base_rows: int | None = None) -> None:
    """Rows "manifest Nx": a list vs Arrow at 1x / 4x / 16x of `base_rows` (16x = 1M rows in a full run)."""
    base = base_rows or (6_250 if quick else 62_500)
    for mult in (1, 4, 16):
        with tempfile.TemporaryDirectory() as tmp:
            folder = write_pairs_manifest(Path(tmp), base * mult)
            for mode in ("jsonl", "arrow"):
                r = _in_subprocess("manifest_worker", tmp, "pairs", mode)
                size_mb = (folder / f"train.{mode}").stat().st_size / 2**20
                label = "JSONL list[dict]" if mode == "jsonl" else "Arrow memory-mapped"
                report.add("scale", f"manifest {mult}x ({r['rows']:,} pair rows): {label}",
                           open_s=round(r["open_s"], 3), convert_s=round(r["convert_s"], 3),
                           reads_per_s=round(r["reads_per_s"]), extra_rss_mb=round(r["extra_rss_mb"], 1),
                           private_mb=round(r["extra_anon_mb"], 1),
                           shared_file_mb=round(max(r["extra_rss_mb"] - r["extra_anon_mb"], 0.0), 1),
                           worker_epoch_copy_mb=round(r["worker_epoch_copy_mb"], 1), files_mb=round(size_mb, 1))


def eval_workers_rows(report: Any, device: torch.device, quick: bool) -> None:
    """Zero-shot evaluation items/s with samples loaded in the main process vs 2 DataLoader workers, and
    the loading alone (`load_items_per_s_*`): what the harness could feed an accelerator. On a CPU the
    model competes with the workers for the same cores, so the end-to-end speed-up is the smaller one."""
    from uniperceiver.data.format import prepare_dataset
    from uniperceiver.evaluation.harness import evaluate_task
    from uniperceiver.evaluation.sample_loading import iter_loaded
    from uniperceiver.modeling.model import build_model
    from uniperceiver.tasks.catalog import build_task, task_config
    from uniperceiver.tokenizers.text import get_tokenizer

    torch.manual_seed(0)
    model = build_model("tiny", layer_scale_init=1.0).to(device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        prepare_dataset("mini", None, data_dir=tmp, options={"only": "digits,video"})
        for name, split, limit in (("mini-digits", "val", 64 if quick else 269), ("mini-video", "train", 8 if quick else 29)):
            task = build_task(task_config(name), tmp, model.cfg, get_tokenizer())
            examples = task.examples(split)
            speed, feed = {}, {}
            for workers in (0, 2) if quick else (0, 2, 0, 2):  # full: the second of each counts (warm caches)
                start = time.perf_counter()
                result = evaluate_task(model, task, split=split, limit=limit, num_workers=workers)
                speed[workers] = result.requested / (time.perf_counter() - start)
                start = time.perf_counter()  # loading alone: the rate at which samples could feed an accelerator
                loaded = sum(1 for _ in iter_loaded(task, examples, range(limit), task.eval_batch_size, workers))
                feed[workers] = loaded / (time.perf_counter() - start)
            report.add("scale", f"eval {name} {split} ({limit} items, tiny, {device.type}): main process vs 2 workers",
                       items_per_s_0=round(speed[0], 1), items_per_s_2=round(speed[2], 1),
                       speedup=round(speed[2] / speed[0], 2), load_items_per_s_0=round(feed[0], 1),
                       load_items_per_s_2=round(feed[2], 1), cpus=os.cpu_count())


def fewshot_worker(data_dir: str, name: str, fresh: bool, traced: bool) -> dict[str, Any]:
    """One `fraction_subset(name/train, 0.01)` in this process: a fresh draw (any saved subset file
    removed first) or the reuse of the saved file; seconds and the resident-set high-water growth
    (mapped file pages included), or with `traced` the Python heap's peak (tracemalloc; slower)."""
    import tracemalloc

    import pyarrow  # noqa: F401  imported before the baseline: we measure data, not libraries

    from uniperceiver.bench.timing import peak_rss_bytes, reset_peak_rss
    from uniperceiver.data.fewshot import fraction_subset, subset_path_name
    from uniperceiver.data.format import SPLITS_DIR, open_dataset

    ds = open_dataset(name, data_dir)
    if fresh:
        (ds.root / SPLITS_DIR / subset_path_name("train", 0.01, 0)).unlink(missing_ok=True)
    if traced:
        tracemalloc.start()
    base = current_rss_bytes()
    reset_peak_rss()
    start = time.perf_counter()
    subset = fraction_subset(ds, "train", 0.01, seed=0)
    seconds = time.perf_counter() - start
    heap_peak = tracemalloc.get_traced_memory()[1] if traced else 0
    return {"seconds": seconds, "samples": len(subset), "extra_peak_mb": (peak_rss_bytes() - base) / 2**20,
            "heap_peak_mb": heap_peak / 2**20}


def fewshot_rows(report: Any, quick: bool, rows: int | None = None) -> None:
    """Rows "few-shot subset": `fraction_subset(..., 0.01)` of a 500k-row pair manifest (50k quick),
    a fresh draw and the reuse of its saved file, each in a fresh interpreter (and once more under
    tracemalloc for the heap peak). The Arrow copy is written first, as prepare does."""
    from uniperceiver.data.format import open_dataset

    n = rows or (50_000 if quick else 500_000)
    with tempfile.TemporaryDirectory() as tmp:
        write_pairs_manifest(Path(tmp), n)
        open_dataset("pairs", tmp).rows("train")
        for case, fresh in (("fresh draw", True), ("reuse of the saved file", False)):
            r = _in_subprocess("fewshot_worker", tmp, "pairs", fresh, False)
            heap = _in_subprocess("fewshot_worker", tmp, "pairs", fresh, True)["heap_peak_mb"]
            report.add("scale", f"few-shot subset 1% of {n:,} pair rows: {case}", seconds=round(r["seconds"], 3),
                       samples=r["samples"], extra_peak_mb=round(r["extra_peak_mb"], 1), heap_peak_mb=round(heap, 1))


def token_build_times(lines: int, repeats: int = 3) -> dict[str, Any]:
    """Median wall seconds of the token cache build of `lines` real sentences (gensim's Lee news corpus,
    one per line, repeated over 8 files) with 1 and with 2 workers, run alternately `repeats` times each
    so that drift in the machine's load hits both alike. Each build starts from a fresh tokenizer (a cold
    word cache, as a first use has) and without a cache; the line index is built once, before timing.
    Under `token_corpus._POOL_MIN_BLOCKS` blocks (131,072 lines) both builds would run in one process."""
    import re

    import gensim.test.utils as gensim_data

    from uniperceiver.data.corpus_index import CorpusIndex
    from uniperceiver.data.format import open_dataset, prepare_dataset
    from uniperceiver.data.token_corpus import TokenCorpus
    from uniperceiver.tokenizers.text import ClipTokenizer

    lee = Path(gensim_data.datapath("lee_background.cor")).read_text(encoding="utf-8")
    sentences = [" ".join(s.split()) for s in re.split(r"(?<=[.!?])\s+", lee) if s.strip()]
    text = [sentences[i % len(sentences)] for i in range(lines)]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        raw.mkdir()
        part = -(-lines // 8)
        for f in range(8):
            lines_f = text[f * part:(f + 1) * part]
            (raw / f"part{f}.txt").write_text("".join(t + "\n" for t in lines_f), encoding="utf-8")
        prepare_dataset("bookswiki", raw, Path(tmp) / "data")
        index = CorpusIndex.open(open_dataset("bookswiki", Path(tmp) / "data"), "train")
        seconds: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(repeats):
            for workers in (1, 2):
                (Path(index.npy).parent / "train.tokens.json").unlink(missing_ok=True)  # forces a build
                tokenizer = ClipTokenizer()
                start = time.perf_counter()
                TokenCorpus.open(index, "train", tokenizer, workers=workers)
                seconds[workers].append(time.perf_counter() - start)
    one, two = (float(np.median(seconds[w])) for w in (1, 2))
    return {"lines": len(index), "s_1": one, "s_2": two, "lines_per_s_1": len(index) / one,
            "lines_per_s_2": len(index) / two, "speedup": one / two, "runs_1": seconds[1],
            "runs_2": seconds[2], "cpus": os.cpu_count(), "load_avg": [load_before, os.getloadavg()[0]]}


def token_build_row(report: Any, quick: bool) -> None:
    """Row "token cache build": one process vs 2 tokenising workers (see `token_build_times`)."""
    r = token_build_times(140_000, repeats=1) if quick else token_build_times(200_000)
    report.add("scale", f"token cache build ({r['lines']:,} lines of real sentences): 1 process vs 2 workers",
               seconds_1=round(r["s_1"], 2), seconds_2=round(r["s_2"], 2), lines_per_s_1=round(r["lines_per_s_1"]),
               lines_per_s_2=round(r["lines_per_s_2"]), speedup=round(r["speedup"], 2), cpus=r["cpus"],
               load_avg=round(r["load_avg"][0], 1))


if __name__ == "__main__":  # python -m uniperceiver.bench.data_section [BASE_ROWS | tokens [LINES]]: rows alone
    class _Print:
        def add(self, section: str, name: str, **values: Any) -> None:
            print(json.dumps({"section": section, "name": name, **values}), flush=True)

    if sys.argv[1:2] == ["tokens"]:
        print(json.dumps(token_build_times(int(sys.argv[2]) if len(sys.argv) > 2 else 200_000)), flush=True)
    else:
        manifest_rows(_Print(), quick=False, base_rows=int(sys.argv[1]) if len(sys.argv) > 1 else None)
