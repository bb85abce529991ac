"""`upctl pretrain`, `upctl prompt-tune`, `upctl finetune`: one trainer, three ways to start it.

This module resolves names and defaults (recipe files, per-task recipes, the checkpoint to start
from), renders progress and the engine's log lines (periodic evaluation included) with rich and
turns the library's result into exit codes: 0 when the run finished, 143 when SIGTERM stopped it
after saving a checkpoint, 1 on bad input (one line), 124 when the step watchdog ended a hung rank
(engine/watchdog.py prints its line). Under torchrun only rank 0 prints; the other ranks speak
only to fail (a dead peer is one line per rank, not a backend traceback). The library is imported inside the command bodies, so `upctl --help`
never loads torch.
"""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from upctl.common import console, err_console, fail_on_error

if TYPE_CHECKING:
    from uniperceiver.config.schema import Recipe

_SET_HELP = "Override a recipe key, e.g. --set optim.lr=5e-4 --set tasks.mini-digits.batch_size=8 (repeatable)."
_RESUME_HELP = ("'auto' (newest valid checkpoint of --output, or of the newest run of this recipe; refused when "
                "checkpoints exist but all are damaged), 'never' (start over; old checkpoints are moved aside) or a "
                "checkpoint path.")


class _Progress:
    """A rich progress bar on a terminal; a plain line every `every` steps otherwise (logs, CI)."""

    def __init__(self, every: int) -> None:
        self.every = max(1, every)
        self.bar: Any = None
        self.task: Any = None
        self._live = sys.stderr.isatty()

    def __enter__(self) -> "_Progress":
        if self._live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[speed]} samples/s  "
                           "eta {task.fields[eta]}"),
                TimeElapsedColumn(), console=err_console,
            )
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def __call__(self, report: Any) -> None:
        eta = "?" if report.eta_s is None else time.strftime("%H:%M:%S", time.gmtime(max(0.0, report.eta_s)))
        fields = dict(loss=f"{report.loss:.4f}", lr=f"{report.lr:.2e}", speed=f"{report.samples_per_s:.1f}", eta=eta)
        if self.bar is not None:
            if self.task is None:
                self.task = self.bar.add_task("training", total=report.total, **fields)
            self.bar.update(self.task, completed=report.step, total=report.total, **fields)
        elif report.step % self.every == 0 or report.step == report.total:
            err_console.print(
                f"step {report.step}/{report.total}  {report.task}  loss {fields['loss']}  lr {fields['lr']}  "
                f"{fields['speed']} samples/s  eta {eta}", highlight=False, soft_wrap=True,
            )

    def log(self, message: str) -> None:
        (self.bar.console if self.bar is not None else err_console).print(message, highlight=False, soft_wrap=True)


def _is_main() -> bool:
    """Rank 0 of a torchrun job (or a single process): the one process that prints."""
    from uniperceiver.engine.distributed import launch_rank

    return launch_rank() == 0


def _run(recipe: Recipe, *, what: str, output: Path | None, resume: str | None, max_steps: int | None,
         data_dir: Path | None, device: str | None) -> None:
    from uniperceiver.engine.run_setup import preflight
    from uniperceiver.engine.train_checkpoint import resolve_checkpoint_path
    from uniperceiver.engine.trainer import train

    preflight(recipe, data_dir)  # bad input fails here, before anything is printed or created
    if resume is not None and resume not in ("auto", "never"):
        resolve_checkpoint_path(resume)
    main = _is_main()
    steps = max_steps if max_steps is not None else recipe.train.max_steps
    where = str(output) if output is not None else "a new folder under ./runs"
    if main:
        console.print(f"{what}: recipe {recipe.name!r}, {len(recipe.tasks)} task(s), {steps} steps -> {where}",
                      highlight=False, soft_wrap=True)
    # The engine calls progress and log on rank 0 only; other ranks draw no bar either.
    with _Progress(recipe.train.log_every) if main else nullcontext() as bar:
        result = train(recipe, output=output, resume=resume, data_dir=data_dir, max_steps=max_steps,
                       progress=bar, log=bar.log if bar is not None else None, device=device)
    if not main:
        if result.interrupted:
            raise typer.Exit(143)
        return
    if result.tuning is not None and recipe.tune.mode == "prompt":
        console.print(f"trainable: {result.tuning.describe()}", highlight=False, soft_wrap=True)
    skipped = sum(n for per in result.skipped_media.values() for n in per.values())
    per_task = "; ".join(
        f"{task}: " + ", ".join(f"{kind}: {n}" for kind, n in sorted(per.items()))
        for task, per in sorted(result.skipped_media.items()) if per
    )
    extra = f"; skipped {skipped} unreadable sample(s) ({per_task})" if skipped else ""
    extra += f"; skipped {result.skipped_steps} non-finite step(s)" if result.skipped_steps else ""
    extra += (f"; re-read {result.loader_restarts} batch(es) after loader worker deaths"
              if result.loader_restarts else "")
    if result.interrupted:
        console.print(f"stopped by SIGTERM at step {result.step}; checkpoint {result.last_checkpoint}; "
                      f"continue with --resume auto --output {result.run_dir}{extra}", highlight=False, soft_wrap=True)
        raise typer.Exit(143)
    console.print(f"done: step {result.step}/{result.max_steps} in {result.seconds:.1f} s; weights {result.final_dir}; "
                  f"run {result.run_dir}{extra}", highlight=False, soft_wrap=True)


def _with_checkpoint(recipe: Recipe, checkpoint: Path | None) -> None:
    from uniperceiver.engine import runs

    if checkpoint is not None:
        recipe.model.checkpoint = str(runs.resolve_model_dir(checkpoint))
    elif not recipe.model.checkpoint:
        found = runs.newest_pretrained()
        if _is_main():
            console.print(f"--checkpoint not given: using the newest pre-training run's weights {found}",
                          highlight=False, soft_wrap=True)
        recipe.model.checkpoint = str(found)


def pretrain(
    recipe: Path = typer.Argument(..., help="Recipe YAML (e.g. recipes/tiny.yaml); `upctl recipes` lists them."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=_SET_HELP),
    output: Optional[Path] = typer.Option(None, "--output", help="Run folder (default runs/pretrain-<recipe>-<time>/)."),
    resume: Optional[str] = typer.Option(None, "--resume", help=_RESUME_HELP),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after N optimizer steps (overrides train.max_steps)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Prepared datasets (default $UPCTL_DATA, else ./data)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: CUDA when available)."),
) -> None:
    """Pre-train a model on a mixture of tasks from a recipe.

    Examples:

      upctl pretrain recipes/tiny.yaml

      upctl pretrain recipes/mini/pretrain.yaml --set optim.lr=5e-4 --max-steps 200

      upctl pretrain recipes/tiny.yaml --output runs/my-run --resume auto

      torchrun --nproc_per_node 8 $(which upctl) pretrain recipes/base.yaml
    """
    with fail_on_error():
        from uniperceiver.config import load_recipe

        rec = load_recipe(recipe, list(set_ or []))
        _run(rec, what="pre-training", output=output, resume=resume, max_steps=max_steps, data_dir=data_dir, device=device)


def _task_recipe(task: str, stage: str, fraction: float | None, seed: int | None, sets: list[str] | None,
                 data_dir: Path | None = None) -> Any:
    from uniperceiver.config import recipe_for_task

    pre: list[str] = []
    if fraction is not None:
        pre.append(f"tune.fraction={fraction}")
    if seed is not None:
        pre += [f"tune.fraction_seed={seed}", f"train.seed={seed}"]
    return recipe_for_task(task, stage, pre + list(sets or []), data_dir=data_dir)


def prompt_tune(
    task: str = typer.Option(..., "--task", help="Catalog task (e.g. mini-faces, imagenet, coco-caption) or your prepared dataset; see `upctl tasks`."),
    fraction: Optional[float] = typer.Option(None, "--fraction", help="Seeded few-shot share of the training split (paper: 0.01; default: the recipe's)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Model folder or run (default: the newest pre-training run under ./runs)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the few-shot subset and of training."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=_SET_HELP),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after N optimizer steps."),
    output: Optional[Path] = typer.Option(None, "--output", help="Run folder (default runs/prompt-tune-<task>-<time>/)."),
    resume: Optional[str] = typer.Option(None, "--resume", help=_RESUME_HELP),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Prepared datasets (default $UPCTL_DATA, else ./data)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or cuda:N."),
) -> None:
    """Prompt-tune a pre-trained model on a few-shot share of one task.

    Trains only the LayerNorms, 10 deep prompt tokens per layer and the SPE bias (and the classification prompt head where the task's recipe asks for one); prints how many parameters that is.

    Examples:

      upctl prompt-tune --task mini-faces --fraction 0.1

      upctl prompt-tune --task imagenet --fraction 0.01 --checkpoint models/uni-perceiver-base

      upctl prompt-tune --task coco-caption --seed 1 --set optim.lr=5e-4
    """
    with fail_on_error():
        rec = _task_recipe(task, "prompt_tune", fraction, seed, set_, data_dir)
        _with_checkpoint(rec, checkpoint)
        share = f"{rec.tune.fraction:g} of" if rec.tune.fraction else "all of"
        _run(rec, what=f"prompt tuning on {share} {rec.tasks[0].name} from {rec.model.checkpoint}", output=output,
             resume=resume, max_steps=max_steps, data_dir=data_dir, device=device)


def finetune(
    task: str = typer.Option(..., "--task", help="Catalog task (e.g. mini-faces, imagenet, msvd) or your prepared dataset; see `upctl tasks`."),
    fraction: Optional[float] = typer.Option(None, "--fraction", help="Seeded share of the training split (default: all of it)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Model folder or run (default: the newest pre-training run under ./runs)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the subset and of training."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=_SET_HELP),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after N optimizer steps."),
    output: Optional[Path] = typer.Option(None, "--output", help="Run folder (default runs/finetune-<task>-<time>/)."),
    resume: Optional[str] = typer.Option(None, "--resume", help=_RESUME_HELP),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Prepared datasets (default $UPCTL_DATA, else ./data)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or cuda:N."),
) -> None:
    """Fine-tune every parameter of a pre-trained model on one task.

    Examples:

      upctl finetune --task mini-faces

      upctl finetune --task imagenet --checkpoint runs/pretrain-base-20250101-120000

      upctl finetune --task msvd --fraction 0.1 --set optim.lr=1e-5
    """
    with fail_on_error():
        rec = _task_recipe(task, "finetune", fraction, seed, set_, data_dir)
        _with_checkpoint(rec, checkpoint)
        _run(rec, what=f"fine-tuning {rec.tasks[0].name} from {rec.model.checkpoint}", output=output, resume=resume,
             max_steps=max_steps, data_dir=data_dir, device=device)


__all__ = ["finetune", "pretrain", "prompt_tune"]
