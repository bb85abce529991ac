"""`prepare mini` end to end: the six real mini datasets written into a tmp data dir."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

for _mod in ("sklearn", "skimage", "skvideo", "gensim"):
    pytest.importorskip(_mod)  # optional: the mini extra

from uniperceiver.data.format import open_dataset, prepare_dataset  # noqa: E402
from uniperceiver.data.media import load_image, sample_video_frames  # noqa: E402
from uniperceiver.data.preparers import mini  # noqa: E402
from uniperceiver.errors import ConfigError, UpctlError  # noqa: E402

EXPECTED_SPLITS = {
    "mini-digits": {"train": 1258, "val": 269, "test": 270},
    "mini-photos": {"train": 16, "val": 8},
    "mini-faces": {"train": 100, "val": 100},
    "mini-video": {"train": 29, "val": 9},
    "mini-sentiment": {"train": 100, "val": 100},
    "mini-news": {"train": 2438, "val": 246},
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, float]:
    data_dir = tmp_path_factory.mktemp("data")
    calls: list[tuple] = []
    t0 = time.perf_counter()
    summary = prepare_dataset("mini", None, data_dir, progress=lambda d, t, s: calls.append((d, t, s)))
    seconds = time.perf_counter() - t0
    assert calls and calls[-1][0] == calls[-1][1]
    return data_dir, summary, seconds


def test_counts_per_dataset_and_split(prepared) -> None:
    data_dir, summary, seconds = prepared
    assert seconds < 60
    expected_summary = {f"{d}/{s}": n for d, splits in EXPECTED_SPLITS.items() for s, n in splits.items()}
    assert summary.splits == expected_summary
    for name, splits in EXPECTED_SPLITS.items():
        ds = open_dataset(name, data_dir)
        assert ds.meta["splits"] == splits
        assert {s: sum(1 for _ in ds.samples(s)) for s in ds.splits} == splits
        ds.verify()  # manifest sha256s match meta.json
        assert ds.raw_root == data_dir / "raw" / "mini"
        ids = [s["id"] for split in ds.splits for s in ds.samples(split)]
        assert len(ids) == len(set(ids)), f"{name}: an id appears in two splits"
    assert not (data_dir / "mini").exists()


def test_classes_and_labels(prepared) -> None:
    data_dir, _, _ = prepared
    digits = open_dataset("mini-digits", data_dir)
    assert digits.classes == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    assert open_dataset("mini-faces", data_dir).classes == ["not a face", "a face"]
    assert open_dataset("mini-sentiment", data_dir).classes == ["bad", "wonderful"]
    assert open_dataset("mini-video", data_dir).classes == ["a cartoon rabbit", "a city street", "a man in a car"]
    # Stratified: each class is cut 70/15/15 within itself.
    per_split = {split: Counter(s["label"] for s in digits.samples(split)) for split in ("train", "val", "test")}
    totals = Counter({c: sum(per_split[s][c] for s in per_split) for c in range(10)})
    from sklearn.datasets import load_digits

    assert totals == Counter(load_digits().target.tolist())
    for split, frac in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        assert all(abs(per_split[split][c] - frac * totals[c]) <= 1 for c in range(10)), per_split[split]
    sample = next(digits.samples("train"))
    assert sample["texts"] == [f"a handwritten digit {digits.classes[sample['label']]}"]
    for name in ("mini-faces", "mini-sentiment"):
        ds = open_dataset(name, data_dir)
        for split in ds.splits:
            assert Counter(s["label"] for s in ds.samples(split)) == {0: 50, 1: 50}


def test_every_media_file_decodes(prepared) -> None:
    data_dir, _, _ = prepared
    assert mini.verify_media(data_dir) == {
        "mini-digits": 1797, "mini-photos": 24, "mini-faces": 200, "mini-video": 4,
        "mini-sentiment": 0, "mini-news": 0,
    }
    digits = open_dataset("mini-digits", data_dir)
    first = next(digits.samples("train"))
    img = load_image(digits.media_path(first))
    assert img.size == (32, 32) and img.mode == "RGB"
    faces = open_dataset("mini-faces", data_dir)
    assert load_image(faces.media_path(next(faces.samples("val")))).size == (25, 25)


def test_video_windows_decode_and_do_not_leak(prepared) -> None:
    data_dir, _, _ = prepared
    ds = open_dataset("mini-video", data_dir)
    train_end: dict[str, float] = {}
    for s in ds.samples("train"):
        train_end[s["media"]] = max(train_end.get(s["media"], 0.0), s["end"])
        assert s["end"] - s["start"] == pytest.approx(1.0)
    for s in ds.samples("val"):
        assert s["start"] >= train_end[s["media"]]  # val windows start after every train window ends
    for s in list(ds.samples("val"))[:3]:
        frames = sample_video_frames(ds.media_path(s), 4, start=s["start"], end=s["end"], max_side=128)
        assert frames.shape[0] == 4 and frames.dtype == np.uint8


def test_text_datasets(prepared) -> None:
    data_dir, _, _ = prepared
    senti = {s["id"]: s for s in open_dataset("mini-sentiment", data_dir).samples("val")}
    senti.update({s["id"]: s for s in open_dataset("mini-sentiment", data_dir).samples("train")})
    assert senti["polarity-000"] == {"id": "polarity-000", "text": "simplistic , silly and tedious .", "label": 0}
    assert any("\u2014" in s["text"] for s in senti.values())  # cp1252 0x97 decoded as an em dash
    assert not any("\x97" in s["text"] for s in senti.values())
    news = list(open_dataset("mini-news", data_dir).samples("train"))
    assert news[0]["text"].startswith("Hundreds of people have been forced to vacate their homes")
    assert news[0]["text"].endswith("town of Hill Top.")
    photos = {s["id"]: s for split in ("train", "val") for s in open_dataset("mini-photos", data_dir).samples(split)}
    assert photos["photo-chelsea"]["texts"] == ["a close-up of a tabby cat's face", "Chelsea the cat"]
    assert all(s["texts"] and all(t.strip() for t in s["texts"]) for s in photos.values())


def test_rerun_is_idempotent(prepared) -> None:
    data_dir, _, _ = prepared
    names = list(EXPECTED_SPLITS)
    before = {n: open_dataset(n, data_dir).meta["manifest_sha256"] for n in names}
    media = sorted((data_dir / "raw" / "mini").rglob("*.*"))
    mtimes = {p: p.stat().st_mtime_ns for p in media}
    prepare_dataset("mini", None, data_dir)
    after = {n: open_dataset(n, data_dir).meta["manifest_sha256"] for n in names}
    assert before == after
    assert {p: p.stat().st_mtime_ns for p in media} == mtimes  # unchanged media are not rewritten
    assert not list(data_dir.rglob("*.tmp"))


def test_seed_and_only_options(tmp_path: Path) -> None:
    summary = prepare_dataset("mini", None, tmp_path, options={"only": "faces,sentiment", "seed": "3"})
    assert set(summary.splits) == {"mini-faces/train", "mini-faces/val", "mini-sentiment/train", "mini-sentiment/val"}
    assert not (tmp_path / "mini-digits").exists()
    meta = json.loads((tmp_path / "mini-faces" / "meta.json").read_text())
    assert meta["options"] == {"seed": 3}
    with pytest.raises(ConfigError, match="colour"):
        prepare_dataset("mini", None, tmp_path, options={"colour": "red"})
    with pytest.raises(ConfigError, match="pictures"):
        prepare_dataset("mini", None, tmp_path, options={"only": "pictures"})


def test_missing_optional_package_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for mod in [m for m in sys.modules if m == "gensim" or m.startswith("gensim.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "gensim", None)  # makes `import gensim` fail like an absent package
    with pytest.raises(UpctlError) as e:
        prepare_dataset("mini", None, tmp_path, options={"only": "sentiment"})
    assert "gensim" in str(e.value) and "pip install 'uniperceiver[mini]'" in str(e.value)


def test_clean_title() -> None:
    assert mini.clean_title("Color image of the astronaut Eileen Collins.\n\n more") == "the astronaut Eileen Collins"
    assert mini.clean_title('Gray-level "camera" image.') == "camera"
    assert mini.clean_title("Scikit-image logo, a RGBA image.") == "Scikit-image logo"
    assert mini.clean_title(None) == ""
