"""`upctl zeroshot`, `upctl evaluate`, `upctl predict`: score a checkpoint on a task or on your own files.

All three call `uniperceiver.evaluation.api.evaluate_checkpoint`; this module only parses the
options, renders rich tables and writes the `--json` record (metrics, checkpoint, task, split,
sample counts, skipped media, time, versions and the predictions, with tensors in a sibling
`.safetensors` file, so every number can be recomputed from the file).
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from uniperceiver.errors import ConfigError
from upctl.common import err_console, fail_on_error, json_to_stdout, progress_callback, report_console, write_json

if TYPE_CHECKING:  # imported inside the commands: `upctl --help` must not load torch
    from uniperceiver.evaluation.harness import EvalResult

_TASK_HELP = "Catalog task (e.g. mini-digits, imagenet, msvd, vqa) or a custom task YAML file (my-task.yaml)."
_JSON_HELP = "Write metrics and predictions to this JSON file ('-': standard output, tensors inline)."


# ------------------------------------------------------------------------------------------ rendering and records


def _versions() -> dict[str, str]:
    import torch

    from uniperceiver import __version__

    return {"upctl": __version__, "torch": torch.__version__, "python": platform.python_version()}


def _fmt(key: str, value: float) -> str:
    if key in ("inputs", "labelled", "num_questions"):
        return f"{int(value):,}"
    if abs(value) < 1e-9:  # BLEU of an empty overlap is 1e-15, not a number worth digits
        return "0.00"
    return f"{value:.2f}" if abs(value) >= 0.01 else f"{value:.4g}"


def _print_metrics(out: Console, result: EvalResult, title: str) -> None:
    out.print(f"[bold]{title}[/]  checkpoint: {escape(str(result.checkpoint))}", highlight=False, soft_wrap=True)
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.metrics.items():
        table.add_row(key, _fmt(key, value))
    out.print(table)
    skipped = ", ".join(f"{k}: {v}" for k, v in result.skipped.items())
    out.print(
        f"{result.num_samples:,} of {result.requested:,} sample(s) scored"
        + (f"; skipped {sum(result.skipped.values()):,} ({skipped})" if skipped else "")
        + f"; {result.seconds:.1f} s",
        highlight=False,
    )


def _print_ranked(out: Console, predictions: list[dict], limit: int = 50) -> None:
    table = Table(title="ranked candidates", title_justify="left")
    table.add_column("input", overflow="fold")
    table.add_column("top candidates (cosine, probability)", overflow="fold")
    table.add_column("label")
    for pred in predictions[:limit]:
        ranked = "; ".join(f"{r['candidate']} ({r['score']:.3f}, {r['prob']:.2f})" for r in pred["ranked"])
        label = pred.get("label")
        mark = "" if label is None else (" ✓" if pred.get("correct") else " ✗")
        table.add_row(str(pred["input"]), ranked, "" if label is None else f"{label}{mark}")
    out.print(table)
    if len(predictions) > limit:
        out.print(f"... {len(predictions) - limit} more in the --json file", highlight=False)


def _inline_tensors(rows: Any, tensors: dict[str, Any]) -> Any:
    """`--json -` has no sibling file: tensor references become nested lists in the record itself."""
    from uniperceiver.evaluation.harness import TENSOR_REF

    if isinstance(rows, dict):
        if TENSOR_REF in rows and set(rows) <= {TENSOR_REF, "row"}:
            t = tensors[rows[TENSOR_REF]]
            return (t[int(rows["row"])] if "row" in rows else t).tolist()
        return {k: _inline_tensors(v, tensors) for k, v in rows.items()}
    if isinstance(rows, list):
        return [_inline_tensors(v, tensors) for v in rows]
    return rows


def _write_record(out: Console, command: str, json_file: Path, result: EvalResult, extra: dict[str, Any]) -> None:
    """Write the JSON record; tensors in predictions go to `<json stem>.safetensors` beside it."""
    from safetensors.torch import save as st_save

    from uniperceiver.evaluation.harness import split_predictions
    from uniperceiver.utils.files import atomic_write

    record = {"command": command, **result.to_dict(), "versions": _versions(), "tensors_file": None, **extra}
    rows, tensors = split_predictions(result.predictions)
    if json_to_stdout(json_file):
        record["predictions"] = _inline_tensors(rows, tensors)
        write_json(json_file, record)
        return
    tensor_file = None
    if tensors:
        tensor_file = json_file.with_suffix(".safetensors")
        data = st_save(tensors)
        atomic_write(tensor_file, lambda fh: fh.write(data))
        record["tensors_file"] = tensor_file.name
    record["predictions"] = rows
    write_json(json_file, record)
    out.print(f"wrote {json_file}" + (f" and {tensor_file}" if tensor_file else ""), highlight=False)


def _notify(message: str) -> None:
    style = "yellow" if message.startswith("warning:") else None
    err_console.print(message, style=style, highlight=False, soft_wrap=True, markup=False)


def _run(command: str, task: str, checkpoint: Path | None, json_file: Path | None, **kwargs: Any) -> None:
    """Shared body of `zeroshot` and `evaluate`: call the library, render, write the record."""
    from uniperceiver.evaluation.api import evaluate_checkpoint

    out = report_console(json_file)
    with progress_callback(f"{command} {Path(task).stem if task.endswith(('.yaml', '.yml')) else task}") as progress:
        result = evaluate_checkpoint(checkpoint, task, progress=progress, notify=_notify, **kwargs)
    _print_metrics(out, result, f"{command} {result.task} ({result.split})")
    if "custom_task" in result.extras:
        _print_ranked(out, result.predictions)
    if result.extras.get("candidate_skipped"):
        out.print(f"unreadable candidate example images skipped: {result.extras['candidate_skipped']}", highlight=False)
    if json_file is not None:
        _write_record(out, command, json_file, result, {"limit": kwargs.get("limit")})


def _is_image(path: Path) -> bool:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path):
            return True
    except (UnidentifiedImageError, OSError, ValueError):
        return False


def _is_video(path: Path) -> bool:
    """A first frame decodes (opening alone is not enough: FFmpeg opens any *.png as a one-frame video)."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return False
            next(container.decode(video=0))
            return True
    except (av.FFmpegError, OSError, ValueError, StopIteration):
        return False


def _check_media_kind(kind: str, path: Path) -> None:
    """`predict --image clip.mp4` (or `--video photo.jpg`): name the file and the right option, instead of
    letting the single sample fail to load as bad_format_media. Decided by the content, not the suffix."""
    if not path.is_file():
        return  # the library's "file not found" line
    if kind == "image" and not _is_image(path):
        if _is_video(path):
            raise ConfigError(f"--image {path}: this file is a video, not an image; use --video {path}")
        raise ConfigError(f"--image {path}: not a readable image (PIL cannot identify it)")
    if kind == "video" and _is_image(path):
        raise ConfigError(f"--video {path}: this file is an image, not a video; use --image {path}")
    if kind == "video" and not _is_video(path):
        raise ConfigError(f"--video {path}: not a readable video (no frame decodes)")


def _cache_dir(cache_dir: Path | None, no_cache: bool) -> Path | None:
    from uniperceiver.evaluation.target_cache import default_cache_dir

    if no_cache:
        return None
    return cache_dir if cache_dir is not None else default_cache_dir()


# ------------------------------------------------------------------------------------------ commands

_CHECKPOINT_ZS = "Model directory or run folder (default: the newest pre-training run under ./runs)."


def zeroshot(
    task: str = typer.Option(..., "--task", "-t", help=_TASK_HELP),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help=_CHECKPOINT_ZS),
    split: Optional[str] = typer.Option(
        None, "--split", help="Split to evaluate (default: the task's evaluation split, usually val)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate only the first N samples."),
    json_file: Optional[Path] = typer.Option(None, "--json", help=_JSON_HELP),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Prepared-data folder (default: $UPCTL_DATA, else ./data)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Evaluation batch size (default: the task's)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Task option key=value, repeatable (e.g. beam_size=1)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Custom tasks: how many ranked candidates to report."),
    workers: int = typer.Option(0, "--workers", help="DataLoader workers decoding media (0: the main process)."),
    cache_dir: Optional[Path] = typer.Option(
        None, "--cache-dir", help="Target-feature cache (default: $UPCTL_CACHE, else ~/.cache/upctl/targets)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the on-disk target cache."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Evaluate a pre-trained checkpoint on a task it was not tuned for (zero-shot).

    A bare dataset name selects its default task (vqa -> vqav2, msvd -> msvd-caption). A YAML file
    defines your own task: inputs (images / videos folder or a texts file), candidates (class names
    or a folder of example images per class), optional labels and top_k.

    Examples:

      upctl zeroshot --task mini-digits

      upctl zeroshot --task imagenet --checkpoint models/base --json imagenet-zs.json

      upctl zeroshot --task msvd --limit 100 --set beam_size=1

      upctl zeroshot --task imagenet --workers 8 --device cuda

      upctl zeroshot --task my-task.yaml --top-k 3

      upctl zeroshot --task mini-digits --limit 20 --json - | python -m json.tool
    """
    with fail_on_error():
        from uniperceiver.config.loading import parse_overrides
        from uniperceiver.tasks.custom import is_custom_task_file

        options = parse_overrides(set_, "--set")
        if top_k is not None:
            if not is_custom_task_file(task):
                raise ConfigError(f"--top-k applies to a custom task file (my-task.yaml), not to catalog task {task!r}")
            options["top_k"] = top_k
        _run("zeroshot", task, checkpoint, json_file, split=split, limit=limit, batch_size=batch_size,
             options=options, data_dir=data_dir, device=device, cache_dir=_cache_dir(cache_dir, no_cache),
             num_workers=workers)


def evaluate(
    task: str = typer.Option(..., "--task", "-t", help=_TASK_HELP),
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", "-c", help="The tuned model directory or run folder (default: the newest prompt-tuning "
        "or fine-tuning run of the task under ./runs)."),
    split: Optional[str] = typer.Option(None, "--split", help="Split to evaluate (default: the task's evaluation split)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate only the first N samples."),
    json_file: Optional[Path] = typer.Option(None, "--json", help=_JSON_HELP),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Prepared-data folder (default: $UPCTL_DATA, else ./data)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Evaluation batch size (default: the task's)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Task option key=value, repeatable."),
    workers: int = typer.Option(0, "--workers", help="DataLoader workers decoding media (0: the main process)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Target-feature cache folder."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the on-disk target cache."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Evaluate a prompt-tuned or fine-tuned checkpoint on its task.

    Without --checkpoint the newest prompt-tuning or fine-tuning run of the task under ./runs is
    used (and named). A checkpoint whose run was tuned on another task gets a warning naming both.

    Examples:

      upctl evaluate --task mini-faces

      upctl evaluate --task mini-digits --checkpoint runs/prompt-tune-mini-digits-20250101-120000

      upctl evaluate --task coco-caption --checkpoint models/coco-ft --split test --json coco.json
    """
    with fail_on_error():
        from uniperceiver.config.loading import parse_overrides

        _run("evaluate", task, checkpoint, json_file, split=split, limit=limit, batch_size=batch_size,
             options=parse_overrides(set_, "--set"), data_dir=data_dir, device=device,
             cache_dir=_cache_dir(cache_dir, no_cache), tuned=True, num_workers=workers)


def predict(
    targets: str = typer.Option(..., "--targets", help='Comma-separated candidates, e.g. "cat,dog,car".'),
    image: Optional[Path] = typer.Option(None, "--image", help="An image file."),
    video: Optional[Path] = typer.Option(None, "--video", help="A video file."),
    text: Optional[str] = typer.Option(None, "--text", help="A text to classify."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help=_CHECKPOINT_ZS),
    top_k: int = typer.Option(5, "--top-k", help="How many ranked candidates to show."),
    template: Optional[str] = typer.Option(None, "--template", help='Candidate template with {}, e.g. "a photo of a {}".'),
    frames: int = typer.Option(8, "--frames", help="Frames sampled from a video."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Write the ranking to this JSON file ('-': standard output)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Rank candidate labels for one image, video or text (zero-shot).

    Examples:

      upctl predict --image cat.jpg --targets "cat,dog,car"

      upctl predict --video clip.mp4 --targets "cooking,dancing,surfing" --top-k 2

      upctl predict --text "a wonderful film" --targets "positive review,negative review"
    """
    with fail_on_error():
        given = [(k, v) for k, v in (("image", image), ("video", video), ("text", text)) if v is not None]
        if len(given) != 1:
            raise ConfigError("predict: give exactly one of --image, --video or --text")
        if frames < 1:
            raise ConfigError(f"--frames must be positive, got {frames}")
        kind, value = given[0]
        if isinstance(value, Path):
            _check_media_kind(kind, value)  # before the model code loads: a wrong file fails in a moment
        from uniperceiver.evaluation.api import evaluate_checkpoint
        from uniperceiver.tasks.custom import single_input_spec

        spec = single_input_spec(kind, value, targets.split(","), top_k=top_k, frames=frames, template=template)
        out = report_console(json_file)
        result = evaluate_checkpoint(checkpoint, spec, split="val", device=device, notify=_notify)
        _print_ranked(out, result.predictions)
        if json_file is not None:
            _write_record(out, "predict", json_file, result, {"input": {kind: str(value)}, "template": template})
