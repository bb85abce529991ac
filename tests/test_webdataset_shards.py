"""Web image-text pairs as img2dataset webdataset shards: prepare, read across ranks x workers, resume.

The shards are written the way img2dataset writes them (webdataset's TarWriter: `<key>.jpg`,
`<key>.json`, `<key>.txt` per sample; `<shard>_stats.json` and `<shard>.parquet` beside) from the
real `mini` photos. One member is a corrupt JPEG and one tar is cut short in the middle of a
member; some shards have stats files and some do not. `upctl prepare cc12m --root <shards>`
indexes them; one epoch read by 2 gloo ranks x 2 loader workers sees every good sample exactly
once and counts the corrupt one; a training run killed with SIGKILL mid-epoch and resumed with
`--resume auto` logs the same losses as the uninterrupted run.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _trainer_fixtures import one_thread  # noqa: E402,F401  (shared fixture)
from reliability.conftest import (  # noqa: E402
    assert_same_tensors,
    load_weights,
    rank_state,
    run_upctl,
    small_recipe,
    start_upctl,
    subprocess_env,
    train_losses,
    write_recipe,
)

from uniperceiver.data import shards  # noqa: E402
from uniperceiver.engine import train_checkpoint as ckpt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PER_SHARD = 6
NUM_SHARDS = 4
CORRUPT = (1, 2)  # (shard, position): a JPEG cut to a third of its bytes
CUT_SHARD, CUT_AT = 3, 4  # the tar is cut inside the image of its 5th sample (samples 4 and 5 lost)
WITH_STATS = (0, 3)  # shards with <shard>_stats.json + <shard>.parquet; 1 and 2 have none


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Shards:
    root: Path
    data: Path
    keys: list[str]  # every sample written, as "<shard stem>/<key>"
    good: set[str]
    corrupt: set[str]
    lost: set[str]
    prepare_output: str


def _photos(tmp: Path) -> list[tuple[bytes, str]]:
    """The real mini photos as small JPEGs (img2dataset re-encodes to JPEG too) with a caption each."""
    from PIL import Image

    from uniperceiver.data.format import open_dataset, prepare_dataset

    prepare_dataset("mini", None, tmp / "mini-data", options={"only": "photos"})
    ds = open_dataset("mini-photos", tmp / "mini-data")
    out = []
    for split in ("train", "val"):
        for row in ds.samples(split):
            with Image.open(ds.media_path(row)) as img:
                img = img.convert("RGB")
                img.thumbnail((96, 96))
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
            out.append((buf.getvalue(), row["texts"][0]))
    return out


def _write_shard(path: Path, shard: int, photos: list[tuple[bytes, str]]) -> list[str]:
    """One img2dataset webdataset shard; returns its keys."""
    import webdataset as wds

    keys = []
    with wds.TarWriter(str(path)) as sink:
        for i, (jpg, caption) in enumerate(photos):
            key = f"{shard:05d}{i:04d}"
            if (shard, i) == CORRUPT:
                jpg = jpg[: len(jpg) // 3]
            meta = {"key": key, "caption": caption, "url": f"https://example.org/{key}.jpg", "status": "success"}
            sink.write({"__key__": key, "jpg": jpg, "txt": caption, "json": json.dumps(meta).encode()})
            keys.append(key)
    return keys


def _write_stats(root: Path, shard: int, keys: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    stem = f"{shard:05d}"
    stats = {"count": len(keys), "successes": len(keys), "failed_to_download": 0, "failed_to_resize": 0,
             "status_dict": {"success": len(keys)}}
    (root / f"{stem}_stats.json").write_text(json.dumps(stats))
    pq.write_table(pa.table({"key": keys, "status": ["success"] * len(keys)}), root / f"{stem}.parquet")


def _cut(path: Path, member: str) -> None:
    """Cut the tar in the middle of `member`'s data (an interrupted copy)."""
    with tarfile.open(path) as tf:
        info = tf.getmember(member)
    with open(path, "r+b") as fh:
        fh.truncate(info.offset_data + info.size // 2)


@pytest.fixture(scope="module")
def shard_data(tmp_path_factory) -> Shards:
    tmp = tmp_path_factory.mktemp("webdataset")
    photos = _photos(tmp)
    assert len(photos) >= NUM_SHARDS * PER_SHARD
    root = tmp / "cc12m-shards"
    root.mkdir()
    keys, corrupt, lost = [], set(), set()
    for s in range(NUM_SHARDS):
        tar = root / f"{s:05d}.tar"
        written = _write_shard(tar, s, photos[s * PER_SHARD:(s + 1) * PER_SHARD])
        if s in WITH_STATS:
            _write_stats(root, s, written)
        keys += [f"{s:05d}/{k}" for k in written]
        if s == CORRUPT[0]:
            corrupt.add(f"{s:05d}/{written[CORRUPT[1]]}")
        if s == CUT_SHARD:
            _cut(tar, f"{written[CUT_AT]}.jpg")
            lost |= {f"{s:05d}/{k}" for k in written[CUT_AT:]}
    data = tmp / "data"
    proc = run_upctl(["prepare", "cc12m", "--root", root, "--data-dir", data], tmp, subprocess_env(tmp))
    assert proc.returncode == 0, proc.stdout[-3000:]
    return Shards(root, data, keys, set(keys) - corrupt - lost, corrupt, lost, proc.stdout)


def test_prepare_indexes_the_shards_with_their_counts_and_warns_once_about_the_cut_tar(shard_data):
    meta = json.loads((shard_data.data / "cc12m" / "meta.json").read_text())
    rows = [json.loads(line) for line in (shard_data.data / "cc12m" / "train.jsonl").read_text().splitlines()]
    # every sample before the cut is indexed, the corrupt one too (members are decoded by the loaders)
    assert {r["id"] for r in rows} == shard_data.good | shard_data.corrupt
    assert meta["splits"] == {"train": len(rows)}
    assert meta["skipped"]["train"] == {"truncated_shard": len(shard_data.lost)}
    records = {r["file"]: r for r in meta["shards"]["train"]}
    assert records["00000.tar"] == {"file": "00000.tar", "samples": PER_SHARD, "counted_from": "stats",
                                    "indexed": PER_SHARD, "damaged": False}
    assert records["00001.tar"]["counted_from"] == "tar" and records["00001.tar"]["samples"] == PER_SHARD
    assert records[f"{CUT_SHARD:05d}.tar"] == {"file": f"{CUT_SHARD:05d}.tar", "samples": PER_SHARD,
                                               "counted_from": "stats", "indexed": CUT_AT, "damaged": True}
    warnings = [line for line in shard_data.prepare_output.splitlines() if "damaged shard" in line]
    assert len(warnings) == 1 and f"{CUT_SHARD:05d}.tar" in warnings[0], shard_data.prepare_output[-2000:]
    # one line, as the CLI prints warnings: no file:line prefix, no Python source line under it
    assert warnings[0].startswith("warning: "), warnings[0]
    assert "warnings.warn(" not in shard_data.prepare_output and "UserWarning" not in shard_data.prepare_output
    # a row points into its tar: the recorded bytes are exactly the member's JPEG
    row = next(r for r in rows if r["id"] == "00002/000020003")
    assert row["media"] == "00002.tar#000020003.jpg" and row["texts"][0]
    with tarfile.open(shard_data.root / "00002.tar") as tf:
        expected = tf.extractfile("000020003.jpg").read()
    assert shards.read_member(shard_data.root / row["media"], row["media_offset"], row["media_size"]) == expected


def test_a_corrupt_member_and_a_tar_cut_after_prepare_are_media_errors(shard_data):
    from uniperceiver.data.format import open_dataset
    from uniperceiver.data.media import load_image
    from uniperceiver.errors import MediaError

    ds = open_dataset("cc12m", shard_data.data)
    rows = {r["id"]: r for r in ds.samples("train")}
    good = rows["00000/000000001"]
    img = load_image(ds.media_path(good), shards.member_span(good))
    assert img.mode == "RGB" and max(img.size) == 96
    bad = rows[next(iter(shard_data.corrupt))]
    with pytest.raises(MediaError) as err:
        load_image(ds.media_path(bad), shards.member_span(bad))
    assert err.value.kind == "unreadable" and "00001.tar#000010002.jpg" in str(err.value)
    with pytest.raises(MediaError) as err:  # the bytes are no longer there
        shards.read_member(ds.media_path(good), good["media_offset"] + 10**9, good["media_size"])
    assert err.value.kind == "unreadable"


def _copy_with(tmp: Path, src: Path, edit) -> Path:
    """A copy of a good shard, damaged by `edit(bytearray, members)`; returns the copy."""
    with tarfile.open(src) as tf:
        members = {m.name: m for m in tf.getmembers()}
    data = bytearray(src.read_bytes())
    dst = tmp / src.name
    dst.write_bytes(bytes(edit(data, members)))
    return dst


def test_index_keeps_what_precedes_each_kind_of_damage(shard_data, tmp_path):
    good = shard_data.root / "00000.tar"
    whole = shards.index_shard(good)
    assert not whole.damage and len(whole.samples) == PER_SHARD and not whole.cut_keys
    assert set(whole.samples["000000000"]) == {"jpg", "json", "txt"}

    def end_of(name):  # the tar cut right after a member's data (padding to the block included)
        return lambda data, m: data[: m[name].offset_data + -(-m[name].size // 512) * 512]

    # cut after the caption of sample 2: samples 0-2 are whole and kept, only the end marker is missing
    index = shards.index_shard(_copy_with(tmp_path, good, end_of("000000002.txt")))
    assert "end-of-archive" in index.damage and list(index.samples)[-1] == "000000002" and not index.cut_keys
    # cut inside the padding after that caption: tarfile's "unexpected end of data", same samples kept
    cut = shards.index_shard(_copy_with(tmp_path, good, lambda d, m: d[: m["000000002.txt"].offset_data
                                                                      + m["000000002.txt"].size]))
    assert "unexpected end" in cut.damage and list(cut.samples)[-1] == "000000002" and not cut.cut_keys
    # cut after the image of sample 2: its caption is lost, so sample 2 is cut
    index = shards.index_shard(_copy_with(tmp_path, good, end_of("000000002.jpg")))
    assert index.damage and len(index.samples) == 2 and index.cut_keys == ["000000002"]

    def garbage_header(data, m):  # the header block of sample 3's image overwritten
        at = m["000000003.jpg"].offset
        data[at:at + 512] = bytes(range(256)) * 2
        return data

    index = shards.index_shard(_copy_with(tmp_path, good, garbage_header))
    assert index.damage and list(index.samples) == ["000000000", "000000001", "000000002"]
    index = shards.index_shard(_copy_with(tmp_path, good, lambda data, m: b""))
    assert index.damage.startswith("not a readable tar") and not index.samples


def test_member_names_and_references():
    assert shards.split_name("000000012.jpg") == ("000000012", "jpg")
    assert shards.split_name("a/b/000000012.seg.JSON") == ("a/b/000000012", "seg.json")
    assert all(shards.clean_name(n) for n in ("000000012.jpg", "part1/000000012.jpg"))
    assert not any(shards.clean_name(n) for n in ("../x.jpg", "/x.jpg", "a/../x.jpg", "./x.jpg", "a//x.jpg", ""))
    ref = shards.member_ref("train/00003.tar", shards.Member("000031234.jpg", 1536, 10))
    assert ref == "train/00003.tar#000031234.jpg"
    assert shards.shard_of(Path("/raw") / ref) == Path("/raw/train/00003.tar")
    assert shards.member_span({"id": "x", "media_offset": 1536, "media_size": 10}) == (1536, 10)
    assert shards.member_span({"id": "x", "media": "a.jpg"}) is None
    from uniperceiver.errors import DataError

    with pytest.raises(DataError, match="'media_size' should be a byte count"):
        shards.member_span({"id": "x", "media_offset": 1536, "media_size": "10"})


def test_split_folders_of_shards_become_splits(shard_data, tmp_path):
    import shutil

    from uniperceiver.data.format import open_dataset, prepare_dataset
    from uniperceiver.data.media import load_image

    raw = tmp_path / "cc3m"
    for split, src in (("train", "00000"), ("val", "00002")):
        (raw / split).mkdir(parents=True)
        shutil.copyfile(shard_data.root / f"{src}.tar", raw / split / "00000.tar")
    summary = prepare_dataset("cc3m", raw, tmp_path / "data", options={"workers": "1"})
    assert summary.splits == {"train": PER_SHARD, "val": PER_SHARD}
    ds = open_dataset("cc3m", tmp_path / "data")
    row = next(ds.samples("val"))
    assert row["media"] == "val/00000.tar#000020000.jpg" and row["id"] == "00000/000020000"
    assert load_image(ds.media_path(row), shards.member_span(row)).mode == "RGB"
    assert ds.meta["shards"]["val"][0]["file"] == "val/00000.tar"


READER = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist
    from uniperceiver.engine.loader import MultiTaskLoader
    from uniperceiver.modeling.model_config import model_config
    from uniperceiver.tasks.catalog import build_task, task_config

    out, data = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = model_config("tiny", depth=1, width=64, heads=2, mlp_dim=128)
    task = build_task(task_config("cc12m-pt-retrieval", batch_size=4), data, cfg)
    rows = task.examples("train")
    loader = MultiTaskLoader([task], [rows], weights=[1.0], batch_sizes=[4], seed=7, rank=rank,
                             world_size=world, num_workers=2)
    read, failed, failures, skipped, pids = [], [], 0, {}, set()
    for item in loader:
        pids |= set(loader.worker_pids())
        loaded = iter(item.ids)
        expected = next(loaded, None)
        for epoch, index in item.spec.samples:  # failed samples are dropped, the order is kept
            sid = rows[index]["id"]
            ok = sid == expected
            expected = next(loaded, None) if ok else expected
            failures += not ok
            if epoch == 0:
                (read if ok else failed).append(sid)
        for kind, n in item.skipped.items():
            skipped[kind] = skipped.get(kind, 0) + n
        if loader.samplers[0].state.epoch > 0:
            break
    loader.close()
    json.dump({"read": read, "failed": failed, "failures": failures, "skipped": skipped, "world": world,
               "workers": len(pids)}, open(os.path.join(out, f"rank{rank}.json"), "w"))
    dist.barrier()
    dist.destroy_process_group()
    """
)


def test_one_epoch_over_two_gloo_ranks_and_two_workers_reads_every_good_sample_once(shard_data, tmp_path):
    script = tmp_path / "reader.py"
    script.write_text(READER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), str(tmp_path),
           str(shard_data.data)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert all(r["workers"] == 2 for r in ranks), ranks  # both loader workers of each rank read
    read = ranks[0]["read"] + ranks[1]["read"]
    assert sorted(read) == sorted(shard_data.good)  # every good sample, exactly once, over both ranks
    assert not set(ranks[0]["read"]) & set(ranks[1]["read"])
    assert ranks[0]["failed"] + ranks[1]["failed"] == sorted(shard_data.corrupt)
    for r in ranks:  # the corrupt member is counted where it was read, as unreadable media
        assert r["skipped"] == ({"unreadable_media": r["failures"]} if r["failures"] else {}), r
    assert sum(r["failures"] for r in ranks) >= len(shard_data.corrupt)


def _recipe(tmp: Path) -> Path:
    tasks = [{"name": "cc12m-pt-retrieval", "batch_size": 4, "options": {"max_len": 24}}]
    raw = small_recipe(tasks, train={"max_steps": STEPS, "seed": 3, "num_workers": 2, "keep_checkpoints": 20})
    return write_recipe(tmp / "shards.yaml", raw)


STEPS = 9  # 36 draws: ~1.6 epochs of the 22 indexed samples (21 good + the corrupt one) at batch 4


def _train_args(shard_data: Shards, recipe: Path, out: Path) -> list[str]:
    return ["pretrain", str(recipe), "--data-dir", str(shard_data.data), "--output", str(out), "--device", "cpu",
            "--resume", "auto"]


def test_sigkill_mid_epoch_then_resume_auto_gives_the_uninterrupted_losses(shard_data, tmp_path):
    recipe = _recipe(tmp_path)
    env = subprocess_env(tmp_path)
    reference = run_upctl(_train_args(shard_data, recipe, tmp_path / "reference"), tmp_path, env)
    assert reference.returncode == 0, reference.stdout[-3000:]

    out = tmp_path / "killed"
    log = tmp_path / "killed.log"
    proc = start_upctl(_train_args(shard_data, recipe, out), tmp_path, env, log)
    try:
        deadline = time.monotonic() + 180
        while not (out / "checkpoints" / ckpt.step_dir_name(3)).is_dir():  # mid-epoch: 3 of ~5.5 batches
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (out / "final").exists()
    resumed = run_upctl(_train_args(shard_data, recipe, out), tmp_path, env)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"resumed from {out / 'checkpoints'}" in " ".join(resumed.stdout.split())
    expected = train_losses(tmp_path / "reference")
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert train_losses(out) == expected
    # both runs counted the corrupt member each time the seeded plan drew it
    from uniperceiver.engine.sampler import ResumableBatchSampler

    ids = [json.loads(line)["id"] for line in (shard_data.data / "cc12m" / "train.jsonl").read_text().splitlines()]
    plan = ResumableBatchSampler(len(ids), 4, seed=3, key="cc12m-pt-retrieval")
    drawn = [ids[i] for _ in range(STEPS) for _, i in plan.next_batch()[0]]
    times = sum(sid in shard_data.corrupt for sid in drawn)
    assert times >= 1
    last = ckpt.step_dir_name(STEPS)
    skipped = rank_state(tmp_path / "reference" / "checkpoints" / last)["data"]["skipped"]
    assert skipped == {"cc12m-pt-retrieval": {"unreadable_media": times}}
    assert rank_state(out / "checkpoints" / last)["data"]["skipped"] == skipped
    assert_same_tensors(load_weights(out / "final"), load_weights(tmp_path / "reference" / "final"), "final weights")
