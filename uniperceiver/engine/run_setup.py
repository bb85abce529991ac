"""Everything a run needs before its first step: the run folder, the checkpoint to resume, the
model (fresh, or from a checkpoint with the tuning parameters added), the tasks and their data.

Kept apart from the loop so that bad input (unknown task, missing dataset, a checkpoint of another
size, a run folder that already holds checkpoints) fails in the first second with one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from uniperceiver.config.schema import Recipe
from uniperceiver.engine import runs
from uniperceiver.engine import train_checkpoint as ckpt
from uniperceiver.engine.distributed import DistEnv
from uniperceiver.engine.shared_hashing import SharedHasher, serve_hashing
from uniperceiver.engine.tuning import load_for_tuning, tuning_overrides
from uniperceiver.errors import CheckpointError, ConfigError, DataError
from uniperceiver.evaluation.checkpoints import HashFiles
from uniperceiver.modeling.model import UniPerceiver, build_model
from uniperceiver.modeling.model_config import ModelConfig
from uniperceiver.modeling.model_dir import read_config
from uniperceiver.tasks.base import Task

Log = Callable[[str], None]


def run_label(recipe: Recipe) -> str:
    """`<task>` for single-task runs (prompt-tune / finetune), else the recipe name."""
    tasks = list(recipe.tasks)
    return tasks[0].name if len(tasks) == 1 else str(recipe.name)


def _broadcast(values: list[Any], env: DistEnv) -> list[Any]:
    """Rank 0's decision (paths) for every rank; run names hold a timestamp, so never recompute."""
    if not env.distributed:
        return values
    import torch.distributed as dist

    box = list(values)
    dist.broadcast_object_list(box, src=0)
    return box


def prepare_run_dir(
    recipe: Recipe,
    output: str | Path | None,
    runs_root: str | Path | None,
    resume: str | Path | None,
    env: DistEnv,
    say: Log,
    want_checkpoint: bool = True,
) -> tuple[Path, Path | None]:
    """Decide (on rank 0) the run folder and the checkpoint to start from; write recipe.yaml.

    resume None: a new run (an `output` that already holds checkpoints is an error, so two runs
    never mix); "auto": the newest valid checkpoint of `output`, else of the newest run of the same
    recipe and stage under `runs_root`, else a fresh start, but never when checkpoints exist and
    none is readable (CheckpointError naming each); "never": a fresh start even in an `output`
    with checkpoints (those are moved aside, not deleted); a path: that checkpoint.
    """
    root = Path(runs_root) if runs_root is not None else runs.default_runs_root()
    run_dir: Path | None = None
    start: Path | None = None
    error: str | None = None
    if env.is_main:
        # the other ranks hash their share of each checkpoint verified on the way (shared_hashing.py)
        hasher = SharedHasher(env) if env.distributed else None
        try:
            run_dir, start = _decide(recipe, output, root, resume, say, want_checkpoint, hasher)
            from uniperceiver.config import save_recipe

            save_recipe(recipe, run_dir / runs.RECIPE_NAME)
            if not runs.read_run_info(run_dir):
                runs.write_run_info(run_dir, {"stage": recipe.stage, "recipe": recipe.name})
        except (ConfigError, CheckpointError, DataError) as exc:
            error = f"{type(exc).__name__}:{exc}"
        finally:
            if hasher is not None:
                hasher.close()
    elif env.distributed:
        serve_hashing(env)
    box = _broadcast([None if run_dir is None else str(run_dir), None if start is None else str(start), error], env)
    if box[2] is not None:
        kind, _, msg = str(box[2]).partition(":")
        raise {"ConfigError": ConfigError, "CheckpointError": CheckpointError}.get(kind, DataError)(msg)
    return Path(box[0]), (Path(box[1]) if box[1] else None)


def _decide(recipe: Recipe, output: str | Path | None, root: Path, resume: str | Path | None, say: Log,
            want_checkpoint: bool, hasher: HashFiles | None = None) -> tuple[Path, Path | None]:
    if resume is not None and str(resume) == "never":
        return _fresh_start(recipe, output, root, say), None
    if resume is not None and str(resume) not in ("auto",) and want_checkpoint:
        start = ckpt.resolve_checkpoint_path(resume, warn=say, hasher=hasher)
        run_dir = Path(output) if output is not None else _run_of_checkpoint(start)
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir, start
    if output is not None:
        run_dir = Path(output)
        ckpt_root = run_dir / runs.CKPT_DIR
        if resume is None:
            if ckpt.list_checkpoints(ckpt_root):
                raise CheckpointError(
                    f"--output {run_dir} already holds checkpoints; pass --resume auto to continue that run "
                    "or choose another --output"
                )
            run_dir.mkdir(parents=True, exist_ok=True)
            return run_dir, None
        run_dir.mkdir(parents=True, exist_ok=True)
        start = (ckpt.find_valid_checkpoint(ckpt_root, warn=say, refuse_all_damaged=True, hasher=hasher)
                 if want_checkpoint else None)
        if start is None and want_checkpoint:
            say(f"no checkpoint to resume in {run_dir}: starting from scratch")
        return run_dir, start
    if resume is not None:
        for rec in runs.list_runs(root, stage=recipe.stage, recipe=recipe.name):
            if not want_checkpoint:
                return rec.path, None
            found = ckpt.find_valid_checkpoint(rec.path / runs.CKPT_DIR, warn=say, refuse_all_damaged=True,
                                               hasher=hasher)
            if found is not None:
                return rec.path, found
        say(f"no earlier run of recipe {recipe.name!r} with a checkpoint under {root}: starting a new run")
    return runs.new_run_dir(root, recipe.stage, run_label(recipe)), None


def _fresh_start(recipe: Recipe, output: str | Path | None, root: Path, say: Log) -> Path:
    """`--resume never`: a new run; in an `output` that holds checkpoints, those move to
    `checkpoints.discarded-<n>/` first, so nothing is deleted and nothing old is resumed or pruned."""
    if output is None:
        return runs.new_run_dir(root, recipe.stage, run_label(recipe))
    run_dir = Path(output)
    set_checkpoints_aside(run_dir, say)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def set_checkpoints_aside(run_dir: Path, say: Log) -> Path | None:
    """Move `run_dir/checkpoints/` (when it holds anything) to `checkpoints.discarded-<n>/`; returns where.

    `--resume never` calls it for the run folder and, in a multi-stage run, for every stage folder, so
    no old checkpoint is resumed, pruned or mixed with the new run's.
    """
    ckpt_root = Path(run_dir) / runs.CKPT_DIR
    if not (ckpt_root.is_dir() and any(ckpt_root.iterdir())):
        return None
    n = 1
    while (ckpt_root.parent / f"{runs.CKPT_DIR}.discarded-{n}").exists():
        n += 1
    aside = ckpt_root.parent / f"{runs.CKPT_DIR}.discarded-{n}"
    ckpt_root.rename(aside)
    say(f"--resume never: starting from scratch; the old checkpoints were moved to {aside}")
    return aside


def _run_of_checkpoint(step_dir: Path) -> Path:
    parent = step_dir.parent
    return parent.parent if parent.name == runs.CKPT_DIR else parent


def preflight(recipe: Recipe, data_dir: str | Path | None) -> None:
    """Cheap checks of everything a run needs, before any folder is created (one clear line each)."""
    from uniperceiver.data.format import resolve_data_dir
    from uniperceiver.tasks.catalog import family_class, prepare_name

    base = resolve_data_dir(data_dir if data_dir is not None else recipe.data_dir)
    missing: dict[str, str] = {}  # dataset -> the first task that needs it
    for cfg in recipe.tasks:
        family_class(cfg.family)
        if not (base / cfg.dataset / "meta.json").is_file():
            missing.setdefault(cfg.dataset, cfg.name)
    # Every missing dataset at once: naming only the first made a 16-dataset recipe take 16 tries.
    commands = ", ".join(dict.fromkeys(f"`upctl prepare {prepare_name(d)}`" for d in missing))
    if len(missing) == 1:
        ((dataset, task),) = missing.items()
        raise DataError(f"task {task!r} needs the dataset {dataset!r}, which is not prepared under {base}: "
                        f"run {commands} first")
    if missing:
        raise DataError(f"recipe {recipe.name!r} needs {len(missing)} datasets that are not prepared under {base} "
                        f"({', '.join(missing)}): run {commands} first")
    if recipe.model.checkpoint:
        _checked_checkpoint(recipe)


def _checked_checkpoint(recipe: Recipe) -> Path:
    m = recipe.model
    path = runs.resolve_model_dir(m.checkpoint)
    saved = read_config(path)
    if recipe.stage == "pretrain" and saved.size not in ("custom", m.size):
        raise CheckpointError(
            f"model.checkpoint {path} is a {saved.size!r} model (width {saved.width}, depth {saved.depth}) "
            f"but the recipe asks for model.size={m.size!r}; set model.size={saved.size} or pick another checkpoint"
        )
    return path


def build_training_model(recipe: Recipe) -> UniPerceiver:
    """A fresh model of `model.size` (+ overrides), or `model.checkpoint`'s weights with the tuning
    parameters of `tune.mode` added. Checks that a checkpoint fits the recipe's size."""
    m = recipe.model
    overrides = dict(m.overrides or {})
    if m.checkpoint:
        return load_for_tuning(_checked_checkpoint(recipe), recipe.tune, overrides)
    return build_model(m.size, **tuning_overrides(recipe.tune, overrides))


def build_training_tasks(
    recipe: Recipe, model_cfg: ModelConfig, data_dir: str | Path | None, env: DistEnv
) -> tuple[list[Task], list[list[dict]]]:
    """Build every task (opening its prepared dataset) and its training samples.

    With `tune.fraction` the samples are the seeded few-shot subset of `uniperceiver/data/fewshot.py`
    (saved beside the dataset, identical on every run and rank).
    """
    from uniperceiver.tasks.catalog import build_task
    from uniperceiver.tokenizers.text import get_tokenizer

    tok = get_tokenizer()
    base = data_dir if data_dir is not None else recipe.data_dir
    gather = recipe.train.gather_features
    if gather is None:  # reference: cross-rank feature gathering only when one task is trained alone
        gather = len(recipe.tasks) == 1 and env.distributed
    tasks: list[Task] = []
    examples: list[list[dict]] = []
    for cfg in recipe.tasks:
        task = build_task(cfg, base, model_cfg, tok)
        task.set_feature_gathering(bool(gather and env.distributed))  # a task's own option wins
        rows = training_examples(task, cfg.split, recipe.tune.fraction, recipe.tune.fraction_seed)
        if not rows:
            raise DataError(f"task {cfg.name!r}: split {cfg.split!r} of dataset {cfg.dataset!r} has no samples")
        tasks.append(task)
        examples.append(rows)
    return tasks, examples


def training_examples(task: Task, split: str, fraction: float | None, seed: int) -> list[dict]:
    """All samples of `split`, or the few-shot subset (matched by sample id after the family's expansion)."""
    rows = task.examples(split)
    if fraction is None:
        return rows
    from uniperceiver.data.fewshot import fraction_subset

    subset = fraction_subset(task.dataset, split, float(fraction), int(seed))
    keep = {str(s["id"]) for s in subset}
    picked = [r for r in rows if _source_id(r) in keep]
    if not picked:
        raise DataError(
            f"task {task.cfg.name!r}: the few-shot subset of {task.dataset.name!r}/{split} "
            f"({len(subset)} samples) matches none of the task's training rows"
        )
    return picked


def _source_id(row: dict) -> str:
    """The manifest id a (possibly expanded) training row came from."""
    for key in ("source_id", "sample_id"):
        if key in row:
            return str(row[key])
    return str(row.get("id"))


__all__ = ["build_training_model", "build_training_tasks", "preflight", "prepare_run_dir", "run_label", "training_examples"]
