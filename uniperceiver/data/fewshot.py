"""Seeded, saved few-shot subsets (the "1% data" of prompt tuning), by the reference's rules.

The reference draws its 1% subsets with an unseeded `random.sample` each run; here a subset is a
pure function of (manifest content, split, fraction, seed, rule), drawn with numpy Generators
seeded from the seed and the group key (never from dict order or Python's string hash), and saved
as `<dataset>/splits/<split>-f<fraction>-s<seed>.json` so every run uses the same samples.

Rules (docs/DATA-FORMAT.md and the paper's appendix):
- per_class:  image / video classification: int(fraction * n_c) + 1 samples of each class c;
- per_image:  COCO / Flickr30k (and image-text pairs): int(fraction * n_images) images, each with
              all its captions;
- per_item:   MSVD / MSR-VTT (and other one-sample-per-item sets): int(fraction * n) items;
- per_answer: VQA: int(fraction * n_a) + 1 questions per most-common answer a;
- per_label:  GLUE: int(fraction * n_l) + 1 samples per label l (stratified).
per_image / per_item keep at least one sample. The default rule is the one the preparer recorded
in meta.json ("fewshot_rule"), else it is inferred from the samples.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from typing import Any

import numpy as np

from uniperceiver.data.format import SPLITS_DIR, PreparedDataset
from uniperceiver.errors import DataError
from uniperceiver.utils.files import atomic_write_json, sha256_file

RULES = ("per_class", "per_image", "per_item", "per_answer", "per_label")


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


def infer_rule(dataset: PreparedDataset, first: dict | None) -> str:
    rule = dataset.meta.get("fewshot_rule")
    if rule:
        return str(rule)
    if first is None:
        return "per_item"
    if "answer_scores" in first:
        return "per_answer"
    if isinstance(first.get("label"), int) and not isinstance(first.get("label"), bool):
        return "per_label" if dataset.media_type == "text" else "per_class"
    return "per_image" if first.get("media_type") == "image" else "per_item"


def _group_key(rule: str, sample: dict, where: str) -> str:
    if rule in ("per_class", "per_label"):
        if "label" not in sample:
            raise DataError(f"{where}: sample {sample.get('id')!r} has no label; rule {rule} needs labelled samples")
        return json.dumps(sample["label"])
    if rule == "per_answer":
        ans = most_common_answer(sample)
        if ans is None:
            raise DataError(
                f"{where}: sample {sample.get('id')!r} has no answers; rule per_answer needs answered questions"
            )
        return ans
    return ""


def select_ids(samples: list[dict], fraction: float, seed: int, rule: str, where: str = "") -> list[str]:
    """The ids of the subset, in manifest order (the pure selection behind `fraction_subset`)."""
    if rule not in RULES:
        raise DataError(f"unknown few-shot rule {rule!r}; expected one of {', '.join(RULES)}")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        groups[_group_key(rule, s, where)].append(i)
    chosen: list[int] = []
    for key in sorted(groups):
        members = groups[key]
        n = len(members)
        if rule in ("per_image", "per_item"):
            k = max(1, int(fraction * n))
        else:
            k = int(fraction * n) + 1
        k = min(k, n)
        pick = _group_seed(seed, key).choice(n, size=k, replace=False)
        chosen.extend(members[j] for j in pick)
    return [str(samples[i]["id"]) for i in sorted(chosen)]


def fraction_subset(
    dataset: PreparedDataset, split: str, fraction: float, seed: int, rule: str | None = None
) -> list[dict]:
    """The saved few-shot subset of `split` (created on first use), as samples in manifest order.

    A saved subset is reused only if it was drawn from the same manifest (sha256) with the same
    rule; otherwise it is drawn again and the file replaced atomically.
    """
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0.0 < float(fraction) <= 1.0:
        raise DataError(f"fraction must be in (0, 1], got {fraction!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")
    fraction, seed = float(fraction), int(seed)
    manifest = dataset.manifest_path(split)
    samples = dataset.load_split(split)
    rule = rule or infer_rule(dataset, samples[0] if samples else None)
    if rule not in RULES:
        raise DataError(f"unknown few-shot rule {rule!r}; expected one of {', '.join(RULES)}")
    digest = sha256_file(manifest)
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
                raise DataError(f"{path}: 'ids' do not match {manifest.name}; delete it to draw the subset again")
            return [by_id[str(i)] for i in ids]
    if not samples:
        raise DataError(f"{manifest}: split {split!r} is empty; nothing to draw a few-shot subset from")
    ids = select_ids(samples, fraction, seed, rule, where=str(manifest))
    atomic_write_json(
        path,
        {
            "dataset": dataset.name,
            "split": split,
            "fraction": fraction,
            "seed": seed,
            "rule": rule,
            "manifest_sha256": digest,
            "num_samples": len(ids),
            "ids": ids,
        },
    )
    return [by_id[i] for i in ids]
