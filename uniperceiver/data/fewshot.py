"""Seeded, saved few-shot subsets (the "1% data" of prompt tuning), by the reference's rules.

The reference draws its 1% subsets with an unseeded `random.sample` each run; here a subset is a
pure function of (the split's content, fraction, seed, rule), drawn with numpy Generators seeded
from the seed and the group key (never from dict order or Python's string hash), and saved as
`<dataset>/splits/<split>-f<fraction>-s<seed>.json` so every run uses the same samples.

What is drawn FROM is the split the recipe trains on. The reference's training pools are
prepared as views (format.py), e.g. `trainval` = train + val for COCO, Flickr30k, MSVD and
MSR-VTT, and `trainval_vg` for VQAv2; the saved file records the pool ("pool": the manifests read).

Rules, as the reference's `load_data` draws them (fundamentalvision/Uni-Perceiver,
uniperceiver/datasets/task_dataset/*.py):
- per_class:  int(fraction * n_c) + 1 samples of each class c -- imagenet.py:128-144 (ImageNet),
              video_raw.py:278-287 (Kinetics);
- per_image:  int(fraction * n) images of the pool, each with all its captions, uniformly --
              image_text_pair.py:326-346 (COCO Karpathy train113k + val5k, Flickr30k train + val);
- per_pair:   int(fraction * n) (video, caption) pairs, uniformly -- msvd.py:206-237, msrvtt.py:210-241:
              the pool is flattened to one sample per caption before drawing (a "pair" view);
- per_item:   int(fraction * n) samples, uniformly (other one-sample-per-item sets);
- per_answer: int(fraction * n_a) + 1 questions per answer a = `labels[0]`, the first of the
              question's human answers that is in the answer list, in annotation order (the order
              of compute_softscore.py's targets); questions with no in-list answer are dropped --
              vqa.py:198-209;
- per_label:  int(fraction * n_l) + 1 samples per label l -- GLUE.py:167-182.
The uniform rules keep at least one sample (the reference would draw none below 1/fraction). The
default rule is the view's "fewshot_rule", else the one the preparer recorded in meta.json, else
it is inferred from the samples.

Why the draw streams: a split can hold millions of samples (CC12M) and the subset a hundredth of
them, so the split is never held as a list. The draw reads the split's rows (`PreparedDataset.rows`,
memory-mapped) one at a time and keeps only each row's group as a small integer (a uniform rule
needs only the number of rows), then decodes the chosen rows alone; a saved subset is resolved to
row indices by id (`find_rows`) the same way.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Callable, Iterable, Sequence, Sized
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from uniperceiver.data.arrow_manifest import find_rows
from uniperceiver.data.format import SPLITS_DIR, PreparedDataset
from uniperceiver.errors import DataError
from uniperceiver.utils.files import atomic_write_json

RULES = ("per_class", "per_image", "per_pair", "per_item", "per_answer", "per_label")
_UNIFORM = ("per_image", "per_pair", "per_item")


def subset_path_name(split: str, fraction: float, seed: int) -> str:
    return f"{split}-f{fraction:g}-s{seed}.json"


def _group_seed(seed: int, key: str) -> np.random.Generator:
    """A generator that depends only on the seed and the group key (stable across processes)."""
    digest = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([seed, digest])


def most_common_answer(sample: dict) -> str | None:
    """The answer with the highest soft score (ties: alphabetically first)."""
    scores = sample.get("answer_scores") or {}
    if not scores:
        return None
    return min(scores.items(), key=lambda kv: (-float(kv[1]), kv[0]))[0]


@lru_cache(maxsize=1)
def _normalizer() -> Callable[[str], str]:
    from uniperceiver.metrics.vqa import normalize_answer

    return lru_cache(maxsize=65536)(normalize_answer)


def first_listed_answer(sample: dict, answers: set[str] | None = None) -> str | None:
    """The reference's `labels[0]`: the first human answer (in annotation order, normalised as the
    answer list is) that is in `answers` (None: any answer with a soft score); None when there is none.

    A sample without its raw "answers" falls back to its most common in-list answer.
    """
    scores = sample.get("answer_scores") or {}
    allowed = (lambda a: a in answers) if answers is not None else (lambda a: a in scores)
    raw = sample.get("answers")
    if isinstance(raw, list) and raw:
        normalize = _normalizer()
        for answer in raw:
            norm = normalize(str(answer))
            if norm and allowed(norm):
                return norm
        return None
    ranked = sorted(scores.items(), key=lambda kv: (-float(kv[1]), kv[0]))
    return next((a for a, _ in ranked if allowed(a)), None)


def recorded_rule(dataset: PreparedDataset, split: str | None = None) -> str | None:
    """The rule recorded for `split`: its view's "fewshot_rule", else the preparer's; None if neither."""
    view = dataset.views.get(split or "", {})
    rule = view.get("fewshot_rule") or dataset.meta.get("fewshot_rule")
    return str(rule) if rule else None


def infer_rule(dataset: PreparedDataset, first: dict | None, split: str | None = None) -> str:
    """The rule of `split`: its view's, the preparer's, or one read off the first sample (the only
    sample it needs; None for an empty split)."""
    rule = recorded_rule(dataset, split)
    if rule:
        return rule
    if first is None:
        return "per_item"
    if "answer_scores" in first:
        return "per_answer"
    if isinstance(first.get("label"), int) and not isinstance(first.get("label"), bool):
        return "per_label" if dataset.media_type == "text" else "per_class"
    return "per_image" if first.get("media_type") == "image" else "per_item"


def _group_key(rule: str, sample: dict, where: str, answers: set[str] | None) -> str | None:
    """The group a sample is drawn in; None leaves it out (VQA questions without an in-list answer)."""
    if rule in ("per_class", "per_label"):
        if "label" not in sample:
            raise DataError(f"{where}: sample {sample.get('id')!r} has no label; rule {rule} needs labelled samples")
        return json.dumps(sample["label"])
    if rule == "per_answer":
        if not sample.get("answer_scores") and not sample.get("answers"):
            raise DataError(
                f"{where}: sample {sample.get('id')!r} has no answers; rule per_answer needs answered questions"
            )
        return first_listed_answer(sample, answers)
    return ""


def _check_rule(rule: str) -> None:
    if rule not in RULES:
        raise DataError(f"unknown few-shot rule {rule!r}; expected one of {', '.join(RULES)}")


def group_codes(
    samples: Iterable[dict], rule: str, where: str = "", answers: Sequence[str] | None = None
) -> tuple[np.ndarray, dict[str, int]]:
    """Each sample's group as a small integer (-1: left out) and {group key: code}: all that a draw
    keeps of a sample, so `samples` may be a stream. A uniform rule has one group and reads nothing
    from the samples; a sized `samples` (a list, `PreparedDataset.rows`) is then not even iterated."""
    if rule in _UNIFORM:
        n = len(samples) if isinstance(samples, Sized) else sum(1 for _ in samples)
        return np.zeros(n, dtype=np.int32), ({"": 0} if n else {})
    listed = set(answers) if answers is not None else None
    keys: dict[str, int] = {}
    codes = array("i")
    for s in samples:
        key = _group_key(rule, s, where, listed)
        codes.append(-1 if key is None else keys.setdefault(key, len(keys)))
    return np.array(codes, dtype=np.int32), keys


def draw_rows(codes: np.ndarray, keys: dict[str, int], fraction: float, seed: int, rule: str) -> np.ndarray:
    """The chosen row indices, ascending: per group (in sorted key order) k of its n rows, picked by
    a generator seeded from (seed, key) among the group's rows in row order."""
    order = np.argsort(codes, kind="stable")  # rows grouped by code, in row order within each group
    bounds = np.concatenate([[0], np.cumsum(np.bincount(codes[codes >= 0], minlength=len(keys)))])
    bounds += int(np.count_nonzero(codes < 0))  # the left-out rows (-1) sort first
    chosen: list[np.ndarray] = []
    for key in sorted(keys):
        code = keys[key]
        members = order[bounds[code] : bounds[code + 1]]
        n = len(members)
        k = max(1, int(fraction * n)) if rule in _UNIFORM else int(fraction * n) + 1
        k = min(k, n)
        chosen.append(members[_group_seed(seed, key).choice(n, size=k, replace=False)])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def select_rows(
    samples: Iterable[dict], fraction: float, seed: int, rule: str, where: str = "",
    answers: Sequence[str] | None = None,
) -> np.ndarray:
    """The subset's row indices (positions in `samples`), ascending; `samples` is read once, as a stream."""
    _check_rule(rule)
    codes, keys = group_codes(samples, rule, where, answers)
    return draw_rows(codes, keys, fraction, seed, rule)


def select_ids(
    samples: Iterable[dict], fraction: float, seed: int, rule: str, where: str = "",
    answers: Sequence[str] | None = None,
) -> list[str]:
    """The ids of the subset, in manifest order (the pure selection behind `fraction_subset`).

    `samples`: a list or any sequence read by index (`PreparedDataset.rows`: streamed once for the
    groups, then only the chosen rows are read back); another iterable is read into a list first.
    `answers`: the answer list of a per_answer draw (the dataset's targets.answers).
    """
    rows = samples if isinstance(samples, Sequence) else list(samples)
    return [str(rows[i]["id"]) for i in select_rows(rows, fraction, seed, rule, where, answers).tolist()]


def _check_args(fraction: Any, seed: Any) -> tuple[float, int]:
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0.0 < float(fraction) <= 1.0:
        raise DataError(f"fraction must be in (0, 1], got {fraction!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")
    return float(fraction), int(seed)


def _read_saved(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg}); delete it to draw the subset again") from None


def _saved_samples(rows: Sequence[dict], ids: Any, path: Path, split: str) -> list[dict]:
    """The samples of a saved subset's ids, in the file's order, found by id without decoding the
    other rows of the split."""
    wanted = {str(i) for i in ids} if isinstance(ids, list) else None
    found = find_rows(rows, wanted) if wanted is not None else {}
    if wanted is None or len(found) != len(wanted):
        raise DataError(f"{path}: 'ids' do not match split {split!r}; delete it to draw the subset again")
    return [rows[found[str(i)]] for i in ids]


def fraction_subset(
    dataset: PreparedDataset, split: str, fraction: float, seed: int, rule: str | None = None
) -> list[dict]:
    """The saved few-shot subset of `split` (a manifest or a view; created on first use), as
    samples in the split's order.

    A saved subset is reused only if it was drawn from the same content (sha256 of the manifest,
    or of a view's definition and manifests) with the same rule; otherwise it is drawn again and
    the file replaced atomically. The split is read by index (`PreparedDataset.rows`), never held
    whole: see the module docstring.
    """
    fraction, seed = _check_args(fraction, seed)
    rows = dataset.rows(split)
    # the first row is decoded only when no rule is given or recorded
    rule = rule or recorded_rule(dataset, split) or infer_rule(dataset, rows[0] if len(rows) else None, split)
    _check_rule(rule)
    digest = dataset.split_digest(split)
    path = dataset.root / SPLITS_DIR / subset_path_name(split, fraction, seed)
    if path.is_file():
        saved = _read_saved(path)
        if saved.get("rule") == rule and saved.get("manifest_sha256") == digest:
            return _saved_samples(rows, saved.get("ids"), path, split)
    if not len(rows):
        raise DataError(f"dataset {dataset.name!r}: split {split!r} is empty; nothing to draw a few-shot subset from")
    chosen = select_rows(rows, fraction, seed, rule, where=f"{dataset.name}/{split}", answers=dataset.answers)
    subset = [rows[i] for i in chosen.tolist()]
    ids = [str(s["id"]) for s in subset]
    view = dataset.views.get(split, {})
    atomic_write_json(
        path,
        {
            "dataset": dataset.name,
            "split": split,
            "pool": dataset.split_parts(split),
            **({"exclude": view["exclude"]} if view.get("exclude") else {}),
            "unit": view.get("unit", "sample"),
            "fraction": fraction,
            "seed": seed,
            "rule": rule,
            "pool_size": len(rows),
            "manifest_sha256": digest,
            "num_samples": len(ids),
            "ids": ids,
        },
    )
    return subset


__all__ = ["RULES", "draw_rows", "first_listed_answer", "fraction_subset", "group_codes", "infer_rule",
           "most_common_answer", "recorded_rule", "select_ids", "select_rows", "subset_path_name"]
