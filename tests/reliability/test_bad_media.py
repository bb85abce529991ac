"""Bad media and annotations: a copy of the real mini-digits and mini-video datasets whose raw files
are damaged (5% truncated images plus missing files, zero-byte files and files whose content does
not match their extension; one zero-byte video, one "video" that is a PNG) trains and evaluates to
the end, and every skipped sample is counted under its kind; malformed manifest lines stop with
one line naming the file and the line.

The expected counts are exact: training draws follow the seeded plan (task choice + per-task
cursors), which the test replays over the damage map.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from uniperceiver.engine import train_checkpoint as ckpt
from uniperceiver.engine.sampler import ResumableBatchSampler, TaskChooser
from uniperceiver.modeling.model_config import model_config
from uniperceiver.tasks.catalog import build_task, task_config

from .conftest import SMALL_MODEL, invoke, rank_state, small_recipe, write_recipe

TASKS = [{"name": "mini-digits", "batch_size": 16, "sample_weight": 1.0},
         {"name": "mini-video", "batch_size": 4, "sample_weight": 1.0}]
STEPS = 10
SEED = 0


def _copy_dataset(src_data: Path, name: str, data: Path, raw: Path) -> list[dict]:
    """Copy a prepared dataset and the media its manifests use to a new raw root; returns all rows."""
    src = src_data / name
    meta = json.loads((src / "meta.json").read_text())
    shutil.copytree(src, data / name)
    rows = []
    for split in meta["splits"]:
        for line in (src / f"{split}.jsonl").read_text().splitlines():
            row = json.loads(line)
            rows.append(row)
            dst = raw / row["media"]
            if not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(meta["raw_root"]) / row["media"], dst)
    meta["raw_root"] = str(raw)
    (data / name / "meta.json").write_text(json.dumps(meta))
    return rows


def _damage(path: Path, kind: str, video_bytes: bytes, png_bytes: bytes) -> None:
    if kind == "missing":
        path.unlink()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "unreadable":  # truncated: the header is fine, the data stops early
        data = path.read_bytes()
        path.write_bytes(data[: max(60, len(data) // 3)])
    elif kind == "bad_format":  # the wrong content for the extension: an mp4 named .png, a png named .mp4
        path.write_bytes(video_bytes if path.suffix == ".png" else png_bytes)
    else:
        raise AssertionError(kind)


def _plan_counts(tasks: list, examples: list[list[dict]], damage: dict[str, str]) -> dict[str, dict[str, int]]:
    """Replay the training plan: skipped samples per task and kind over the draws of STEPS steps."""
    chooser = TaskChooser([t["sample_weight"] for t in TASKS], SEED)
    samplers = [ResumableBatchSampler(len(ex), t["batch_size"], seed=SEED, key=t["name"])
                for ex, t in zip(examples, TASKS)]
    counts: dict[str, dict[str, int]] = {}
    step = draw = 0
    while step < STEPS:
        t = chooser.choose(0, draw)
        draw += 1
        batch, _ = samplers[t].next_batch()
        kinds = [damage.get(examples[t][i]["media"]) for _, i in batch]
        for kind in kinds:
            if kind is not None:
                bucket = counts.setdefault(TASKS[t]["name"], {})
                bucket[f"{kind}_media"] = bucket.get(f"{kind}_media", 0) + 1
        if any(k is None for k in kinds):
            step += 1  # a draw with at least one good sample is a step; an all-bad draw is skipped
    return counts


class Damaged:
    def __init__(self, data: Path, damage: dict[str, str], rows: dict[str, list[dict]]) -> None:
        self.data = data
        self.damage = damage
        self.rows = rows

    def expected_eval(self, dataset: str, split: str = "val") -> dict[str, int]:
        out: dict[str, int] = {}
        for row in self.rows[dataset]:
            if row["id"] in self.split_ids(dataset, split) and row["media"] in self.damage:
                key = f"{self.damage[row['media']]}_media"
                out[key] = out.get(key, 0) + 1
        return out

    def split_ids(self, dataset: str, split: str) -> set[str]:
        path = self.data / dataset / f"{split}.jsonl"
        return {json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()}


@pytest.fixture(scope="module")
def damaged(mini_data, tmp_path_factory) -> Iterator[Damaged]:
    tmp = tmp_path_factory.mktemp("bad-media")
    data, raw = tmp / "data", tmp / "raw"
    rows = {name: _copy_dataset(mini_data, name, data, raw) for name in ("mini-digits", "mini-video")}
    video_bytes = (raw / "video" / "bikes.mp4").read_bytes()
    png_bytes = (raw / rows["mini-digits"][0]["media"]).read_bytes()
    rnd = random.Random(1234)
    damage: dict[str, str] = {}
    # digits: in every split 5% truncated images, plus ~1% each missing / zero-byte / an mp4 named .png
    by_split: dict[str, list[str]] = {}
    for split in ("train", "val"):
        ids = data / "mini-digits" / f"{split}.jsonl"
        by_split[split] = [json.loads(line)["media"] for line in ids.read_text().splitlines()]
    for split, media in by_split.items():
        picked = rnd.sample(media, k=len(media) // 20 + 3 * max(3, len(media) // 100))
        n = len(media) // 20
        rest = picked[n:]
        third = len(rest) // 3
        for m in picked[:n]:
            damage[m] = "unreadable"
        for m in rest[:third]:
            damage[m] = "missing"
        for m in rest[third : 2 * third]:
            damage[m] = "empty"
        for m in rest[2 * third :]:
            damage[m] = "bad_format"
    # videos: one zero-byte clip, one clip that is really a PNG
    damage["video/bikes.mp4"] = "empty"
    damage["video/carphone_distorted.mp4"] = "bad_format"
    for media, kind in damage.items():
        _damage(raw / media, kind, video_bytes, png_bytes)
    yield Damaged(data, damage, rows)
    shutil.rmtree(tmp, ignore_errors=True)  # module done: free its disk now, not at session end


@pytest.fixture(scope="module")
def trained(damaged, tmp_path_factory):
    """`upctl pretrain` on the damaged data (in-process), and the counts the plan predicts."""
    tmp = tmp_path_factory.mktemp("bad-media-run")
    cfg = model_config("tiny", **SMALL_MODEL)
    examples = [build_task(task_config(t["name"]), damaged.data, cfg).examples("train") for t in TASKS]
    expected = _plan_counts(TASKS, examples, damaged.damage)
    kinds = {k for per in expected.values() for k in per}
    assert kinds == {"missing_media", "empty_media", "unreadable_media", "bad_format_media"}, expected
    recipe = write_recipe(tmp / "r.yaml", small_recipe(TASKS, train={"max_steps": STEPS, "seed": SEED,
                                                                      "ckpt_every": 0}))
    out = tmp / "run"
    res = invoke(["pretrain", recipe, "--data-dir", damaged.data, "--output", out, "--device", "cpu"])
    yield res, out, expected
    shutil.rmtree(tmp, ignore_errors=True)  # module done: free its disk now, not at session end


@pytest.mark.slow
def test_training_on_damaged_media_finishes_and_counts_every_skipped_sample_by_kind(trained):
    res, out, expected = trained
    assert res.exception is None and res.exit_code == 0, res.output[-3000:]
    assert f"done: step {STEPS}/{STEPS}" in res.flat
    total = sum(n for per in expected.values() for n in per.values())
    assert f"skipped {total} unreadable sample(s)" in res.flat, (expected, res.flat[-800:])
    last = ckpt.find_valid_checkpoint(out / "checkpoints")
    assert last is not None and last.name == ckpt.step_dir_name(STEPS)
    assert rank_state(last)["data"]["skipped"] == expected  # per task, per kind: nothing dropped silently


def test_training_summary_names_each_kind_with_its_count(trained):
    res, _, expected = trained
    for task, per in expected.items():
        for kind, n in per.items():
            assert f"{kind}: {n}" in res.flat, (task, kind, n, res.flat[-800:])


@pytest.mark.parametrize("task,dataset", [("mini-digits", "mini-digits"), ("mini-video", "mini-video")])
def test_evaluation_on_damaged_media_finishes_and_counts_each_kind(damaged, trained, task, dataset, tmp_path):
    _, out, _ = trained
    record = tmp_path / "eval.json"
    res = invoke(["zeroshot", "--task", task, "--checkpoint", out / "final", "--data-dir", damaged.data,
                  "--json", record, "--no-cache", "--device", "cpu"])
    assert res.exception is None and res.exit_code == 0, res.output[-3000:]
    got = json.loads(record.read_text())
    expected = damaged.expected_eval(dataset)
    assert expected and got["skipped"] == expected
    n_val = len(damaged.split_ids(dataset, "val"))
    assert got["requested"] == n_val and got["num_samples"] + sum(expected.values()) == n_val
    assert len(got["predictions"]) == got["num_samples"]
    shown = ", ".join(f"{k}: {v}" for k, v in sorted(expected.items()))
    assert f"skipped {sum(expected.values())} ({shown})" in res.flat, res.flat[-800:]


# ------------------------------------------------------------------------------ malformed manifests


def _with_bad_line(damaged: Damaged, tmp: Path, split: str, lineno: int, text: str) -> Path:
    data = tmp / "data"
    for name in ("mini-digits",):
        shutil.copytree(damaged.data / name, data / name)
    path = data / "mini-digits" / f"{split}.jsonl"
    lines = path.read_text().splitlines()
    lines.insert(lineno - 1, text)
    path.write_text("\n".join(lines) + "\n")
    return data


@pytest.mark.parametrize("text,problem", [
    ('{"id": "digit-x", "media": "digits/0001.png", "label": 1', "malformed JSON"),
    ('["digit-y", "digits/0001.png"]', "expected a JSON object with an 'id' key"),
    ('{"media": "digits/0001.png", "label": 1}', "expected a JSON object with an 'id' key"),
])
def test_malformed_eval_manifest_line_is_reported_with_file_and_line(damaged, trained, tmp_path, text, problem):
    _, out, _ = trained
    data = _with_bad_line(damaged, tmp_path, "val", 7, text)
    res = invoke(["zeroshot", "--task", "mini-digits", "--checkpoint", out / "final", "--data-dir", data,
                  "--no-cache", "--device", "cpu"])
    assert res.exception is None and res.exit_code == 1, res.output[-2000:]
    assert f"{data / 'mini-digits' / 'val.jsonl'}:7: {problem}" in res.flat, res.flat[-1000:]
    assert "Traceback" not in res.output


def test_malformed_train_manifest_line_is_reported_with_file_and_line(damaged, tmp_path):
    data = _with_bad_line(damaged, tmp_path, "train", 300, '{"id": "digit-z", "label": 3,,}')
    recipe = write_recipe(tmp_path / "r.yaml", small_recipe([TASKS[0]], train={"max_steps": 2}))
    res = invoke(["pretrain", recipe, "--data-dir", data, "--output", tmp_path / "run", "--device", "cpu"])
    assert res.exception is None and res.exit_code == 1, res.output[-2000:]
    assert f"{data / 'mini-digits' / 'train.jsonl'}:300: malformed JSON" in res.flat, res.flat[-1000:]
