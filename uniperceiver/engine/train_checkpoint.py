"""Training checkpoints: one folder per step, checksummed, written atomically, loaded without pickle.

Layout of `<run>/checkpoints/`:
    step-000123/
        model.safetensors, config.json   the weights (a model directory: `load_model` reads it)
        optimizer.pt, scheduler.pt       torch.save of tensors and plain containers only
        trainer.pt                       the TrainState every rank shares (rank 0): step, skipped
                                         steps, world size, fp16 loss scale, open logging window,
                                         periodic-eval scores, state version
        rng-rank0.pt, rng-rank1.pt ...   each rank's part of the TrainState: its data cursors (draw,
                                         per-task epoch / cursor, skipped media) + python / numpy /
                                         torch / cuda RNG states
        meta.json                        step, time, sha256 of every file above
    latest                               the name of the newest complete folder (atomic pointer)

The TrainState (`train_state.py`) is written and read as one unit: `save_training_checkpoint`
takes it whole, `load_checkpoint(...).state` gives it back whole. Checkpoints of an earlier
TrainState version (before the loop kept one state) are refused with one line naming the folder.

A folder is written under a temporary name and renamed into place only when complete, so a crash
(even SIGKILL) never leaves a half checkpoint behind a valid name. Loading verifies every checksum
and falls back to the previous checkpoint, with a warning naming both, when one is corrupt.
Everything is read back with `torch.load(weights_only=True)`: a checkpoint cannot run code.

FSDP runs (`train.sharding: fsdp`) write the SAME files: the full, unsharded model and optimizer
state, gathered with torch.distributed.checkpoint's state-dict API and written by rank 0, with the
optimizer state keyed by parameter index exactly like `optimizer.state_dict()`. So a checkpoint
resumes under DDP, FSDP or one process, whichever wrote it.
"""

from __future__ import annotations

import io
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

# The RNG helpers are part of the TrainState now; re-exported for callers of this module.
from uniperceiver.engine.train_state import TrainState, capture_rng_state, restore_rng_state
from uniperceiver.errors import CheckpointError, StorageError
# The read-only side of the step-folder format (find, verify) is shared with evaluation, below the engine.
from uniperceiver.evaluation.checkpoints import (  # noqa: F401 - re-exported
    FORMAT, LATEST_NAME, META_NAME, STEP_RE, Warn, find_valid_checkpoint, list_checkpoints, verify_checkpoint,
)
from uniperceiver.modeling.model_dir import check_state_fits, load_state, read_config, save_model
from uniperceiver.modeling.model import UniPerceiver
from uniperceiver.utils.files import atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file

if TYPE_CHECKING:
    from uniperceiver.engine.distributed import DistEnv
    from uniperceiver.engine.loader import MultiTaskLoader
    from uniperceiver.engine.optim import WarmupSchedule



def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors, truncated zip files
        raise CheckpointError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None


# -- writing ------------------------------------------------------------------------------------


def staging_dir(ckpt_root: Path, step: int) -> Path:
    """The temporary folder every rank writes into before rank 0 commits it (same filesystem)."""
    return Path(ckpt_root) / f".tmp-{step_dir_name(step)}"


def begin_checkpoint(ckpt_root: Path, step: int) -> Path:
    """Create a fresh staging folder (rank 0 only; removes leftovers of an interrupted save)."""
    tmp = staging_dir(ckpt_root, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


@dataclass
class Trainables:
    """The live objects a training checkpoint saves besides the TrainState.

    `model` is the bare model (under FSDP it holds the sharded parameters), not its DDP / FSDP
    wrapper; `loader` and `scaler` hold the TrainState's cursors and loss scale while training.
    """

    model: UniPerceiver
    optimizer: torch.optim.Optimizer
    scheduler: WarmupSchedule
    scaler: torch.amp.GradScaler
    loader: MultiTaskLoader


def write_rank_state(tmp: Path, rank: int, state: dict[str, Any]) -> None:
    """Each rank's part of the TrainState (data cursors, RNG states: they differ between ranks)."""
    atomic_write_bytes(tmp / f"rng-rank{rank}.pt", _torch_bytes(state))


def write_main_state(
    tmp: Path,
    parts: Trainables,
    shared: dict[str, Any],
    full_state: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
) -> None:
    """The replicated state (identical on every rank): written by rank 0.

    `shared` is `TrainState.shared_dict()`. `full_state` = (model state, optimizer state) already
    gathered from a sharded (FSDP) model by `gather_full_state`; None reads both from `parts`.
    """
    if full_state is None:
        save_model(parts.model, tmp)
        optim_state = parts.optimizer.state_dict()
    else:
        save_model(plain_model(parts.model.cfg, full_state[0]), tmp)
        optim_state = full_state[1]
    atomic_write_bytes(tmp / "optimizer.pt", _torch_bytes(optim_state))
    atomic_write_bytes(tmp / "scheduler.pt", _torch_bytes(parts.scheduler.state_dict()))
    atomic_write_bytes(tmp / "trainer.pt", _torch_bytes(shared))


def commit_checkpoint(ckpt_root: Path, step: int, keep: int, extra_meta: dict[str, Any] | None = None) -> Path:
    """Checksum the staged files, write meta.json, rename into place, move `latest`, prune old ones."""
    ckpt_root = Path(ckpt_root)
    tmp = staging_dir(ckpt_root, step)
    files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file() and not p.name.startswith(".")}
    meta = {"format": FORMAT, "step": int(step), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files}
    if extra_meta:
        meta.update(extra_meta)
    atomic_write_json(tmp / META_NAME, meta)
    _fsync_dir(tmp)
    final = ckpt_root / step_dir_name(step)
    if final.exists():  # re-saving a step after a resume: swap, then drop the old copy
        old = ckpt_root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    atomic_write_text(ckpt_root / LATEST_NAME, final.name + "\n")
    prune_checkpoints(ckpt_root, keep, protect=final.name)
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def prune_checkpoints(ckpt_root: Path, keep: int, protect: str | None = None) -> list[Path]:
    """Keep the `keep` newest step folders (keep <= 0 keeps all); returns what was removed."""
    if keep <= 0:
        return []
    removed = []
    for path in list_checkpoints(ckpt_root)[keep:]:
        if path.name == protect:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def save_training_checkpoint(
    root: Path, state: TrainState, parts: Trainables, env: DistEnv, *, keep: int, meta: dict[str, Any]
) -> Path:
    """Save `state` (as one unit) and `parts` as the step folder of `state.step` under `root`; a collective.

    The state is first brought up to date from the live objects (`TrainState.snapshot`: cursors,
    RNG, loss scale). Rank 0 stages the replicated files, every rank adds its own part, rank 0
    commits (checksums, rename, `latest`, pruning to the `keep` newest); `meta` goes into meta.json.
    A write that fails (full disk, I/O error) removes the staging folder and raises one CheckpointError
    naming the checkpoint; the previous checkpoint and the `latest` pointer are untouched.
    """
    from uniperceiver.engine.distributed import barrier, is_sharded

    step = state.step
    final = root / step_dir_name(step)
    state.snapshot(parts.loader, parts.scaler, env.world_size)
    # Sharded (FSDP) state is gathered by every rank together; rank 0 receives the full tensors.
    full = gather_full_state(parts.model, parts.optimizer) if is_sharded(parts.model) else None
    try:
        if env.is_main:
            tmp = begin_checkpoint(root, step)
            write_main_state(tmp, parts, state.shared_dict(), full)
        barrier(env)
        tmp = staging_dir(root, step)
        write_rank_state(tmp, env.rank, state.rank_dict() or {})
        barrier(env)
        if env.is_main:
            final = commit_checkpoint(root, step, keep, meta)
        barrier(env)
    except (OSError, StorageError) as exc:
        shutil.rmtree(staging_dir(root, step), ignore_errors=True)
        cause = exc if isinstance(exc, OSError) else exc.__cause__
        reason = (cause.strerror if isinstance(cause, OSError) else None) or str(exc)
        raise CheckpointError(
            f"could not write checkpoint {final}: {reason}; the previous checkpoint is kept"
        ) from exc
    return final


# -- sharded (FSDP) models: full state in, full state out ----------------------------------------


def plain_model(cfg: Any, state: dict[str, torch.Tensor]) -> UniPerceiver:
    """A plain UniPerceiver holding `state`'s tensors (no copy, no initialisation: built on meta)."""
    with torch.device("meta"):
        model = UniPerceiver(cfg)
    model.load_state_dict(state, assign=True)
    return model


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of every optimizer parameter, in `optimizer.state_dict()`'s index order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def gather_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model state, optimizer state) of a sharded model, full and on the CPU of rank 0.

    A collective: every rank calls it; other ranks get empty containers. The optimizer state is
    converted from torch.distributed.checkpoint's parameter-name keys to the parameter indices of
    `optimizer.state_dict()`, so the file is the one a DDP or single-process run writes.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=opts)
    if not optimizer.state:  # nothing stepped yet: DCP would initialise it with a zero-gradient step
        return model_state, optimizer.state_dict()
    named = get_optimizer_state_dict(model, optimizer, options=opts)
    if not named:
        return model_state, {}
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in named["param_groups"]]
    return model_state, {"state": {index[n]: v for n, v in named["state"].items()}, "param_groups": groups}


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any],
                         source: str) -> None:
    """Load a full optimizer state (parameter-index keys) into `optimizer`, sharding it under FSDP."""
    from uniperceiver.engine.distributed import is_sharded

    groups = saved.get("param_groups", [])
    sizes = [len(g["params"]) for g in groups]
    want = [len(g["params"]) for g in optimizer.param_groups]
    if sizes != want:
        raise CheckpointError(
            f"cannot resume: {source}/optimizer.pt has parameter groups of sizes {sizes}, this run's optimizer "
            f"{want} (another model or tuning mode)"
        )
    if not is_sharded(model) or not saved.get("state"):
        optimizer.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(model, optimizer)
    named = {
        "state": {names[int(i)]: v for i, v in saved["state"].items()},
        "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in groups],
    }
    # strict=False: parameters no step has used yet have no saved state (AdamW creates it lazily).
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True, strict=False))
    # DCP first gives every parameter a state (a zero-gradient step with lr 0); drop the ones the
    # checkpoint has none for, so they start from scratch exactly as in the uninterrupted run.
    by_name = dict(model.named_parameters())
    for name in set(names) - set(named["state"]):
        optimizer.state.pop(by_name[name], None)


def unsharded_copy(model: torch.nn.Module) -> UniPerceiver:
    """A plain model with the full weights of a sharded one, on every rank (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    copy = plain_model(model.cfg, {k: v.detach().clone() for k, v in state.items()})  # type: ignore[attr-defined]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for name, param in copy.named_parameters():
        param.requires_grad_(flags.get(name, True))
    return copy.train(model.training)


# -- reading ------------------------------------------------------------------------------------


@dataclass
class TrainingCheckpoint:
    """What `load_checkpoint` read back (every state on CPU); `state` is the saved TrainState."""

    path: Path
    step: int
    meta: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    state: TrainState

    @property
    def trainer(self) -> dict[str, Any]:
        """The shared part of the state, as `trainer.pt` holds it."""
        return self.state.shared_dict()

    @property
    def rank_state(self) -> dict[str, Any] | None:
        """The loaded rank's part of the state (data cursors, RNG); None when the folder has none."""
        return self.state.rank_dict()


def load_checkpoint(path: Path, rank: int = 0) -> TrainingCheckpoint:
    """Verify and read one step folder; the state has no rank part when this rank saved no file."""
    path = Path(path)
    meta = verify_checkpoint(path)
    read_config(path)  # a clear error if config.json is unusable
    rank_file = path / f"rng-rank{rank}.pt"
    shared = _torch_load(path / "trainer.pt")
    mine = _torch_load(rank_file) if rank_file.is_file() else None
    return TrainingCheckpoint(
        path=path,
        step=int(meta["step"]),
        meta=meta,
        model_state=load_state(path),
        optimizer=_torch_load(path / "optimizer.pt"),
        scheduler=_torch_load(path / "scheduler.pt"),
        state=TrainState.from_dicts(shared, mine, str(path)),
    )


def load_weights_into(model: UniPerceiver, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy a checkpoint's weights into an existing model after checking names and shapes."""
    check_state_fits(model, state, source)
    model.load_state_dict(state)


def resolve_checkpoint_path(path: str | Path, warn: Warn | None = None) -> Path:
    """`--resume PATH`: a step folder, a `checkpoints/` folder or a run folder -> a verified step folder."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"--resume {path}: no such file or folder")
    if (p / META_NAME).is_file():
        verify_checkpoint(p)
        return p
    for root in (p, p / "checkpoints"):
        if root.is_dir() and (list_checkpoints(root) or (root / LATEST_NAME).is_file()):
            found = find_valid_checkpoint(root, warn)
            if found is not None:
                return found
            raise CheckpointError(f"--resume {path}: no valid checkpoint under {root}")
    raise CheckpointError(f"--resume {path}: not a checkpoint folder (no {META_NAME}, no step-* folders)")


__all__ = [
    "LATEST_NAME",
    "TrainingCheckpoint",
    "Trainables",
    "begin_checkpoint",
    "capture_rng_state",
    "commit_checkpoint",
    "find_valid_checkpoint",
    "gather_full_state",
    "list_checkpoints",
    "load_checkpoint",
    "load_optimizer_state",
    "load_weights_into",
    "plain_model",
    "prune_checkpoints",
    "resolve_checkpoint_path",
    "restore_rng_state",
    "save_training_checkpoint",
    "step_dir_name",
    "unsharded_copy",
    "verify_checkpoint",
    "write_main_state",
    "write_rank_state",
]
