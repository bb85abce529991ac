"""`upctl zeroshot`, `upctl evaluate`, `upctl predict`: score a checkpoint on a task or on your own files.

All three run `uniperceiver.evaluation.harness.evaluate_task`; this module only resolves names,
loads the model, renders rich tables and writes the `--json` record (metrics, checkpoint, task,
split, sample counts, skipped media, time, versions and the predictions, with tensors in a sibling
`.safetensors` file, so every number can be recomputed from the file).
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from uniperceiver.errors import CheckpointError, ConfigError
from upctl.common import console, err_console, fail_on_error, progress_callback, write_json

_TASK_HELP = "Catalog task (e.g. mini-digits, imagenet, msvd, vqa) or a custom task YAML file (my-task.yaml)."


# ------------------------------------------------------------------------------------------ helpers


def _parse_sets(pairs: list[str] | None) -> dict[str, Any]:
    """`--set key=value` task options; values are YAML-parsed (`beam_size=1`, `views=[1,1]`)."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected key=value (e.g. --set beam_size=1)")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"--set {pair!r}: the value is not valid YAML") from None
    return out


def _pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    return device


def _resolve_checkpoint(checkpoint: Path | None, required: bool) -> tuple[Path, bool]:
    """(model directory, defaulted): a model dir, a run dir (its final weights) or the newest pre-training run."""
    from uniperceiver.engine import runs

    if checkpoint is None:
        if required:
            raise ConfigError("--checkpoint is required: the tuned model directory or run to evaluate")
        return runs.newest_pretrained(), True
    return runs.resolve_model_dir(checkpoint), False


def _load(model_dir: Path, device: str):
    from uniperceiver.modeling.checkpoint import load_model

    model = load_model(model_dir)
    return model.to(device).eval()


def _versions() -> dict[str, str]:
    import torch

    from uniperceiver import __version__

    return {"upctl": __version__, "torch": torch.__version__, "python": platform.python_version()}


def _target_cache(cache_dir: Path | None, no_cache: bool):
    from uniperceiver.evaluation.target_cache import TargetCache, default_cache_dir

    if no_cache:
        return TargetCache(None)
    return TargetCache(cache_dir if cache_dir is not None else default_cache_dir())


def _check_head_fits(model, task) -> None:
    """A tuned classification head must have one row per candidate of the task."""
    n_head = getattr(model.cfg, "cls_head_classes", 0)
    ts = task.target_set()
    if n_head and ts is not None and n_head != len(ts):
        raise CheckpointError(
            f"the checkpoint's classification head has {n_head} classes but task {task.cfg.name!r} has {len(ts)} "
            "candidates: evaluate it on the task it was tuned on"
        )


def _fmt(key: str, value: float) -> str:
    if key in ("inputs", "labelled"):
        return f"{int(value):,}"
    if abs(value) < 1e-9:  # BLEU of an empty overlap is 1e-15, not a number worth digits
        return "0.00"
    return f"{value:.2f}" if abs(value) >= 0.01 else f"{value:.4g}"


def _print_metrics(result, title: str, checkpoint: Path) -> None:
    console.print(f"[bold]{title}[/]  checkpoint: {checkpoint}", highlight=False)
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.metrics.items():
        table.add_row(key, _fmt(key, value))
    console.print(table)
    skipped = ", ".join(f"{k}: {v}" for k, v in result.skipped.items())
    console.print(
        f"{result.num_samples:,} of {result.requested:,} sample(s) scored"
        + (f"; skipped {sum(result.skipped.values()):,} ({skipped})" if skipped else "")
        + f"; {result.seconds:.1f} s",
        highlight=False,
    )


def _print_ranked(predictions: list[dict], limit: int = 50) -> None:
    table = Table(title="ranked candidates", title_justify="left")
    table.add_column("input", overflow="fold")
    table.add_column("top candidates (cosine, probability)", overflow="fold")
    table.add_column("label")
    for pred in predictions[:limit]:
        ranked = "; ".join(f"{r['candidate']} ({r['score']:.3f}, {r['prob']:.2f})" for r in pred["ranked"])
        label = pred.get("label")
        mark = "" if label is None else (" ✓" if pred.get("correct") else " ✗")
        table.add_row(str(pred["input"]), ranked, "" if label is None else f"{label}{mark}")
    console.print(table)
    if len(predictions) > limit:
        console.print(f"... {len(predictions) - limit} more in the --json file", highlight=False)


def _write_record(json_file: Path, record: dict[str, Any], predictions: list[dict]) -> Path | None:
    """Write the JSON record; tensors in predictions go to `<json stem>.safetensors` beside it."""
    from safetensors.torch import save as st_save

    from uniperceiver.evaluation.harness import split_predictions
    from uniperceiver.utils.io import atomic_write

    rows, tensors = split_predictions(predictions)
    tensor_file = None
    if tensors:
        tensor_file = json_file.with_suffix(".safetensors")
        data = st_save(tensors)
        atomic_write(tensor_file, lambda fh: fh.write(data))
        record["tensors_file"] = tensor_file.name
    record["predictions"] = rows
    write_json(json_file, record)
    return tensor_file


def _record(command: str, result, checkpoint: Path, defaulted: bool, extra: dict[str, Any]) -> dict[str, Any]:
    record = {
        "command": command,
        "task": result.task,
        "split": result.split,
        "checkpoint": str(Path(checkpoint).absolute()),
        "checkpoint_default": defaulted,
        "metrics": result.metrics,
        "num_samples": result.num_samples,
        "requested": result.requested,
        "skipped": result.skipped,
        "seconds": round(result.seconds, 3),
        "versions": _versions(),
        "tensors_file": None,
    }
    record.update(extra)
    return record


# ------------------------------------------------------------------------------------------ core


def run_evaluation(
    command: str,
    task_name: str,
    checkpoint: Path | None,
    *,
    required_checkpoint: bool,
    split: str | None,
    limit: int | None,
    json_file: Path | None,
    data_dir: Path | None,
    batch_size: int | None,
    sets: list[str] | None,
    top_k: int | None,
    cache_dir: Path | None,
    no_cache: bool,
    device: str,
) -> None:
    """Shared body of `zeroshot` and `evaluate` (errors propagate to `fail_on_error`)."""
    from uniperceiver.evaluation.custom_task import build_custom_task, is_custom_task_file, load_custom_spec
    from uniperceiver.evaluation.harness import evaluate_task
    from uniperceiver.evaluation.target_cache import model_key_for
    from uniperceiver.modeling.checkpoint import read_config
    from uniperceiver.tokenizers.text import get_tokenizer

    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be a positive number of samples, got {limit}")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}")
    options = _parse_sets(sets)
    custom = is_custom_task_file(task_name)
    spec = None
    if custom:
        if options:
            raise ConfigError("--set applies to catalog tasks; put options of a custom task in its YAML file")
        spec = load_custom_spec(task_name)  # validate the file before loading any weights
        if top_k is not None:
            if top_k < 1:
                raise ConfigError(f"--top-k must be positive, got {top_k}")
            spec.top_k = min(top_k, len(spec.classes))
    else:
        from uniperceiver.tasks.catalog import resolve_task

        resolved = resolve_task(task_name)  # a clear error for unknown names before loading weights

    model_dir, defaulted = _resolve_checkpoint(checkpoint, required_checkpoint)
    if defaulted:
        err_console.print(f"using the newest pre-training checkpoint: [bold]{model_dir}[/]", highlight=False)
    model_cfg = read_config(model_dir)  # cheap: build the task (and find missing data) before the weights load
    tokenizer = get_tokenizer()
    if custom:
        assert spec is not None
        task = build_custom_task(spec, tokenizer, model_cfg)
        eval_split = "val"
        extra: dict[str, Any] = {"custom_task": str(Path(task_name).absolute()), "candidates": list(spec.classes),
                                 "top_k": spec.top_k}
    else:
        from uniperceiver.tasks.catalog import build_task, task_config

        cfg = task_config(resolved.name, **({"options": options} if options else {}))
        task = build_task(cfg, data_dir, model_cfg, tokenizer)
        eval_split = split or cfg.eval_split
        extra = {"task_requested": task_name, "dataset": cfg.dataset, "family": cfg.family, "options": cfg.options}
    model = _load(model_dir, _pick_device(device))
    if command == "evaluate":
        _check_head_fits(model, task)
    ts = task.target_set()
    if ts is not None and not ts.name.startswith("vocab"):  # class names / answers: predictions index them
        extra["target_labels"] = list(ts.labels)
    cache = _target_cache(cache_dir, no_cache)
    with progress_callback(f"{command} {task.cfg.name}") as progress:
        result = evaluate_task(
            model, task, split=eval_split, limit=limit, batch_size=batch_size, progress=progress,
            target_cache=cache, model_key=model_key_for(model, model_dir),
        )
    _print_metrics(result, f"{command} {result.task} ({result.split})", model_dir)
    if custom:
        _print_ranked(result.predictions)
        skipped_candidates = getattr(task, "candidate_skipped", {})
        if skipped_candidates:
            extra["candidate_skipped"] = skipped_candidates
            console.print(f"unreadable candidate example images skipped: {skipped_candidates}", highlight=False)
    if json_file is not None:
        extra["limit"] = limit
        extra["target_cache"] = {"dir": None if cache.dir is None else str(cache.dir), "hits": cache.hits,
                                 "disk_hits": cache.disk_hits, "misses": cache.misses}
        tensor_file = _write_record(json_file, _record(command, result, model_dir, defaulted, extra), result.predictions)
        console.print(f"wrote {json_file}" + (f" and {tensor_file}" if tensor_file else ""), highlight=False)


# ------------------------------------------------------------------------------------------ commands

_CHECKPOINT_ZS = "Model directory or run folder (default: the newest pre-training run under ./runs)."


def zeroshot(
    task: str = typer.Option(..., "--task", "-t", help=_TASK_HELP),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help=_CHECKPOINT_ZS),
    split: Optional[str] = typer.Option(
        None, "--split", help="Split to evaluate (default: the task's evaluation split, usually val)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate only the first N samples."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Write metrics and predictions to this JSON file."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Prepared-data folder (default: $UPCTL_DATA, else ./data)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Evaluation batch size (default: the task's)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Task option key=value, repeatable (e.g. beam_size=1)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Custom tasks: how many ranked candidates to report."),
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

      upctl zeroshot --task my-task.yaml --top-k 3
    """
    with fail_on_error():
        run_evaluation(
            "zeroshot", task, checkpoint, required_checkpoint=False, split=split, limit=limit, json_file=json_file,
            data_dir=data_dir, batch_size=batch_size, sets=set_, top_k=top_k, cache_dir=cache_dir,
            no_cache=no_cache, device=device,
        )


def evaluate(
    task: str = typer.Option(..., "--task", "-t", help=_TASK_HELP),
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="The tuned model directory or run folder."),
    split: Optional[str] = typer.Option(None, "--split", help="Split to evaluate (default: the task's evaluation split)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate only the first N samples."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Write metrics and predictions to this JSON file."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Prepared-data folder (default: $UPCTL_DATA, else ./data)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Evaluation batch size (default: the task's)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Task option key=value, repeatable."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Target-feature cache folder."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the on-disk target cache."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Evaluate a prompt-tuned or fine-tuned checkpoint on its task.

    Examples:

      upctl evaluate --task mini-digits --checkpoint runs/prompt_tune-mini-digits-20250101-120000

      upctl evaluate --task coco-caption --checkpoint models/coco-ft --split test --json coco.json
    """
    with fail_on_error():
        run_evaluation(
            "evaluate", task, checkpoint, required_checkpoint=True, split=split, limit=limit, json_file=json_file,
            data_dir=data_dir, batch_size=batch_size, sets=set_, top_k=None, cache_dir=cache_dir,
            no_cache=no_cache, device=device,
        )


def predict(
    targets: str = typer.Option(..., "--targets", help='Comma-separated candidates, e.g. "cat,dog,car".'),
    image: Optional[Path] = typer.Option(None, "--image", help="An image file."),
    video: Optional[Path] = typer.Option(None, "--video", help="A video file."),
    text: Optional[str] = typer.Option(None, "--text", help="A text to classify."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help=_CHECKPOINT_ZS),
    top_k: int = typer.Option(5, "--top-k", help="How many ranked candidates to show."),
    template: Optional[str] = typer.Option(None, "--template", help='Candidate template with {}, e.g. "a photo of a {}".'),
    frames: int = typer.Option(8, "--frames", help="Frames sampled from a video."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Write the ranking to this JSON file."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Rank candidate labels for one image, video or text (zero-shot).

    Examples:

      upctl predict --image cat.jpg --targets "cat,dog,car"

      upctl predict --video clip.mp4 --targets "cooking,dancing,surfing" --top-k 2

      upctl predict --text "a wonderful film" --targets "positive review,negative review"
    """
    with fail_on_error():
        from uniperceiver.evaluation.custom_task import build_custom_task, single_input_spec
        from uniperceiver.evaluation.harness import evaluate_task
        from uniperceiver.tokenizers.text import get_tokenizer

        given = [(k, v) for k, v in (("image", image), ("video", video), ("text", text)) if v is not None]
        if len(given) != 1:
            raise ConfigError("predict: give exactly one of --image, --video or --text")
        if frames < 1:
            raise ConfigError(f"--frames must be positive, got {frames}")
        kind, value = given[0]
        spec = single_input_spec(kind, value, targets.split(","), top_k=top_k, frames=frames, template=template)
        model_dir, defaulted = _resolve_checkpoint(checkpoint, required=False)
        if defaulted:
            err_console.print(f"using the newest pre-training checkpoint: [bold]{model_dir}[/]", highlight=False)
        model = _load(model_dir, _pick_device(device))
        task = build_custom_task(spec, get_tokenizer(), model.cfg)
        result = evaluate_task(model, task, split="val")
        _print_ranked(result.predictions)
        if json_file is not None:
            record = _record("predict", result, model_dir, defaulted,
                             {"input": {kind: str(value)}, "candidates": list(spec.classes), "top_k": spec.top_k,
                              "template": template})
            _write_record(json_file, record, result.predictions)
            console.print(f"wrote {json_file}", highlight=False)
