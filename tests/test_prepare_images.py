"""Image preparers on fixtures written in the official layouts: COCO, Flickr30k, ImageNet(-21k), pairs, VG."""

from __future__ import annotations

import json
import os

import pytest
from fixtures import layouts
from fixtures.raw_media import write_image

from uniperceiver.data.format import open_dataset, prepare_dataset
from uniperceiver.errors import ConfigError, DataError


def _check(summary, expected: dict) -> None:
    assert summary.splits == expected["splits"]
    assert summary.skipped == expected.get("skipped", {})


def test_coco_karpathy(tmp_path):
    raw, data = tmp_path / "coco", tmp_path / "data"
    expected = layouts.make_coco(raw)
    calls = []
    s = prepare_dataset("coco", raw, data, progress=lambda done, total, desc: calls.append((done, total, desc)))
    _check(s, expected)
    assert s.missing_media == 1 and s.unreadable_media == 1
    assert (5, 5, "coco train") in calls and (2, 2, "coco test") in calls  # 5 train rows incl. the skipped ones
    ds = open_dataset("coco", data)
    train = ds.load_split("train")
    assert [x["id"] for x in train] == ["1000", "1001", "1003"]  # 2 train + restval 1003; 1002 had no caption
    assert train[2]["media"] == "val2014/COCO_val2014_000000001003.jpg"
    assert train[0]["texts"][0] == layouts.CAPTIONS[0] and len(train[0]["texts"]) == 5
    assert ds.media_path(train[0]).is_file()
    assert ds.meta["tasks"][:2] == ["coco-caption", "coco-retrieval"] and ds.meta["fewshot_rule"] == "per_image"
    assert ds.meta["skipped"]["val"] == {"bad_format_media": 1}
    assert s.examples["train"]["missing_media"] == ["val2014/COCO_val2014_000000001004.jpg"]

    # idempotent: the same bytes again, and meta records the same checksums
    before = {p.name: p.read_bytes() for p in ds.root.glob("*.jsonl")}
    prepare_dataset("coco", raw, data)
    assert {p.name: p.read_bytes() for p in ds.root.glob("*.jsonl")} == before
    assert open_dataset("coco", data).meta["manifest_sha256"] == ds.meta["manifest_sha256"]

    s2 = prepare_dataset("coco", raw, data, options={"restval": "skip"})
    assert s2.splits["train"] == 2 and s2.skipped["train"] == {"no_caption": 1}


def test_coco_malformed_annotation_names_the_file(tmp_path):
    raw = tmp_path / "coco"
    layouts.make_coco(raw)
    (raw / "dataset_coco.json").write_text('{"images": [\n  {"filename": "a.jpg",}\n]}')
    with pytest.raises(DataError, match=r"dataset_coco\.json:2: malformed JSON"):
        prepare_dataset("coco", raw, tmp_path / "data")
    (raw / "dataset_coco.json").write_text('{"images": [{"filename": "a.jpg", "sentences": []}]}')
    with pytest.raises(DataError, match=r"images\[0\]: missing key 'split'"):
        prepare_dataset("coco", raw, tmp_path / "data")
    os.remove(raw / "dataset_coco.json")
    with pytest.raises(DataError, match="Karpathy split file"):
        prepare_dataset("coco", raw, tmp_path / "data")


def test_flickr30k_truncated_jpeg_is_unreadable(tmp_path):
    raw, data = tmp_path / "f30k", tmp_path / "data"
    expected = layouts.make_flickr30k(raw)
    s = prepare_dataset("flickr30k", raw, data)
    _check(s, {**expected, "splits": {**expected["splits"], "test": 0}})
    ds = open_dataset("flickr30k", data)
    assert [x["id"] for x in ds.load_split("train")] == ["36979", "36980"]
    assert ds.load_split("val")[0]["media"] == "flickr30k-images/36981.jpg"
    # a header-only check does not decode, so the truncated file passes `verify`
    assert prepare_dataset("flickr30k", raw, data, options={"check": "verify"}).splits["test"] == 1


def test_imagenet_kaggle_layout(tmp_path):
    raw, data = tmp_path / "imagenet", tmp_path / "data"
    expected = layouts.make_imagenet_kaggle(raw)
    s = prepare_dataset("imagenet", raw, data, options={"workers": "2"})
    _check(s, expected)
    ds = open_dataset("imagenet", data)
    assert ds.classes == ["tench", "goldfish", "great white shark"]
    assert ds.meta["targets"]["wnids"] == layouts.WNIDS
    assert "synonyms" not in ds.meta["targets"]  # IN-1k uses one fixed name per class
    val = ds.load_split("val")
    assert [(x["id"], x["label"]) for x in val] == [
        ("ILSVRC2012_val_00000001", 1),
        ("ILSVRC2012_val_00000002", 2),
        ("ILSVRC2012_val_00000003", 0),
    ]
    assert val[0]["media"] == "ILSVRC/Data/CLS-LOC/val/ILSVRC2012_val_00000001.JPEG"
    train = ds.load_split("train")
    assert [x["label"] for x in train] == [0, 0, 0, 1, 1, 2, 2, 2]
    assert "workers" not in ds.meta["options"]


def test_imagenet_class_folders_and_val_txt(tmp_path):
    raw, data = tmp_path / "imagenet", tmp_path / "data"
    expected = layouts.make_imagenet_folders(raw)
    _check(prepare_dataset("imagenet", raw, data), expected)
    assert open_dataset("imagenet", data).classes == ["tench", "goldfish", "great white shark"]
    # flat val folder labelled by a Caffe/reference val.txt (index in sorted-wnid order)
    raw2 = tmp_path / "imagenet2"
    for w in layouts.WNIDS:
        write_image(raw2 / "train" / w / f"{w}_1.JPEG")
    for i in range(1, 4):
        write_image(raw2 / "val" / f"ILSVRC2012_val_{i:08d}.JPEG", i)
    (raw2 / "val.txt").write_text(
        "ILSVRC2012_val_00000001.JPEG 2\nILSVRC2012_val_00000002.JPEG 0\nILSVRC2012_val_00000003.JPEG 1\n"
    )
    prepare_dataset("imagenet", raw2, data)
    ds = open_dataset("imagenet", data)
    assert [x["label"] for x in ds.load_split("val")] == [2, 0, 1]
    # no names file: the reference's ImageNet-1k names (imagenet-simple-labels), by wnid
    assert ds.classes == ["tench", "goldfish", "great white shark"]
    (raw2 / "val.txt").write_text("ILSVRC2012_val_00000001.JPEG two\n")
    with pytest.raises(DataError, match=r"val\.txt:1: expected"):
        prepare_dataset("imagenet", raw2, data)
    os.remove(raw2 / "val.txt")
    with pytest.raises(DataError, match="LOC_val_solution.csv"):
        prepare_dataset("imagenet", raw2, data)


def test_imagenet_partial_layout_gets_each_class_its_own_name(tmp_path):
    """A subset of the class folders: names by wnid (timm's 1k list), not by position; classnames.txt overrides."""
    raw, data = tmp_path / "imagenet", tmp_path / "data"
    expected = layouts.make_imagenet_partial(raw)
    _check(prepare_dataset("imagenet", raw, data, options={"check": "exists"}), expected)
    ds = open_dataset("imagenet", data)
    assert ds.classes == expected["classes"] == ["tench", "goldfish", "tabby cat"]
    assert ds.meta["targets"]["wnids"] == expected["wnids"]
    assert "classnames.txt" not in ds.meta["source"]
    (raw / "classnames.txt").write_text("fish\ngold fish\ncat\n")  # one name per class, in class order
    prepare_dataset("imagenet", raw, data, options={"check": "exists"})
    assert open_dataset("imagenet", data).classes == ["fish", "gold fish", "cat"]
    (raw / "classnames.txt").write_text("n02123045 house cat\n")  # "wnid name" lines: only the classes named
    prepare_dataset("imagenet", raw, data, options={"check": "exists"})
    assert open_dataset("imagenet", data).classes == ["tench", "goldfish", "house cat"]


def test_imagenet_names_are_the_vendored_reference_list():
    from uniperceiver.data.imagenet_classes import imagenet1k_names, imagenet1k_wnids, simple_labels

    wnids, names = imagenet1k_wnids(), simple_labels()
    assert len(wnids) == len(names) == 1000 and list(wnids) == sorted(wnids)
    # spot checks against the reference notebook's list (CLIP's revision of imagenet-simple-labels)
    assert (names[0], names[7], names[21], names[281], names[999]) == (
        "tench", "rooster", "kite (bird of prey)", "tabby cat", "toilet paper")
    assert imagenet1k_names()["n02123045"] == "tabby cat"


def test_imagenet21k_puts_imagenet1k_first_with_its_names(tmp_path):
    raw, data = tmp_path / "in21k", tmp_path / "data"
    expected = layouts.make_imagenet21k_mixed(raw)
    _check(prepare_dataset("imagenet21k", raw, data, options={"check": "exists"}), expected)
    ds = open_dataset("imagenet21k", data)
    assert ds.meta["targets"]["wnids"] == expected["wnids"]
    # 1k classes: the simple label only (not words.txt's "tench, Tinca tinca"); the rest: words.txt,
    # and WordNet's lemmas (timm) for n00006024, which words.txt lacks
    assert ds.synonyms == expected["synonyms"]
    assert ds.classes == ["tench", "tabby cat", "organism", "benthos", "heterotroph"]
    labels = {x["id"].split("_")[0]: x["label"] for x in ds.load_split("train")}
    assert [labels[w] for w in expected["wnids"]] == [0, 1, 2, 3, 4]


def test_imagenet21k_synonyms(tmp_path):
    raw, data = tmp_path / "in21k", tmp_path / "data"
    expected = layouts.make_imagenet21k(raw)
    _check(prepare_dataset("imagenet21k", raw, data), expected)
    ds = open_dataset("imagenet21k", data)
    assert ds.synonyms == expected["synonyms"] and ds.classes == ["organism", "benthos", "heterotroph"]
    assert [x["label"] for x in ds.load_split("train")] == [0, 0, 1, 1, 2, 2]


def test_img2dataset_pairs_and_tsv(tmp_path):
    raw, data = tmp_path / "cc3m", tmp_path / "data"
    expected = layouts.make_img2dataset(raw)
    s = prepare_dataset("cc3m", raw, data)
    _check(s, expected)
    ds = open_dataset("cc3m", data)
    first = ds.load_split("train")[0]
    assert first == {
        "id": "00000/000000000",
        "media": "train/00000/000000000.jpg",
        "media_type": "image",
        "texts": [layouts.CAPTIONS[0]],
    }
    # open_clip-style TSV: filepath<TAB>title, paths relative to the raw root
    raw2 = tmp_path / "cc12m"
    for i in range(3):
        write_image(raw2 / "images" / f"{i}.jpg", i)
    (raw2 / "train.tsv").write_text(
        "filepath\ttitle\nimages/0.jpg\ta photo\nimages/1.jpg\t\nimages/2.jpg\tthird\nimages/9.jpg\tgone\n"
    )
    s2 = prepare_dataset("cc12m", raw2, data)
    assert s2.splits == {"train": 2} and s2.skipped == {"train": {"missing_media": 1, "no_caption": 1}}
    (raw2 / "train.tsv").write_text("path\tcaption\nimages/0.jpg\tx\n")
    with pytest.raises(DataError, match=r"train\.tsv:1: header lacks column\(s\) filepath"):
        prepare_dataset("cc12m", raw2, data)
    with pytest.raises(DataError, match="no image-text pairs"):
        prepare_dataset("sbu", tmp_path / "data", tmp_path / "data2")


def test_visual_genome_question_answers(tmp_path):
    raw, data = tmp_path / "vg", tmp_path / "data"
    expected = layouts.make_vg(raw, qa=True)
    _check(prepare_dataset("vg", raw, data, options={"check": "exists"}), expected)
    qa = open_dataset("vg", data).load_split("qa")
    assert qa[0] == {
        "id": "986768", "question_id": 986768, "image_id": 1, "coco_id": 9, "question": "Is the clock green?",
        "answers": ["Yes."], "media": "VG_100K_2/1.jpg", "media_type": "image",
    }
    assert [x["coco_id"] for x in qa] == [9, 9, 9, 42, 30, 77]
    (raw / "image_data.json").unlink()  # no COCO ids: the questions stay, unmapped
    prepare_dataset("vg", raw, data, options={"check": "exists"})
    assert {x["coco_id"] for x in open_dataset("vg", data).load_split("qa")} == {None}


def test_visual_genome(tmp_path):
    raw, data = tmp_path / "vg", tmp_path / "data"
    expected = layouts.make_vg(raw)
    _check(prepare_dataset("vg", raw, data), expected)
    train = open_dataset("vg", data).load_split("train")
    assert train[0] == {
        "id": "1",
        "media": "VG_100K_2/1.jpg",
        "media_type": "image",
        "texts": ["the clock is green in colour", "shade is along the street"],
    }
    assert train[1]["media"] == "VG_100K/2.jpg"


def test_unknown_option_and_limit(tmp_path):
    raw, data = tmp_path / "coco", tmp_path / "data"
    layouts.make_coco(raw)
    with pytest.raises(
        ConfigError, match="unknown option 'colour' for coco; accepted: check, limit, mirror, restval, workers"
    ):
        prepare_dataset("coco", raw, data, options={"colour": "red"})
    with pytest.raises(ConfigError, match="check='fast'"):
        prepare_dataset("coco", raw, data, options={"check": "fast"})
    s = prepare_dataset("coco", raw, data, options={"limit": "1", "check": "exists"})
    assert s.splits == {"train": 1, "val": 1, "test": 1}
    assert json.loads((data / "coco" / "meta.json").read_text())["options"] == {"check": "exists", "limit": "1"}


def test_imagenet_flat_val_with_official_devkit(tmp_path):
    """Official tarball layout: flat val/ + ILSVRC2012_devkit_t12 (ground truth ids -> meta.mat wnids)."""
    sio = pytest.importorskip("scipy.io")  # optional dependency of the devkit path only
    import numpy as np

    raw, data = tmp_path / "imagenet", tmp_path / "data"
    for w in layouts.WNIDS:
        write_image(raw / "train" / w / f"{w}_1.JPEG")
    for i in range(1, 4):
        write_image(raw / "val" / f"ILSVRC2012_val_{i:08d}.JPEG", i)
    devkit = raw / "ILSVRC2012_devkit_t12" / "data"
    devkit.mkdir(parents=True)
    # the devkit's own id order is NOT the sorted-wnid order (id 1 is not n01440764)
    synsets = np.array(
        [
            (1, "n01484850", "great white shark", 0),
            (2, "n01440764", "tench", 0),
            (3, "n01443537", "goldfish", 0),
            (1001, "n00001740", "entity", 5),
        ],
        dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")],
    )
    sio.savemat(str(devkit / "meta.mat"), {"synsets": synsets})
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n2\n3\n")
    prepare_dataset("imagenet", raw, data)
    assert [x["label"] for x in open_dataset("imagenet", data).load_split("val")] == [2, 0, 1]
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n7\n3\n")
    with pytest.raises(DataError, match=r"ILSVRC2012_validation_ground_truth\.txt:2: '7' is not an ILSVRC2012_ID"):
        prepare_dataset("imagenet", raw, data)


def test_meta_tasks_are_catalog_tasks(tmp_path):
    """The tasks a prepared dataset says it serves exist in the task catalog, with this dataset."""
    from uniperceiver.tasks.catalog import CATALOG

    for name, make in (("coco", layouts.make_coco), ("cc3m", layouts.make_img2dataset), ("vg", layouts.make_vg)):
        make(tmp_path / name)
        prepare_dataset(name, tmp_path / name, tmp_path / "data", options={"check": "exists"})
        tasks = open_dataset(name, tmp_path / "data").meta["tasks"]
        assert tasks and all(CATALOG[t].dataset == name for t in tasks), tasks
