"""`upctl demo`: the mini benchmark's plan, its command lines, and a shortened run end to end.

The end-to-end test runs the real `upctl demo --quick` (every stage a real `upctl` subprocess on the
built-in mini data: prepare, pretrain, zeroshot, prompt-tune, finetune, evaluate) and checks the
result files against the per-command JSON records and the prepared data they came from.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from uniperceiver.engine.runs import MetricsLog
from upctl.demo import HELD_OUT, Layout, build_stages, default_plan, last_logged_step
from upctl.demo_baselines import compute_baseline
from upctl.demo_report import GOALS, REGIMES, RESULT_KEYS, fmt, spread
from upctl.main import app

ROOT = Path(__file__).resolve().parents[1]


def test_every_demo_command_parses_with_the_real_cli(tmp_path: Path) -> None:
    """The argument lists the demo runs are accepted by the commands they name (Click's own parser)."""
    group = typer.main.get_command(app)
    plan = default_plan(seeds=2)
    stages = build_stages(plan, Layout(tmp_path / "out", tmp_path / "data"))
    assert [s.key for s in stages] == ["prepare", "pretrain", "zeroshot", "prompt", "finetune"]
    assert len(stages[1].jobs) == 2 and len(stages[2].jobs) == 2 * len(HELD_OUT)
    assert [len(c) for c in stages[3].chains] == [2] * (2 * len(HELD_OUT))  # train, then evaluate
    for stage in stages:
        for job in stage.jobs:
            name, *args = job.args
            command = group.get_command(None, name)  # type: ignore[arg-type]
            assert command is not None, job.args
            ctx = command.make_context(name, list(args), resilient_parsing=False)
            assert ctx.params, job.args
    pretrain = stages[1].jobs[1]
    assert "train.seed=1" in pretrain.args and pretrain.units == 200  # the recipe's max_steps
    prompt = {j.name: j for j in stages[3].jobs}["prompt-mini-digits-s1"]
    assert prompt.args[prompt.args.index("--fraction") + 1] == "0.01"
    assert prompt.args[prompt.args.index("--seed") + 1] == "1"
    assert prompt.args[prompt.args.index("--checkpoint") + 1].endswith("pretrain-s1")


def test_quick_plan_and_held_out_tasks_are_not_pretrained() -> None:
    plan = default_plan(quick=True)
    assert plan.seeds == (0,) and plan.pretrain_steps and plan.prompt_steps and plan.finetune_steps
    from uniperceiver.config import load_recipe

    pretrained = {t.name for t in load_recipe(plan.pretrain_recipe).tasks}
    assert not pretrained & {t.task for t in plan.tasks}, "a held-out task is in the pre-training mixture"
    families = {t.family for t in load_recipe(plan.pretrain_recipe).tasks}
    assert {"retrieval", "video_cls", "mlm"} <= families  # image, video and text together


def test_spread_and_format() -> None:
    mean, std = spread([30.0, 40.0, 50.0])
    assert mean == pytest.approx(40.0) and std == pytest.approx(10.0)
    assert spread([12.5]) == (12.5, 0.0)
    assert fmt(40.0, 10.0, 3) == "40.0 ± 10.0" and fmt(12.5, 0.0, 1) == "12.5"


def test_last_logged_step_follows_a_real_metrics_file(tmp_path: Path) -> None:
    assert last_logged_step(tmp_path) == 0
    log = MetricsLog(tmp_path, tensorboard=False)
    log.write(10, "train", "", {"loss": 2.0}, 1.0)
    log.write(20, "train", "mini-digits", {"loss": 1.5, "acc": 40.0}, 2.0)
    log.close()
    assert last_logged_step(tmp_path) == 20


def test_a_failing_command_stops_the_stage_and_names_its_log(tmp_path: Path) -> None:
    """A real `upctl` call that fails: the stage raises a DemoError with the command, exit code and log tail,
    and the chain's next command never runs."""
    from upctl.demo import DemoError, Job, Runner, Stage

    bad = Job("zeroshot-bad", ["zeroshot", "--task", "mini-nosuchtask", "--checkpoint", str(tmp_path)],
              tmp_path / "logs" / "bad.log")
    after = Job("never", ["tasks"], tmp_path / "logs" / "never.log")
    seen: list[str] = []
    stage = Stage("zeroshot", "a failing stage", [[bad, after]])
    with pytest.raises(DemoError) as err:
        Runner(jobs=2, threads=1, on_done=lambda job: seen.append(job.name)).run(stage)
    text = str(err.value)
    assert "upctl zeroshot --task mini-nosuchtask" in text and "exit 1" in text and str(bad.log) in text
    assert "unknown task 'mini-nosuchtask'" in text  # the log's last lines: the command's own one-line error
    assert bad.log.read_text().startswith("$ upctl zeroshot --task mini-nosuchtask")
    assert not after.log.exists() and seen == [] and stage.seconds > 0


@pytest.mark.parametrize("args, message", [
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--jobs", "0"], "--jobs must be at least 1"),
    (["--pretrain-steps", "-3"], "--pretrain-steps must be at least 1"),
])
def test_bad_options_give_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 1
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "o" / "runs").exists()


# ------------------------------------------------------------------------------------------ end to end


def _record(out: Path, regime: str, task: str) -> dict:
    return json.loads((out / "json" / f"{regime}-{task}-s0.json").read_text())


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path: Path) -> None:
    out, data = tmp_path / "demo-out", tmp_path / "data"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "upctl", "demo", "--quick", "--out", str(out), "--data-dir", str(data)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage_line in ("[1/5] prepare", "[2/5] pre-train", "[3/5] zero-shot", "[4/5] prompt tuning", "[5/5] fine-tuning"):
        assert stage_line in proc.stdout, proc.stdout
    tasks = [t.task for t in HELD_OUT]

    results = json.loads((out / "results.json").read_text())
    assert set(RESULT_KEYS) <= set(results) and results["demo"]["quick"] is True and results["demo"]["seeds"] == [0]
    assert [t["task"] for t in results["tasks"]] == tasks
    assert [s["stage"] for s in results["stages"]] == ["prepare", "pretrain", "zeroshot", "prompt", "finetune"]
    assert sum(s["commands"] for s in results["stages"]) == 2 + len(tasks) * 5
    prep = json.loads((out / "json" / "prepare.json").read_text())
    for held, task in zip(HELD_OUT, results["tasks"]):
        assert 0.0 < task["chance"] < 100.0 and set(task["checks"].values()) <= {True, False}
        for regime in REGIMES:
            r = task["regimes"][regime]
            rec = _record(out, regime, held.task)
            value = rec["metrics"][held.metric]
            assert r["values"] == [pytest.approx(value)] and 0.0 <= value <= 100.0
            assert r["mean"] == pytest.approx(value) and r["std"] == 0.0
            assert r["eval_samples"] == [rec["num_samples"]] and rec["num_samples"] > 0 and rec["split"] == "val"
            assert r["files"] == [f"json/{regime}-{held.task}-s0.json"]
        zs = _record(out, "zeroshot", held.task)
        assert zs["checkpoint"] == str(out / "runs" / "pretrain-s0" / "final")
        assert _record(out, "prompt", held.task)["checkpoint"] == str(out / "runs" / f"prompt-{held.task}-s0" / "final")
        subset = json.loads((data / zs["dataset"] / "splits" / f"train-f{held.prompt_fraction:g}-s0.json").read_text())
        assert task["regimes"]["prompt"]["train_samples"] == [subset["num_samples"]] and subset["num_samples"] >= 1
        assert task["regimes"]["finetune"]["train_samples"] == [prep["splits"][f"{zs['dataset']}/train"]]
        if held.chance_kind == "accuracy":  # the most frequent label's share of the evaluated samples
            labels = Counter(p["label"] for p in zs["predictions"])
            assert task["chance"] == pytest.approx(100.0 * max(labels.values()) / sum(labels.values()))
    digits = next(t for t in results["tasks"] if t["task"] == "mini-digits")
    assert digits["chance"] == pytest.approx(100.0 * 27 / 269)  # stratified val split: 27 of 269 is the largest class

    md = (out / "results.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| mini-")]
    assert [r.split("|")[1].strip() for r in rows] == tasks
    for row, task in zip(rows, results["tasks"]):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2] == f"{task['chance']:.1f}"
        assert cells[3].startswith(f"{task['baseline']['value']:.1f} (")  # the classic baseline column
        assert cells[4] == f"{task['regimes']['zeroshot']['mean']:.1f}"
        assert cells[5].startswith(f"{task['regimes']['prompt']['mean']:.1f} (")
    assert "QUICK run" in md and "classic baseline" in md.splitlines()[next(
        i for i, ln in enumerate(md.splitlines()) if ln.startswith("| held-out task"))]
    assert sum(ln.startswith("- goal ") for ln in md.splitlines()) == len(GOALS)
    # The baseline column is scikit-learn fitted on the same prepared train split, scored on the same samples.
    for held, task in zip(HELD_OUT, results["tasks"]):
        b = task["baseline"]
        assert b["method"] == held.baseline and b["eval_split"] == "val" and b["train_split"] == "train"
        assert b["eval_samples"] == task["regimes"]["zeroshot"]["eval_samples"][0]
        again = compute_baseline(held.baseline, task["dataset"], data, "train", "val")
        assert b["value"] == pytest.approx(again.value) and 0.0 < b["value"] <= 100.0
        assert task["checks"]["finetune_within_5_of_baseline"] == (
            task["regimes"]["finetune"]["mean"] >= b["value"] - 5.0)
    assert results["demo"]["command"].startswith("upctl demo --quick") or "demo --quick" in results["demo"]["command"]
    assert results["demo"]["machine"]["cores"] == os.cpu_count() and results["demo"]["threads_per_command"] == 1

    png = (out / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(out / "results.png") as img:
        img.verify()
    with Image.open(out / "results.png") as img:
        assert img.format == "PNG" and img.width > 300 and img.height > 200

    for stage in ("pretrain-s0", *(f"{r}-{t}-s0" for r in ("prompt", "finetune") for t in tasks)):
        run = out / "runs" / stage
        assert (run / "final" / "model.safetensors").is_file(), stage
        assert not (run / "checkpoints").exists(), stage  # pruned: the demo only needs final/
        with open(run / "metrics.csv", newline="") as fh:
            assert any(row["phase"] == "train" for row in csv.DictReader(fh)), stage
    assert len(list((out / "logs").glob("*.log"))) == 2 + len(tasks) * 5
    assert (out / "logs" / "pretrain-s0.log").read_text().startswith("$ upctl pretrain ")


@pytest.mark.slow
def test_demo_commands_reproduce_exactly_on_one_machine_with_one_thread(tmp_path: Path) -> None:
    """What the demo promises: the same commands, seed and thread count on one machine give identical numbers.

    The demo runs every command with one BLAS/OpenMP thread (`child_env(1)`), so the core count of the
    machine does not change the arithmetic; another CPU model may (other vector kernels round differently).
    """
    from upctl.demo import Job, Runner, Stage

    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "upctl", "prepare", "mini", "--data-dir", str(data), "--option",
                    "only=digits,photos,video,news"], check=True, capture_output=True, cwd=tmp_path, timeout=600)
    chains = []
    for copy in ("a", "b"):
        run, rec = tmp_path / f"pt-{copy}", tmp_path / f"zs-{copy}.json"
        chains.append([
            Job(f"pretrain-{copy}", ["pretrain", str(ROOT / "recipes" / "mini" / "pretrain.yaml"), "--data-dir", str(data),
                                     "--output", str(run), "--max-steps", "12", "--set", "train.seed=3"],
                tmp_path / f"pretrain-{copy}.log"),
            Job(f"zeroshot-{copy}", ["zeroshot", "--task", "mini-digits", "--checkpoint", str(run), "--data-dir", str(data),
                                     "--json", str(rec), "--no-cache"], tmp_path / f"zeroshot-{copy}.log"),
        ])
    Runner(jobs=2, threads=1).run(Stage("repro", "twice the same commands side by side", chains))
    a, b = (json.loads((tmp_path / f"zs-{c}.json").read_text()) for c in ("a", "b"))
    assert a["metrics"] == b["metrics"] and a["num_samples"] == b["num_samples"] == 269
    assert [(p["pred"], p["scores"]) for p in a["predictions"]] == [(p["pred"], p["scores"]) for p in b["predictions"]]
    weights = [(tmp_path / f"pt-{c}" / "final" / "model.safetensors").read_bytes() for c in ("a", "b")]
    assert weights[0] == weights[1]
    with open(tmp_path / "pt-a" / "metrics.csv", newline="") as fh:
        losses = [row["value"] for row in csv.DictReader(fh) if row["name"] == "loss"]
    assert len(set(losses)) > 1  # the runs trained: identical files are not two untouched initialisations
