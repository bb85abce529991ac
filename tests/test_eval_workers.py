"""Evaluation with DataLoader workers: the same predictions, order, metrics and skip counts as loading
in the main process, on the real mini datasets (sklearn digits, skvideo clips) with broken media."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

for _mod in ("sklearn", "skimage", "skvideo"):
    pytest.importorskip(_mod)  # optional: the mini extra

from _tiny_models import save_tiny_checkpoint  # noqa: E402
from uniperceiver.errors import DataError, UpctlError  # noqa: E402
from uniperceiver.evaluation.harness import evaluate_task  # noqa: E402
from uniperceiver.evaluation.sample_loading import iter_loaded  # noqa: E402
from uniperceiver.modeling.model_dir import load_model  # noqa: E402
from uniperceiver.tasks.catalog import build_task, task_config  # noqa: E402
from uniperceiver.tokenizers.text import get_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def mini_data(tmp_path_factory) -> Path:
    from uniperceiver.data.format import prepare_dataset

    data_dir = tmp_path_factory.mktemp("data")
    prepare_dataset("mini", None, data_dir, options={"only": "digits,video"})
    return data_dir


def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _broken_digits(tmp_path: Path, mini_data: Path, ckpt: Path, n: int = 23):
    """mini-digits whose first `n` val images sit in a private raw folder, three of them broken."""
    task = build_task(task_config("mini-digits"), mini_data, load_model(ckpt).cfg, get_tokenizer())
    first = task.examples("val")[:n]
    raw, private = task.dataset.raw_root, tmp_path / "raw"
    for s in first:
        (private / s["media"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(raw / s["media"], private / s["media"])
    task.dataset.meta["raw_root"] = str(private)
    (private / first[2]["media"]).unlink()  # missing
    (private / first[9]["media"]).write_bytes(b"")  # empty
    (private / first[17]["media"]).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")  # not an image
    return task, first


def test_workers_give_the_same_predictions_in_order_and_count_broken_media(tmp_path, mini_data, ckpt):
    task, first = _broken_digits(tmp_path, mini_data, ckpt)
    model = load_model(ckpt).eval()
    rng_before = torch.get_rng_state()
    runs = {w: evaluate_task(model, task, limit=len(first), batch_size=5, num_workers=w) for w in (0, 2)}
    # DataLoader workers seeded from their own generator: a periodic evaluation leaves training's RNG alone
    assert torch.equal(torch.get_rng_state(), rng_before)
    serial, workers = runs[0], runs[2]
    expected_ids = [s["id"] for i, s in enumerate(first) if i not in (2, 9, 17)]
    assert [p["id"] for p in serial.predictions] == expected_ids
    assert [p["id"] for p in workers.predictions] == expected_ids
    assert serial.skipped == workers.skipped == {"bad_format_media": 1, "empty_media": 1, "missing_media": 1}
    assert serial.num_samples == workers.num_samples == 20 and workers.requested == 23
    assert _plain(workers.predictions) == _plain(serial.predictions)
    assert workers.metrics == serial.metrics


def test_workers_on_a_manual_shard_and_on_video(tmp_path, mini_data, ckpt):
    model = load_model(ckpt).eval()
    task, first = _broken_digits(tmp_path, mini_data, ckpt)
    shard = {w: evaluate_task(model, task, limit=len(first), batch_size=4, rank=1, world_size=2, num_workers=w)
             for w in (0, 2)}
    assert [p["id"] for p in shard[2].predictions] == [p["id"] for p in shard[0].predictions]
    assert [p["id"] for p in shard[2].predictions] == [s["id"] for i, s in enumerate(first) if i % 2 and i != 9 and i != 17]
    assert _plain(shard[2].predictions) == _plain(shard[0].predictions) and shard[2].skipped == shard[0].skipped

    video = build_task(task_config("mini-video"), mini_data, model.cfg, get_tokenizer())
    clips = {w: evaluate_task(model, video, limit=6, batch_size=4, num_workers=w) for w in (0, 2)}
    assert clips[0].num_samples == 6 and [p["id"] for p in clips[2].predictions] == [p["id"] for p in clips[0].predictions]
    # Video frames are resized with torch's bilinear interpolate, whose last float bit depends on the
    # thread count (a worker runs one thread): the same rankings, scores equal to float32 rounding.
    for got, want in zip(_plain(clips[2].predictions), _plain(clips[0].predictions), strict=True):
        assert {k: v for k, v in got.items() if k != "scores"} == {k: v for k, v in want.items() if k != "scores"}
        assert got["scores"] == pytest.approx(want["scores"], abs=1e-5)
    assert clips[2].metrics == pytest.approx(clips[0].metrics)


def test_a_data_error_in_a_worker_keeps_its_one_line_message(mini_data, ckpt):
    model = load_model(ckpt).eval()
    task = build_task(task_config("mini-digits"), mini_data, model.cfg, get_tokenizer())
    rows = [dict(s) for s in task.examples("val")[:6]]
    rows[4]["media"] = "../outside.png"
    for workers in (0, 2):
        with pytest.raises(DataError, match=r"media path '\.\./outside\.png' escapes the raw root") as err:
            evaluate_task(model, task, samples=rows, batch_size=2, num_workers=workers)
        assert "\n" not in str(err.value) and "DataLoader" not in str(err.value)
    with pytest.raises(UpctlError, match="--workers must be 0 or more, got -1"):
        evaluate_task(model, task, limit=2, num_workers=-1)


def test_iter_loaded_yields_every_index_once_in_the_order_asked(mini_data, ckpt):
    task = build_task(task_config("mini-digits"), mini_data, load_model(ckpt).cfg, get_tokenizer())
    examples = task.examples("val")
    indices = range(3, 40, 3)
    for workers in (0, 2):
        got = list(iter_loaded(task, examples, indices, chunk=4, num_workers=workers))
        assert [idx for idx, _, _ in got] == list(indices)
        assert [item["id"] for _, item, _ in got] == [examples[i]["id"] for i in indices]


def test_cli_workers_flag(tmp_path, mini_data, ckpt, monkeypatch):
    from typer.testing import CliRunner

    from upctl.main import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("UPCTL_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    records = []
    for workers in ("0", "2"):
        out = tmp_path / f"w{workers}.json"
        res = runner.invoke(app, ["zeroshot", "--task", "mini-digits", "--checkpoint", str(ckpt), "--data-dir",
                                  str(mini_data), "--limit", "12", "--workers", workers, "--json", str(out)])
        assert res.exit_code == 0, res.output
        records.append(json.loads(out.read_text()))
    assert records[0]["metrics"] == records[1]["metrics"] and records[0]["num_samples"] == records[1]["num_samples"] == 12
    res = runner.invoke(app, ["zeroshot", "--task", "mini-digits", "--checkpoint", str(ckpt), "--data-dir",
                              str(mini_data), "--workers", "-1"])
    assert res.exit_code != 0 and "--workers must be 0 or more" in res.output
