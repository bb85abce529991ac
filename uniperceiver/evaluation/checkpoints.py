"""Finding the weights to evaluate: a model folder, a training step folder, a run folder, or the
newest pre-training run under ./runs.

Why here and not in the engine: evaluation sits below the engine (the trainer calls the harness),
yet `--checkpoint` takes what training writes. Reading that layout needs no training code, only
the folder names, `run.json` and the checksums of a step folder, so the readers live here and
`uniperceiver.engine.runs` / `uniperceiver.engine.train_checkpoint` import them from this module.

    runs/<stage>-<task>-<time>/
        run.json             {"stage": ..., "recipe": ...}
        final/               model folder (config.json + model.safetensors) when the run finished
        stage-N/             sub-runs of a multi-stage recipe (each with final/ or checkpoints/)
        checkpoints/step-NNNNNN/ + latest   verified step folders (meta.json lists every file's sum; a step
                             folder is also a model folder: config.json + the weights in model.dcp/)
"""

from __future__ import annotations

import json
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from uniperceiver.errors import CheckpointError
from uniperceiver.modeling.model_dir import (
    CONFIG_NAME,
    MODEL_DCP,
    WEIGHTS_NAME,
    has_weights,
)
from uniperceiver.tasks.options import TaskConfig
from uniperceiver.utils.digests import LEGACY_DIGEST, file_digest

FINAL_NAME = "final"
CKPT_DIR = "checkpoints"
RUN_INFO = "run.json"
META_NAME = "meta.json"
LATEST_NAME = "latest"
STEP_RE = re.compile(r"^step-(\d+)$")
#: The `format` field of a training step folder's meta.json: v1 holds the weights in model.safetensors
#: and the whole optimizer state in optimizer.pt; v2 the optimizer's tensors in the DCP folder
#: SHARDED_DIR; v3 (written today) also the weights in the DCP folder MODEL_DCP, every rank writing
#: its own part of both. All three resume.
FORMAT_V1 = "uniperceiver-train-checkpoint-v1"
FORMAT_V2 = "uniperceiver-train-checkpoint-v2"
FORMAT = "uniperceiver-train-checkpoint-v3"
SHARDED_DIR = "optim.dcp"
#: The DCP folders a step folder may hold (their files are listed in meta.json as "<folder>/<file>").
DCP_FOLDERS = (MODEL_DCP, SHARDED_DIR)
_SMALL = ("optimizer.pt", "scheduler.pt", "trainer.pt")
#: The files every step folder's meta.json must list, per format.
REQUIRED_FILES = {
    FORMAT_V1: (WEIGHTS_NAME, CONFIG_NAME, *_SMALL),
    FORMAT_V2: (WEIGHTS_NAME, CONFIG_NAME, *_SMALL, f"{SHARDED_DIR}/.metadata"),
    FORMAT: (CONFIG_NAME, *_SMALL, f"{MODEL_DCP}/.metadata", f"{SHARDED_DIR}/.metadata"),
}

Warn = Callable[[str], None]


def default_runs_root() -> Path:
    """`./runs` (absolute): the DESIGN's default place for runs."""
    return Path("runs").absolute()


def is_model_dir(path: Path) -> bool:
    """A folder `load_model` can read: config.json beside model.safetensors or the DCP weights folder."""
    return (path / CONFIG_NAME).is_file() and has_weights(path)


def read_run_info(run_dir: Path) -> dict[str, Any]:
    """A run's `run.json` ({} when absent or unreadable: then it is not a run folder)."""
    path = Path(run_dir) / RUN_INFO
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


@dataclass
class RunRecord:
    path: Path
    stage: str
    recipe: str
    mtime: float


def list_runs(root: Path | None = None, stage: str | None = None, recipe: str | None = None) -> list[RunRecord]:
    """Runs under `root` (default ./runs), newest first, optionally of one stage / recipe name."""
    root = Path(root) if root is not None else default_runs_root()
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if not p.is_dir():
            continue
        info = read_run_info(p)
        if not info:
            continue
        if stage is not None and info.get("stage") != stage:
            continue
        if recipe is not None and info.get("recipe") != recipe:
            continue
        out.append(RunRecord(p, str(info.get("stage", "")), str(info.get("recipe", "")), p.stat().st_mtime))
    return sorted(out, key=lambda r: (r.mtime, r.path.name), reverse=True)


# -- training step folders ------------------------------------------------------------------------


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete-looking step folders, newest (highest step) first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_RE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


#: Hashes the named files of a folder with an algorithm: (folder, names, algorithm) -> {name: hex digest}.
#: `hash_files` does it in this process; a distributed resume passes one that shares the files between
#: ranks (engine/shared_hashing.py), so each rank reads a part of a large checkpoint once.
HashFiles = Callable[[Path, list[str], str], dict[str, str]]


def hash_files(folder: Path, names: list[str], algorithm: str) -> dict[str, str]:
    """Every named file hashed, files side by side (hashlib and xxhash release the GIL); a file that
    cannot be read gets "unreadable: <why>" instead of a digest (it then fails the comparison)."""
    def one(name: str) -> str:
        try:
            return file_digest(Path(folder) / name, algorithm)
        except OSError as exc:
            return f"unreadable: {exc.strerror or exc}"

    ordered = sorted(names, key=lambda n: -_size(Path(folder) / n))
    with ThreadPoolExecutor(max(1, min(len(ordered), os.cpu_count() or 1))) as pool:
        return dict(zip(ordered, pool.map(one, ordered)))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def read_checkpoint_meta(path: Path) -> dict[str, Any]:
    """meta.json of a step folder after the checks that need no hashing: a known format, the required
    files listed, every listed name inside the folder and present."""
    path = Path(path)
    meta_path = path / META_NAME
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: no {META_NAME} (an incomplete or foreign checkpoint)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{meta_path}: malformed JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") not in REQUIRED_FILES or not isinstance(meta.get("files"), dict):
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{meta_path}: not a training checkpoint (format {fmt!r}, expected "
                              f"{FORMAT!r}, {FORMAT_V2!r} or {FORMAT_V1!r})")
    for name in REQUIRED_FILES[meta["format"]]:
        if name not in meta["files"]:
            raise CheckpointError(f"{meta_path}: lists no {name}")
    for name in meta["files"]:
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts or len(parts) > 2:
            raise CheckpointError(f"{meta_path}: file name {name!r} points outside the checkpoint folder")
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: missing")
    return meta


def verify_checkpoint(path: Path, hasher: HashFiles | None = None) -> dict[str, Any]:
    """Return meta.json after checking that every listed file exists and matches its recorded sum
    (meta.json's `digest` algorithm; sha256 when it names none, as earlier checkpoints). Every file
    is read once, by `hasher` (default: this process, `hash_files`)."""
    path = Path(path)
    meta = read_checkpoint_meta(path)
    algorithm = meta.get("digest", LEGACY_DIGEST)
    digests = (hasher or hash_files)(path, list(meta["files"]), algorithm)
    for name, digest in meta["files"].items():
        actual = digests.get(name, "not hashed")
        if actual != digest:
            raise CheckpointError(f"{path / name}: {algorithm} checksum {actual[:12]}... does not match meta.json "
                                  f"({str(digest)[:12]}...)")
    return meta


def find_valid_checkpoint(ckpt_root: Path, warn: Warn | None = None, refuse_all_damaged: bool = False,
                          hasher: HashFiles | None = None) -> Path | None:
    """The newest checkpoint that verifies (the `latest` pointer first), or None when there is none;
    `hasher`: see `verify_checkpoint`.

    Every corrupt one on the way is reported through `warn` (default: `warnings.warn`), naming the
    corrupt folder and the one used instead. `refuse_all_damaged` (`--resume auto`): checkpoints
    exist but none verifies -> CheckpointError naming each and why, because starting from scratch
    would silently throw the run away (a bad disk must not cost a week of training).
    """
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=3))
    root = Path(ckpt_root)
    candidates = list_checkpoints(root)
    pointer = root / LATEST_NAME
    if pointer.is_file():
        named = root / pointer.read_text(encoding="utf-8").strip()
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
    bad: list[tuple[Path, str]] = []
    for cand in candidates:
        try:
            verify_checkpoint(cand, hasher)
        except CheckpointError as exc:
            bad.append((cand, str(exc)))
            continue
        for path, reason in bad:
            warn(f"checkpoint {path} is corrupt ({reason}); falling back to {cand}")
        return cand
    if refuse_all_damaged and bad:
        each = "; ".join(f"{path.name}: {reason}" for path, reason in bad)
        raise CheckpointError(
            f"every checkpoint in {root} is damaged ({each}); refusing to start from scratch: restore them, "
            "or pass --resume never to start over (the damaged ones are moved aside)"
        )
    for path, reason in bad:
        warn(f"checkpoint {path} is corrupt ({reason}) and no older valid checkpoint exists")
    return None


# -- runs -> weights ----------------------------------------------------------------------------------


def model_dir_of_run(run: Path) -> Path | None:
    """A run's usable weights: final/ when it finished, else the newest stage's, else its newest valid checkpoint."""
    final = Path(run) / FINAL_NAME
    if is_model_dir(final):
        return final

    def stage_index(p: Path) -> int:
        head = p.name.split("-")[1] if p.name.count("-") >= 1 else ""
        return int(head) if head.isdigit() else -1

    stages = sorted((p for p in Path(run).glob("stage-*") if p.is_dir()), key=stage_index, reverse=True)
    for st in stages:
        found = model_dir_of_run(st)
        if found is not None:
            return found
    return find_valid_checkpoint(Path(run) / CKPT_DIR, warn=lambda m: None)


def newest_pretrained(root: Path | None = None) -> Path:
    """`--checkpoint` default: the weights of the newest pre-training run under ./runs."""
    root_path = Path(root) if root is not None else default_runs_root()
    for rec in list_runs(root_path, stage="pretrain"):
        found = model_dir_of_run(rec.path)
        if found is not None:
            return found
    raise CheckpointError(
        f"no pre-training run with weights under {root_path}; pass --checkpoint DIR (a model folder from "
        "`upctl convert` or a run) or run `upctl pretrain RECIPE.yaml` first"
    )


#: The fully resolved recipe a run trained with (written by engine/runs.py).
RECIPE_FILE = "recipe.yaml"

#: Stages whose runs hold a model tuned for their tasks (`upctl evaluate` defaults to one of them).
TUNED_STAGES = ("prompt_tune", "finetune")


def run_tasks(info: dict[str, Any]) -> list[str]:
    """The task names a run trained on, from its run.json (`tasks`, written when training starts)."""
    tasks = info.get("tasks")
    return [str(t) for t in tasks] if isinstance(tasks, list) else []


def newest_tuned(task: str, root: Path | None = None) -> Path:
    """`upctl evaluate` without `--checkpoint`: the weights of the newest prompt-tuning or fine-tuning
    run of `task` (a catalog name, as run.json records it) under ./runs."""
    root_path = Path(root) if root is not None else default_runs_root()
    runs = [r for stage in TUNED_STAGES for r in list_runs(root_path, stage=stage)]
    for rec in sorted(runs, key=lambda r: (r.mtime, r.path.name), reverse=True):
        if task not in run_tasks(read_run_info(rec.path)):
            continue
        found = model_dir_of_run(rec.path)
        if found is not None:
            return found
    raise CheckpointError(
        f"no prompt-tuning or fine-tuning run of task {task!r} with weights under {root_path}; pass --checkpoint DIR "
        f"or run `upctl prompt-tune --task {task}` or `upctl finetune --task {task}` first"
    )


def run_dir_of(model_dir: Path) -> Path | None:
    """The run folder that holds `model_dir` (its final/, a stage's final/ or a step folder), else None."""
    path = Path(model_dir).absolute()
    for parent in list(path.parents)[:4]:  # final/ -> run; stage-N/final/ and checkpoints/step-N/ -> 2 up
        if read_run_info(parent):
            return parent
    return None


def run_info_of(model_dir: Path) -> dict[str, Any]:
    """run.json of the run that holds `model_dir`, else {}.

    Why: a model folder alone does not say what it was tuned for; the run folder around it does.
    """
    run = run_dir_of(model_dir)
    return read_run_info(run) if run is not None else {}


def tuned_task_config(model_dir: Path, task_name: str) -> TaskConfig | None:
    """The task entry `task_name` of the recipe a TUNED run trained with (its recipe.yaml), else None.

    Why: a tuned model is evaluated the way its recipe says, not the way the catalog's zero-shot
    entry says: the reference decodes zero-shot COCO / Flickr30k / MSVD captions with length
    penalty 2.0 but prompt-tuned and fine-tuned ones with 0.0, and each recipe states its own.
    """
    from uniperceiver.config.loading import load_recipe

    run = run_dir_of(model_dir)
    if run is None or read_run_info(run).get("stage") not in TUNED_STAGES or not (run / RECIPE_FILE).is_file():
        return None
    recipe = load_recipe(run / RECIPE_FILE)
    return next((t for t in recipe.tasks if t.name == task_name), None)


def resolve_model_dir(path: str | Path) -> Path:
    """`--checkpoint PATH`: a model folder, a training step folder, or a run folder -> model folder."""
    p = Path(path).expanduser()
    if is_model_dir(p):
        return p
    if p.is_dir():
        found = model_dir_of_run(p)
        if found is not None:
            return found
    if not p.exists():
        raise CheckpointError(f"--checkpoint {path}: no such folder")
    raise CheckpointError(f"--checkpoint {path}: not a model folder (config.json + model.safetensors) or a run with weights")


__all__ = [
    "CKPT_DIR",
    "DCP_FOLDERS",
    "FINAL_NAME",
    "FORMAT",
    "FORMAT_V1",
    "FORMAT_V2",
    "HashFiles",
    "LATEST_NAME",
    "META_NAME",
    "REQUIRED_FILES",
    "RUN_INFO",
    "RunRecord",
    "SHARDED_DIR",
    "STEP_RE",
    "TUNED_STAGES",
    "Warn",
    "default_runs_root",
    "find_valid_checkpoint",
    "hash_files",
    "is_model_dir",
    "list_checkpoints",
    "list_runs",
    "model_dir_of_run",
    "read_checkpoint_meta",
    "newest_pretrained",
    "newest_tuned",
    "read_run_info",
    "resolve_model_dir",
    "run_info_of",
    "run_tasks",
    "verify_checkpoint",
]
