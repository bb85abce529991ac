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
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from functools import lru_cache
from typing import Any, Callable, Sequence

import numpy as np

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


def infer_rule(dataset: PreparedDataset, first: dict | None, split: str | None = None) -> str:
    """The rule of `split`: its view's, the preparer's, or one read off the first sample."""
    view = dataset.views.get(split or "", {})
    rule = view.get("fewshot_rule") or dataset.meta.get("fewshot_rule")
    if rule:
        return str(rule)
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


def select_ids(
    samples: list[dict], fraction: float, seed: int, rule: str, where: str = "", answers: Sequence[str] | None = None
) -> list[str]:
    """The ids of the subset, in manifest order (the pure selection behind `fraction_subset`).

    `answers`: the answer list of a per_answer draw (the dataset's targets.answers).
    """
    if rule not in RULES:
        raise DataError(f"unknown few-shot rule {rule!r}; expected one of {', '.join(RULES)}")
    listed = set(answers) if answers is not None else None
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        key = _group_key(rule, s, where, listed)
        if key is not None:
            groups[key].append(i)
    chosen: list[int] = []
    for key in sorted(groups):
        members = groups[key]
        n = len(members)
        k = max(1, int(fraction * n)) if rule in _UNIFORM else int(fraction * n) + 1
        k = min(k, n)
        pick = _group_seed(seed, key).choice(n, size=k, replace=False)
        chosen.extend(members[j] for j in pick)
    return [str(samples[i]["id"]) for i in sorted(chosen)]


def _check_args(fraction: Any, seed: Any) -> tuple[float, int]:
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0.0 < float(fraction) <= 1.0:
        raise DataError(f"fraction must be in (0, 1], got {fraction!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")
    return float(fraction), int(seed)


def fraction_subset(
    dataset: PreparedDataset, split: str, fraction: float, seed: int, rule: str | None = None
) -> list[dict]:
    """The saved few-shot subset of `split` (a manifest or a view; created on first use), as
    samples in the split's order.

    A saved subset is reused only if it was drawn from the same content (sha256 of the manifest,
    or of a view's definition and manifests) with the same rule; otherwise it is drawn again and
    the file replaced atomically.
    """
    fraction, seed = _check_args(fraction, seed)
    samples = dataset.load_split(split)
    rule = rule or infer_rule(dataset, samples[0] if samples else None, split)
    if rule not in RULES:
        raise DataError(f"unknown few-shot rule {rule!r}; expected one of {', '.join(RULES)}")
    digest = dataset.split_digest(split)
    path = dataset.root / SPLITS_DIR / subset_path_name(split, fraction, seed)
    by_id = {str(s["id"]): s for s in samples}
    if path.is_file():
        try:
            saved: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}:{exc.lineno}: malformed JSON ({exc.msg}); delete it to draw the subset again"
            ) from None
        if saved.get("rule") == rule and saved.get("manifest_sha256") == digest:
            ids = saved.get("ids")
            if not isinstance(ids, list) or any(str(i) not in by_id for i in ids):
                raise DataError(f"{path}: 'ids' do not match split {split!r}; delete it to draw the subset again")
            return [by_id[str(i)] for i in ids]
    if not samples:
        raise DataError(f"dataset {dataset.name!r}: split {split!r} is empty; nothing to draw a few-shot subset from")
    ids = select_ids(samples, fraction, seed, rule, where=f"{dataset.name}/{split}", answers=dataset.answers)
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
            "pool_size": len(samples),
            "manifest_sha256": digest,
            "num_samples": len(ids),
            "ids": ids,
        },
    )
    return [by_id[i] for i in ids]


__all__ = ["RULES", "first_listed_answer", "fraction_subset", "infer_rule", "most_common_answer", "select_ids",
           "subset_path_name"]
