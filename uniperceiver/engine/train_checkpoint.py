"""Training checkpoints: one folder per step, checksummed, written atomically, loaded without pickle.

Layout of `<run>/checkpoints/`:
    step-000123/
        model.safetensors, config.json   the weights (a model directory: `load_model` reads it)
        optimizer.pt, scheduler.pt       torch.save of tensors and plain containers only
        trainer.pt                       the TrainState every rank shares (rank 0): step, skipped
                                         steps, world size, fp16 loss scale, open logging window,
                                         periodic-eval scores, state version
        rng-rank0.pt, rng-rank1.pt ...   each rank's part of the TrainState: its data cursors (draw,
                                         per-task epoch / cursor / pending positions, skipped media)
                                         + python / numpy / torch / cuda RNG states
        meta.json                        step, time, sha256 of every file above
    latest                               the name of the newest complete folder (atomic pointer)

The TrainState (`train_state.py`) is written and read as one unit: `save_training_checkpoint`
takes it whole, `load_checkpoint(...).state` gives it back whole. Checkpoints of an earlier
TrainState version (before the loop kept one state) are refused with one line naming the folder.

A folder is written under a temporary name and renamed into place only when complete, so a crash
(even SIGKILL) never leaves a half checkpoint behind a valid name. Loading verifies every checksum
and falls back to the previous checkpoint, with a warning naming both, when one is corrupt.
Everything is read back with `torch.load(weights_only=True)`: a checkpoint cannot run code.

Cost (`checkpoint_io.py`): every file is streamed from the live tensors into its atomic file and
hashed on the way (the sums in meta.json), never built as bytes in memory nor read back; a resume
hashes each file once (`find_valid_checkpoint`, files side by side), then `load_checkpoint(...,
verified=True)` and `read_weights_into` read the weights straight into the model's parameters.
The first writer (`buffered=True`) stays callable for `upctl bench --sections checkpoint`.

World size: resuming on another number of ranks reads every rank's part (`load_checkpoint(...,
world_size=)`) and re-derives this rank's data cursors so that no sample is repeated or skipped
(`TrainState.restore`); a per-rank batch size change needs nothing (cursors count samples).

FSDP runs (`train.sharding: fsdp`) write the SAME files: the full, unsharded model and optimizer
state, gathered with torch.distributed.checkpoint's state-dict API and written by rank 0, with the
optimizer state keyed by parameter index exactly like `optimizer.state_dict()`. So a checkpoint
resumes under DDP, FSDP or one process, whichever wrote it, on any number of ranks.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file

from uniperceiver.engine.checkpoint_io import read_safetensors_into, torch_save_hashed, write_hashed, write_safetensors
# The RNG helpers are part of the TrainState now; re-exported for callers of this module.
from uniperceiver.engine.train_state import TrainState, capture_rng_state, restore_rng_state
from uniperceiver.errors import CheckpointError, StorageError
# The read-only side of the step-folder format (find, verify) is shared with evaluation, below the engine.
from uniperceiver.evaluation.checkpoints import (  # noqa: F401 - re-exported
    FORMAT, LATEST_NAME, META_NAME, STEP_RE, Warn, find_valid_checkpoint, list_checkpoints, verify_checkpoint,
)
from uniperceiver.modeling.model import UniPerceiver
from uniperceiver.modeling.model_dir import CONFIG_NAME, WEIGHTS_NAME, check_state_fits, read_config, save_model
from uniperceiver.utils.files import atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file

if TYPE_CHECKING:
    from uniperceiver.engine.distributed import DistEnv
    from uniperceiver.engine.loader import MultiTaskLoader
    from uniperceiver.engine.optim import WarmupSchedule



#: config.json's `format` (as `modeling.model_dir.save_model` writes it).
MODEL_FORMAT = "uniperceiver-model-v1"


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


def write_rank_state(tmp: Path, rank: int, state: dict[str, Any], *, buffered: bool = False) -> dict[str, str]:
    """Each rank's part of the TrainState (data cursors, RNG states: they differ between ranks).

    Returns {file name: sha256} (hashed while writing; {} with `buffered`, the first writer's way)."""
    name = f"rng-rank{rank}.pt"
    if buffered:
        atomic_write_bytes(tmp / name, _torch_bytes(state))
        return {}
    return {name: torch_save_hashed(tmp / name, state)}


def write_main_state(
    tmp: Path,
    parts: Trainables,
    shared: dict[str, Any],
    full_state: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
    *,
    buffered: bool = False,
) -> dict[str, str]:
    """The replicated state (identical on every rank): written by rank 0; returns {file: sha256}.

    `shared` is `TrainState.shared_dict()`. `full_state` = (model state, optimizer state) already
    gathered from a sharded (FSDP) model by `gather_full_state`; None reads both from `parts`.
    Every file is streamed from the live tensors and hashed on its way to disk. `buffered` keeps
    the first writer (each file built as bytes in memory, hashed by re-reading at commit) callable
    for the checkpoint benchmark; it returns {}.
    """
    if full_state is None:
        model_state = {k: v.detach() for k, v in parts.model.state_dict().items()}
        optim_state = parts.optimizer.state_dict()
    else:
        model_state, optim_state = full_state
    if buffered:
        save_model(parts.model if full_state is None else plain_model(parts.model.cfg, model_state), tmp)
        for name, obj in (("optimizer.pt", optim_state), ("scheduler.pt", parts.scheduler.state_dict()),
                          ("trainer.pt", shared)):
            atomic_write_bytes(tmp / name, _torch_bytes(obj))
        return {}
    digests = {WEIGHTS_NAME: write_hashed(tmp / WEIGHTS_NAME, lambda fh: write_safetensors(fh, model_state))}
    # config.json as `save_model` writes it: `load_model` can read a step folder.
    config = {"model": parts.model.cfg.to_dict(), "format": MODEL_FORMAT, "weights_sha256": digests[WEIGHTS_NAME]}
    text = json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    digests[CONFIG_NAME] = write_hashed(tmp / CONFIG_NAME, lambda fh: fh.write(text.encode("utf-8")))
    for name, obj in (("optimizer.pt", optim_state), ("scheduler.pt", parts.scheduler.state_dict()),
                      ("trainer.pt", shared)):
        digests[name] = torch_save_hashed(tmp / name, obj)
    return digests


def commit_checkpoint(ckpt_root: Path, step: int, keep: int, extra_meta: dict[str, Any] | None = None,
                      digests: dict[str, str] | None = None) -> Path:
    """Write meta.json with every staged file's sha256, rename into place, move `latest`, prune old ones.

    `digests`: the sums already computed while writing; only files missing from it are read to
    be hashed (another rank's small state file, or everything for the buffered writer)."""
    ckpt_root = Path(ckpt_root)
    tmp = staging_dir(ckpt_root, step)
    known = digests or {}
    files = {p.name: known.get(p.name) or sha256_file(p)
             for p in sorted(tmp.iterdir()) if p.is_file() and not p.name.startswith(".")}
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
    root: Path, state: TrainState, parts: Trainables, env: DistEnv, *, keep: int, meta: dict[str, Any],
    buffered: bool = False,
) -> Path:
    """Save `state` (as one unit) and `parts` as the step folder of `state.step` under `root`; a collective.

    The state is first brought up to date from the live objects (`TrainState.snapshot`: cursors,
    RNG, loss scale). Rank 0 stages the replicated files, every rank adds its own part, rank 0
    commits (checksums, rename, `latest`, pruning to the `keep` newest); `meta` goes into meta.json.
    A write that fails (full disk, I/O error) removes the staging folder and raises one CheckpointError
    naming the checkpoint; the previous checkpoint and the `latest` pointer are untouched.
    Files are streamed and hashed while written; `buffered` selects the first writer (benchmarks).
    """
    from uniperceiver.engine.distributed import barrier, is_sharded

    step = state.step
    final = root / step_dir_name(step)
    state.snapshot(parts.loader, parts.scaler, env.world_size)
    # Sharded (FSDP) state is gathered by every rank together; rank 0 receives the full tensors.
    full = gather_full_state(parts.model, parts.optimizer) if is_sharded(parts.model) else None
    try:
        digests: dict[str, str] = {}
        if env.is_main:
            tmp = begin_checkpoint(root, step)
            digests = write_main_state(tmp, parts, state.shared_dict(), full, buffered=buffered)
        barrier(env)
        tmp = staging_dir(root, step)
        digests.update(write_rank_state(tmp, env.rank, state.rank_dict() or {}, buffered=buffered))
        barrier(env)
        if env.is_main:
            final = commit_checkpoint(root, step, keep, meta, digests)
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
    """What `load_checkpoint` read back (every state on CPU); `state` is the saved TrainState.

    The weights are read only when asked for (`model_state`, or `read_weights_into` straight into a
    model's parameters): resuming never holds a second full copy of them.
    """

    path: Path
    step: int
    meta: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    state: TrainState
    _weights: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def model_state(self) -> dict[str, torch.Tensor]:
        """The weights as a state dict (read from model.safetensors on first use)."""
        if self._weights is None:
            try:
                self._weights = load_file(str(self.path / WEIGHTS_NAME))
            except Exception as exc:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"{self.path / WEIGHTS_NAME}: unreadable safetensors file ({exc})") from None
        return self._weights

    @property
    def trainer(self) -> dict[str, Any]:
        """The shared part of the state, as `trainer.pt` holds it."""
        return self.state.shared_dict()

    @property
    def rank_state(self) -> dict[str, Any] | None:
        """The loaded rank's part of the state (data cursors, RNG); None when the folder has none."""
        return self.state.rank_dict()


def load_checkpoint(path: Path, rank: int = 0, *, world_size: int | None = None,
                    verified: bool = False) -> TrainingCheckpoint:
    """Read one step folder (checksums first, unless the caller `verified` it already, e.g. through
    `find_valid_checkpoint`: every file is hashed once per resume).

    The state has no rank part when this rank saved no file. With `world_size` other than the
    saving run's, every saved rank's part is read too (`TrainState.peers`), so `TrainState.restore`
    can re-derive this rank's data cursors exactly.
    """
    path = Path(path)
    meta = verify_checkpoint(path) if not verified else _read_meta(path)
    read_config(path)  # a clear error if config.json is unusable
    rank_file = path / f"rng-rank{rank}.pt"
    shared = _torch_load(path / "trainer.pt")
    mine = _torch_load(rank_file) if rank_file.is_file() else None
    saved_world = shared.get("world_size") if isinstance(shared, dict) else None
    peers = None
    if world_size is not None and isinstance(saved_world, int) and saved_world != world_size:
        files = [path / f"rng-rank{r}.pt" for r in range(saved_world)]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"cannot resume {path} on {world_size} rank(s): it lacks {', '.join(absent)} of "
                                  f"the {saved_world} ranks that wrote it; resume with {saved_world} rank(s)")
        peers = [_torch_load(f) for f in files]
    return TrainingCheckpoint(
        path=path,
        step=int(meta["step"]),
        meta=meta,
        optimizer=_torch_load(path / "optimizer.pt"),
        scheduler=_torch_load(path / "scheduler.pt"),
        state=TrainState.from_dicts(shared, mine, str(path), peers),
    )


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / META_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path / META_NAME}: unreadable ({exc})") from None


def read_weights_into(model: UniPerceiver, path: Path) -> None:
    """Copy a verified step folder's weights straight into `model`'s parameters and buffers
    (no intermediate state dict); names and shapes are checked against the file's header first."""
    read_safetensors_into(Path(path) / WEIGHTS_NAME, model.state_dict())


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
    "read_weights_into",
    "resolve_checkpoint_path",
    "restore_rng_state",
    "save_training_checkpoint",
    "step_dir_name",
    "unsharded_copy",
    "verify_checkpoint",
    "write_main_state",
    "write_rank_state",
]
