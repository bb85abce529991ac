"""Video preparers on fixtures in the official layouts (real h264 clips): Kinetics, MiT, MSVD, MSR-VTT."""

from __future__ import annotations

import pytest
from fixtures import layouts

from uniperceiver.data.format import open_dataset, prepare_dataset
from uniperceiver.errors import ConfigError, DataError


@pytest.mark.parametrize("arranged", [False, True], ids=["extracted", "arranged_by_classes"])
def test_kinetics400(tmp_path, arranged):
    raw, data = tmp_path / "k400", tmp_path / "data"
    expected = layouts.make_kinetics(raw, arranged=arranged)
    s = prepare_dataset("kinetics400", raw, data)
    assert s.splits == expected["splits"] and s.skipped == expected["skipped"]
    assert s.missing_media == 1 and s.unreadable_media == 2
    ds = open_dataset("kinetics400", data)
    assert ds.classes == expected["classes"] and ds.media_type == "video"
    train = ds.load_split("train")
    assert [(x["id"], x["label"]) for x in train] == [
        ("--07WQ2iBlw_000001_000011", 0),
        ("-4wsuPCjDBc_000005_000015", 0),
        ("1Ol9_QOqTJk_000000_000010", 2),
    ]
    folder = "videos/train/abseiling" if arranged else "train"
    assert train[0]["media"] == f"{folder}/--07WQ2iBlw_000001_000011.mp4"
    assert ds.media_path(train[0]).is_file()
    assert ds.load_split("val")[0]["id"] == "3caPS4FHFF8_000030_000040"


def test_kinetics700_validate_csv_and_missing_annotations(tmp_path):
    raw, data = tmp_path / "k700", tmp_path / "data"
    layouts.make_kinetics(raw)
    (raw / "annotations" / "val.csv").rename(raw / "annotations" / "validate.csv")
    s = prepare_dataset("kinetics700", raw, data, options={"check": "verify"})
    assert s.splits == {"train": 3, "val": 1}
    (raw / "annotations" / "train.csv").unlink()
    with pytest.raises(DataError, match=r"annotations/train\.csv: kinetics700 annotation CSV not found"):
        prepare_dataset("kinetics700", raw, data)
    (raw / "annotations" / "train.csv").write_text("label,youtube_id,time_start\nabseiling,abc,1\n")
    with pytest.raises(DataError, match=r"train\.csv:1: header lacks column\(s\) time_end"):
        prepare_dataset("kinetics700", raw, data)


def test_moments_in_time(tmp_path):
    raw, data = tmp_path / "mit", tmp_path / "data"
    expected = layouts.make_mit(raw)
    s = prepare_dataset("mit", raw, data)
    assert s.splits == expected["splits"] and s.skipped == expected["skipped"]
    ds = open_dataset("mit", data)
    assert ds.classes == expected["classes"]
    assert ds.load_split("train")[1] == {
        "id": "barking/getty-dog-video-id123_4",
        "label": 1,
        "media_type": "video",
        "media": "training/barking/getty-dog-video-id123_4.mp4",
    }
    (raw / "moments_categories.txt").write_text("applauding,0\nbarking\n")
    with pytest.raises(DataError, match=r"moments_categories\.txt:2: expected 'class_name,index'"):
        prepare_dataset("mit", raw, data)


def test_msvd_with_youtube_mapping(tmp_path):
    raw, data = tmp_path / "msvd", tmp_path / "data"
    expected = layouts.make_msvd(raw, mapping=True)
    s = prepare_dataset("msvd", raw, data, options={"split_sizes": "4,2,2"})
    assert s.splits == expected["splits"] and s.skipped == expected["skipped"]
    ds = open_dataset("msvd", data)
    order = expected["order"]
    kept = [c for c in order if c != layouts.MSVD_CLIPS[-1]]  # the clip without a file is vid1
    got = [x["id"] for split in ("train", "val", "test") for x in ds.load_split(split)]
    assert got == kept  # vid2, vid3, ... order, not sorted order
    first = ds.load_split("train")[0]
    assert first["media"] == f"YouTubeClips/{kept[0]}.avi" and len(first["texts"]) == 3
    assert first["texts"][0] == layouts.CAPTIONS[(layouts.MSVD_CLIPS.index(kept[0])) % 6].lower().rstrip(".")


def test_msvd_sorted_convention_and_txt_labels(tmp_path):
    raw, data = tmp_path / "msvd", tmp_path / "data"
    expected = layouts.make_msvd(raw, mapping=False)
    s = prepare_dataset("msvd", raw, data, options={"split_sizes": "4,2,2"})
    assert s.splits == expected["splits"]
    ds = open_dataset("msvd", data)
    assert [x["id"] for x in ds.load_split("train")] == expected["order"][:4]
    raw2 = tmp_path / "msvd2"
    expected2 = layouts.make_msvd(raw2, txt_labels=True)
    s2 = prepare_dataset("msvd", raw2, data)
    assert s2.splits == expected2["splits"] and s2.skipped == expected2["skipped"]
    assert open_dataset("msvd", data).load_split("val")[0]["texts"] == [
        "a pagoda stands above a calm lake",
        "an orange flower with many petals",
    ]
    with pytest.raises(ConfigError, match="split_sizes"):
        prepare_dataset("msvd", raw, data, options={"split_sizes": "4,2"})


def test_msrvtt_caption_and_retrieval_splits(tmp_path):
    raw, data = tmp_path / "msrvtt", tmp_path / "data"
    expected = layouts.make_msrvtt(raw)
    s = prepare_dataset("msrvtt", raw, data)
    assert s.splits == expected["splits"] and s.skipped == expected["skipped"]
    ds = open_dataset("msrvtt", data)
    assert ds.splits == ["train", "val", "test", "test1k", "train9k"]
    assert [x["id"] for x in ds.load_split("train9k")] == ["video0", "video1", "video2", "video3"]
    assert ds.load_split("test1k") == [
        {
            "id": "video4",
            "media": "videos/all/video4.mp4",
            "media_type": "video",
            "texts": ["a man is playing a guitar"],
        }
    ]
    assert len(ds.load_split("train")[0]["texts"]) == 3
    (raw / "MSRVTT_data.json").write_text('{"videos": [{"split": "train"}], "sentences": []}')
    with pytest.raises(DataError, match=r"videos\[0\]: missing key 'video_id'"):
        prepare_dataset("msrvtt", raw, data)


def test_kinetics_test_csv_without_labels_is_left_out(tmp_path):
    raw, data = tmp_path / "k400", tmp_path / "data"
    layouts.make_kinetics(raw)
    (raw / "annotations" / "test.csv").write_text("youtube_id,time_start,time_end,split\n--07WQ2iBlw,1,11,test\n")
    s = prepare_dataset("kinetics400", raw, data, options={"check": "exists"})
    assert set(s.splits) == {"train", "val"}
    (raw / "annotations" / "test.csv").write_text(
        "label,youtube_id,time_start,time_end,split\nzumba,1Ol9_QOqTJk,0,10,test\n"
    )
    (raw / "test").mkdir()
    (raw / "test" / "1Ol9_QOqTJk_000000_000010.mp4").symlink_to(raw / "train" / "1Ol9_QOqTJk_000000_000010.mp4")
    s = prepare_dataset("kinetics400", raw, data)
    assert s.splits == {"train": 3, "val": 1, "test": 1}
    assert open_dataset("kinetics400", data).load_split("test")[0]["label"] == 2
