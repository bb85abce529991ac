"""`evaluate_checkpoint`: evaluation as one library call, on a saved tiny model and the real mini digits.

What the command line relies on: every kind of checkpoint path resolves to its weights, every
kind of task request builds the same task, bad input fails before the weights load, and the
result carries what the `--json` record needs (metrics that the predictions reproduce, the
resolved checkpoint, cache counters, the task's evaluation extras).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("sklearn")  # the mini digits come from scikit-learn

from uniperceiver.errors import CheckpointError, ConfigError, DataError  # noqa: E402
from uniperceiver.evaluation.api import evaluate_checkpoint  # noqa: E402
from uniperceiver.evaluation.checkpoints import resolve_model_dir  # noqa: E402
from uniperceiver.evaluation.harness import EvalOptions, evaluate_task  # noqa: E402
from uniperceiver.modeling import build_model, save_model  # noqa: E402
from _tiny_models import save_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model (LayerScale 1.0, so random features still depend on the input) as a model folder."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from uniperceiver.data.format import prepare_dataset

    out = tmp_path_factory.mktemp("data")
    prepare_dataset("mini", None, out, options={"only": "digits"})
    return out


def _top1(predictions: list[dict]) -> float:
    return 100.0 * float(np.mean([p["pred"] == p["label"] for p in predictions]))


def test_a_model_folder_on_a_catalog_task(ckpt: Path, data: Path) -> None:
    seen: list[tuple[int, int | None, str]] = []
    result = evaluate_checkpoint(ckpt, "mini-digits", limit=24, batch_size=8, data_dir=data, device="cpu",
                                 progress=lambda done, total, desc: seen.append((done, total, desc)))
    assert result.task == "mini-digits" and result.split == "val" and result.family == "image_cls"
    assert result.num_samples == result.requested == 24 and result.skipped == {}
    assert result.metrics["top1"] == pytest.approx(_top1(result.predictions))
    assert result.checkpoint == ckpt and not result.checkpoint_default
    assert result.extras["target_labels"][:3] == ["zero", "one", "two"]
    assert result.extras["task_requested"] == "mini-digits"
    assert result.target_cache == {"dir": None, "hits": 0, "disk_hits": 0, "misses": 1}
    assert seen[0][:2] == (0, 24) and seen[-1][:2] == (24, 24)
    record = result.to_dict()
    json.dumps(record)  # JSON-able as it is
    assert record["checkpoint"] == str(ckpt.absolute()) and record["dataset"] == "mini-digits"
    assert record["target_labels"] == result.extras["target_labels"] and "predictions" not in record


def test_run_folders_resolve_to_their_newest_weights(ckpt: Path, data: Path, tmp_path: Path) -> None:
    run = tmp_path / "finetune-mini-digits-20250101-000000"
    shutil.copytree(ckpt, run / "stage-1" / "final")
    assert resolve_model_dir(run) == run / "stage-1" / "final"
    shutil.copytree(ckpt, run / "stage-2" / "final")
    assert resolve_model_dir(run) == run / "stage-2" / "final"  # the later stage wins
    shutil.copytree(ckpt, run / "final")
    result = evaluate_checkpoint(run, "mini-digits", limit=4, data_dir=data, device="cpu")
    assert result.checkpoint == run / "final"
    (tmp_path / "empty-run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="not a model folder .* or a run with weights"):
        resolve_model_dir(tmp_path / "empty-run")


def test_no_checkpoint_means_the_newest_pretraining_run(ckpt: Path, data: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="no pre-training run with weights"):
        evaluate_checkpoint(None, "mini-digits", limit=4, data_dir=data, device="cpu")
    for name, stage in (("pretrain-tiny-20250101-000000", "pretrain"), ("finetune-x-20250102-000000", "finetune")):
        shutil.copytree(ckpt, tmp_path / "runs" / name / "final")
        (tmp_path / "runs" / name / "run.json").write_text(json.dumps({"stage": stage, "recipe": "tiny"}))
    notes: list[str] = []
    result = evaluate_checkpoint(None, "mini-digits", limit=4, data_dir=data, device="cpu", notify=notes.append)
    assert result.checkpoint_default and result.checkpoint.parent.name == "pretrain-tiny-20250101-000000"
    assert notes == [f"using the newest pre-training checkpoint: {result.checkpoint}"]


def test_a_task_config_and_a_name_give_the_same_result(ckpt: Path, data: Path, tmp_path: Path) -> None:
    from uniperceiver.tasks.catalog import task_config

    by_name = evaluate_checkpoint(ckpt, "mini-digits", limit=12, data_dir=data, device="cpu", cache_dir=tmp_path)
    by_config = evaluate_checkpoint(ckpt, task_config("mini-digits"), limit=12, batch_size=5, data_dir=data,
                                    device="cpu", cache_dir=tmp_path)
    assert by_config.metrics == pytest.approx(by_name.metrics)
    assert by_name.target_cache["misses"] == 1 and by_config.target_cache["disk_hits"] == 1  # shared cache folder
    assert [p["pred"] for p in by_config.predictions] == [p["pred"] for p in by_name.predictions]


def test_a_custom_task_file_with_top_k(ckpt: Path, tmp_path: Path) -> None:
    skdata = pytest.importorskip("skimage.data")
    from PIL import Image

    for cls, name in (("cat", "chelsea"), ("coffee", "coffee"), ("rocket", "rocket")):
        (tmp_path / "in" / cls).mkdir(parents=True)
        Image.fromarray(getattr(skdata, name)()).save(tmp_path / "in" / cls / f"{name}.png")
    spec = tmp_path / "photos.yaml"
    spec.write_text(yaml.safe_dump({"inputs": {"images": "in"}, "candidates": ["cat", "coffee", "rocket"]}))
    result = evaluate_checkpoint(ckpt, str(spec), options={"top_k": 2}, device="cpu")
    assert result.num_samples == 3 and all(len(p["ranked"]) == 2 for p in result.predictions)
    assert result.extras["top_k"] == 2 and result.extras["candidates"] == ["cat", "coffee", "rocket"]
    assert result.extras["custom_task"] == str(spec.absolute())
    with pytest.raises(ConfigError, match=r"options \['beam_size'\] apply to catalog tasks"):
        evaluate_checkpoint(ckpt, spec, options={"beam_size": 1}, device="cpu")


def test_bad_requests_fail_before_the_weights_load(ckpt: Path, data: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(ConfigError, match="unknown task 'no-such-task'"):
        evaluate_checkpoint(tmp_path / "nowhere", "no-such-task", device="cpu")  # the task is checked first
    with pytest.raises(ConfigError, match="--limit must be a positive"):
        evaluate_checkpoint(broken, "mini-digits", limit=0, data_dir=data, device="cpu")
    with pytest.raises(DataError, match="run `upctl prepare mini` first"):
        evaluate_checkpoint(broken, "mini-faces", data_dir=data, device="cpu")  # data before weights
    with pytest.raises(CheckpointError):
        evaluate_checkpoint(broken, "mini-digits", limit=2, data_dir=data, device="cpu")  # then the weights


def test_a_tuned_head_must_fit_the_task(data: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    tuned = save_model(build_model("tiny", cls_head_classes=3), tmp_path / "tuned")
    with pytest.raises(CheckpointError, match="head has 3 classes but task 'mini-digits' has 10 candidates"):
        evaluate_checkpoint(tuned, "mini-digits", limit=2, data_dir=data, device="cpu", check_head=True)


def test_evaluate_task_takes_options_or_their_fields(ckpt: Path, data: Path) -> None:
    """The trainer's periodic evaluation calls the harness with keywords; EvalOptions is the same call."""
    from uniperceiver.modeling.model_dir import load_model
    from uniperceiver.tasks.catalog import build_task, task_config

    model = load_model(ckpt).eval()
    task = build_task(task_config("mini-digits"), data, model.cfg)
    by_keywords = evaluate_task(model, task, split="val", limit=9, batch_size=4)
    by_options = evaluate_task(model, task, EvalOptions(split="val", limit=9, batch_size=2))
    overridden = evaluate_task(model, task, EvalOptions(split="val", limit=50), limit=9)
    assert by_keywords.num_samples == by_options.num_samples == overridden.num_samples == 9
    assert by_options.metrics == pytest.approx(by_keywords.metrics) == overridden.metrics
    with pytest.raises(TypeError):
        evaluate_task(model, task, splt="val")  # a misspelt setting is an error, not ignored
