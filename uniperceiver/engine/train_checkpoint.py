"""Training checkpoints: one folder per step, checksummed, written atomically, loaded without pickle.

Layout of `<run>/checkpoints/`:
    step-000123/
        model.dcp/                       the weights through torch.distributed.checkpoint (DCP): each
                                         rank writes its `__<rank>_<n>.distcp` (under FSDP its shards,
                                         under DDP its share of the replicated tensors), `.metadata`
        config.json                      the model config and the digest of every model.dcp file: the
                                         step folder is a model folder (`load_model` reads it)
        optim.dcp/                       the optimizer's tensors through DCP, written the same way
        optimizer.pt                     the rest of the optimizer state: parameter groups, each
                                         parameter index's name and state keys (no tensors)
        scheduler.pt                     torch.save of plain containers only
        trainer.pt                       the TrainState every rank shares (rank 0): step, skipped
                                         steps, world size, fp16 loss scale, open logging window,
                                         periodic-eval scores, state version
        rng-rank0.pt, rng-rank1.pt ...   each rank's part of the TrainState: its data cursors (draw,
                                         per-task epoch / cursor / pending positions, skipped media)
                                         + python / numpy / torch / cuda RNG states
        meta.json                        format, step, time, the digest algorithm and the sum of every
                                         file above (the DCP files included, each hashed by the rank
                                         that wrote it, while writing it)
    latest                               the name of the newest complete folder (atomic pointer)

The TrainState (`train_state.py`) is written and read as one unit: `save_training_checkpoint`
takes it whole, `load_checkpoint(...).state` gives it back whole. Checkpoints of an earlier
TrainState version (before the loop kept one state) are refused with one line naming the folder.
The small state files stay plain `torch.save` files read with `weights_only=True` (each rank its
own rng-rankN.pt): DCP would pickle non-tensor values and unpickle them with code execution allowed.

A folder is written under a temporary name and renamed into place only when complete, so a crash
(even SIGKILL) never leaves a half checkpoint behind a valid name. Loading verifies every checksum
and falls back to the previous checkpoint, with a warning naming both, when one is corrupt.
Nothing in a checkpoint can run code: `torch.load(weights_only=True)`, and DCP's `.metadata`
pickles go through a restricted unpickler (`utils.dcp_read`).

The tensors (weights and optimizer state: the whole bulk) go through DCP (`dcp_state.py`): every
rank writes its part in parallel, hashing its files as they are written, and reads back the parts
it needs, for any number of ranks; nobody gathers them. Integrity is checked once per resume: rank 0
chooses the checkpoint (`find_valid_checkpoint`) while every rank hashes a share of its files
(`shared_hashing.py`: each reads about 1/N of the bytes), and the ranks are handed the verified
folder. The sums are XXH3-128 (`utils.digests`: corruption, not forgery, is what they
guard against; ~14x cheaper than sha256). Format v1 (weights in model.safetensors, the whole
optimizer state in optimizer.pt) and v2 (model.safetensors + optim.dcp/) folders still resume.

Asynchronous saves (`wants_async`: when the state lives on a GPU): DCP copies weights and optimizer
state to host memory and writes them from background threads (one gloo group each); the folder
stays staged until the next save, the end of the stage or SIGTERM publishes it (`finish_pending`:
every rank's writes joined and their sums collected, then the usual commit). A failed background
write publishes nothing; after an error the trainer waits for it and drops it (`abandon_pending`).
The small state files and the commit are never asynchronous.

Reading lives in `checkpoint_load.py`, the files of one step folder (staging, writing, config.json,
meta.json, the commit, pruning) in `checkpoint_files.py`, the FSDP full-state collectives in
`full_state.py`; all are re-exported here.

Cost (`checkpoint_io.py`, `dcp_state.py`): every file is streamed from the live tensors and hashed
on the way, never built as bytes in memory nor read back; a resume hashes each file once
(`find_valid_checkpoint`, files side by side), then `load_checkpoint(..., verified=True)` and
`read_weights_into` read the weights straight into the model's parameters. The earlier writers
(`layout="buffered"`: bytes in memory; `"streamed"`: format v1, one process writes everything,
sha256) stay callable for `upctl bench --sections checkpoint`.

World size: resuming on another number of ranks reads every rank's part (`load_checkpoint(...,
world_size=)`) and re-derives this rank's data cursors so that no sample is repeated or skipped
(`TrainState.restore`); a per-rank batch size change needs nothing (cursors count samples).

FSDP runs (`train.sharding: fsdp`) write the same layout: each rank its DTensor shards of the
weights and of the optimizer state, keyed by parameter name, and read back only its own shards
(`read_sharded_weights_into`, after wrapping; other runs read the weights before wrapping). So a checkpoint resumes under DDP,
FSDP or one process, whichever wrote it, on any number of ranks. Only `final/` (one safetensors
model folder, what `upctl convert` writes and later stages load) gathers the full weights.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from uniperceiver.engine import dcp_state
from uniperceiver.engine.checkpoint_files import (
    begin_checkpoint,
    commit_checkpoint,
    model_tensors,
    prune_checkpoints,
    staging_dir,
    step_dir_name,
    write_main_state,
    write_model_config,
    write_rank_state,
)
from uniperceiver.engine.checkpoint_load import (
    TrainingCheckpoint,
    has_dcp_weights,
    load_checkpoint,
    load_weights_into,
    read_sharded_weights_into,
    read_weights_into,
    resolve_checkpoint_path,
    restore_optimizer,
)
from uniperceiver.engine.full_state import (  # noqa: F401 - re-exported
    check_groups,
    gather_full_model,
    gather_full_state,
    load_optimizer_state,
    plain_model,
    unsharded_copy,
)

# The RNG helpers are part of the TrainState now; re-exported for callers of this module.
from uniperceiver.engine.train_state import (
    TrainState,
    capture_rng_state,
    restore_rng_state,
)
from uniperceiver.errors import CheckpointError, StorageError

# The read-only side of the step-folder format (find, verify) is shared with evaluation, below the engine.
from uniperceiver.evaluation.checkpoints import (  # noqa: F401 - re-exported
    DCP_FOLDERS,
    FORMAT,
    FORMAT_V1,
    FORMAT_V2,
    LATEST_NAME,
    META_NAME,
    SHARDED_DIR,
    STEP_RE,
    Warn,
    find_valid_checkpoint,
    list_checkpoints,
    verify_checkpoint,
)
from uniperceiver.modeling.model import UniPerceiver
from uniperceiver.modeling.model_dir import MODEL_DCP
from uniperceiver.utils.digests import CHECKPOINT_DIGEST, LEGACY_DIGEST

if TYPE_CHECKING:
    from uniperceiver.engine.distributed import DistEnv
    from uniperceiver.engine.loader import MultiTaskLoader
    from uniperceiver.engine.optim import WarmupSchedule




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
    #: The checkpoint whose DCP files background threads are still writing (asynchronous saves).
    pending: PendingCheckpoint | None = None
    #: The gloo groups asynchronous saves coordinate over, one per DCP folder (never the training's
    #: groups, nor one shared by two background threads: their collectives would interleave).
    checkpoint_groups: tuple[Any, ...] = ()


def write_tensors(tmp: Path, parts: Trainables, optimizer_tensors: dict[str, torch.Tensor], env: DistEnv, *,
                  background: bool = False, thread_count: int | None = None) -> list[dcp_state.DcpSave]:
    """Start the DCP saves of the weights (model.dcp/) and the optimizer's tensors (optim.dcp/); a
    collective. `wait()` on each returns this rank's files' digests (see `DcpSave`)."""
    threads = thread_count or (2 if env.world_size == 1 else 1)
    groups = _save_groups(parts, env, background)
    return [dcp_state.DcpSave(tmp / folder, tensors, group, thread_count=threads, asynchronous=background)
            for folder, tensors, group in ((MODEL_DCP, model_tensors(parts.model), groups[0]),
                                           (SHARDED_DIR, optimizer_tensors, groups[1]))]


@dataclass
class PendingCheckpoint:
    """A staged checkpoint not yet published: its optimizer files may still be in writing (`save`)."""

    root: Path
    step: int
    keep: int
    meta: dict[str, Any]
    final: Path
    digests: dict[str, str]
    saves: list[dcp_state.DcpSave]
    #: The model config (rank 0 writes config.json with the weights' digests at publishing).
    model_cfg: Any = None
    #: The digest algorithm of every sum (sha256 for the format v1 writers of the benchmark).
    algorithm: str = CHECKPOINT_DIGEST


def wants_async(model: torch.nn.Module) -> bool:
    """Write weights and optimizer state in the background only when they live on an accelerator:
    staging copies them to host memory, the copy a GPU save makes anyway. A CPU state would be copied
    whole (a second full state in memory), so it is written synchronously."""
    return any(p.device.type == "cuda" for p in model.parameters())


def save_training_checkpoint(
    root: Path, state: TrainState, parts: Trainables, env: DistEnv, *, keep: int, meta: dict[str, Any],
    layout: str = "dcp", asynchronous: bool | None = None,
) -> Path:
    """Save `state` (as one unit) and `parts` as the step folder of `state.step` under `root`; a collective.

    The previous asynchronous save is published first (`finish_pending`). The state is brought up
    to date from the live objects (`TrainState.snapshot`). Rank 0 stages the replicated small files,
    every rank writes its part of the weights and of the optimizer state through DCP and its own
    state file, each hashing what it wrote; rank 0 collects the sums, writes config.json and commits
    (meta.json, rename, `latest`, pruning to the `keep` newest). `asynchronous` (default
    `wants_async`): the DCP files are written in the background and the checkpoint is published by
    the next save or `finish_pending`, which the trainer calls before final/ and on the way out. A
    write that fails on any rank (full disk, I/O error) removes the staging folder and raises one
    CheckpointError naming the checkpoint; nothing is published, the previous checkpoint and
    `latest` are untouched. `layout` "streamed" / "buffered" selects the earlier format-v1 writers
    (benchmarks).
    """
    from uniperceiver.engine.distributed import barrier, is_sharded

    finish_pending(parts, env)
    step = state.step
    final = root / step_dir_name(step)
    state.snapshot(parts.loader, parts.scaler, env.world_size)
    dcp_layout = layout == "dcp"
    background = dcp_layout and (wants_async(parts.model) if asynchronous is None else asynchronous)
    algorithm = CHECKPOINT_DIGEST if dcp_layout else LEGACY_DIGEST
    tensors, rest = dcp_state.split_optimizer_state(parts.model, parts.optimizer) if dcp_layout else ({}, None)
    # The format v1 writers need the full state on rank 0: gathered from FSDP shards by every rank.
    full = gather_full_state(parts.model, parts.optimizer) if not dcp_layout and is_sharded(parts.model) else None
    saves: list[dcp_state.DcpSave] = []
    try:
        digests: dict[str, str] = {}
        if env.is_main:
            tmp = begin_checkpoint(root, step)
            digests = write_main_state(tmp, parts, state.shared_dict(), full, buffered=layout == "buffered",
                                       optimizer_rest=rest)
        barrier(env)
        tmp = staging_dir(root, step)
        if dcp_layout:
            saves = write_tensors(tmp, parts, tensors, env, background=background)
        digests.update(write_rank_state(tmp, env.rank, state.rank_dict() or {}, buffered=layout == "buffered",
                                        algorithm=algorithm))
    except (OSError, StorageError, CheckpointError) as exc:
        _join_quietly(saves)
        raise _write_failed(root, step, final, exc) from exc
    pending = PendingCheckpoint(root, step, keep, meta, final, digests, saves,
                                parts.model.cfg if dcp_layout else None, algorithm)
    if background:
        parts.pending = pending
        return final
    return _publish(pending, env)


def _save_groups(parts: Trainables, env: DistEnv, background: bool) -> tuple[Any, Any]:
    """The process groups the two DCP saves coordinate over: none alone, the side group when
    synchronous (one save after the other), and when background threads use them, a gloo group
    for each (created once, by every rank together): two threads must not share one group."""
    if not env.distributed:
        return None, None
    if not background:
        return env.group, env.group
    if not parts.checkpoint_groups:
        import datetime

        import torch.distributed as dist

        # The job's collective timeout, not gloo's default 30 minutes: a background write whose peer died
        # then fails as soon as the training's own collectives would.
        timeout = datetime.timedelta(seconds=env.timeout_s)
        parts.checkpoint_groups = (dist.new_group(backend="gloo", timeout=timeout),
                                   dist.new_group(backend="gloo", timeout=timeout))
    return parts.checkpoint_groups[0], parts.checkpoint_groups[1]


def _join_quietly(saves: list[dcp_state.DcpSave], timeout_s: float | None = None) -> None:
    """Wait for saves already started (their files are about to be removed); errors are moot."""
    for save in saves:
        try:
            save.wait(timeout_s=timeout_s)
        except (OSError, StorageError, CheckpointError):
            pass


def _write_failed(root: Path, step: int, final: Path, exc: BaseException) -> CheckpointError:
    """Remove the staging folder; one line naming the checkpoint and the cause."""
    shutil.rmtree(staging_dir(root, step), ignore_errors=True)
    return CheckpointError(f"could not write checkpoint {final}: {_reason(exc)}; the previous checkpoint is kept")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, CheckpointError):
        return str(exc)
    cause = exc if isinstance(exc, OSError) else exc.__cause__
    return (cause.strerror if isinstance(cause, OSError) else None) or str(exc)


def _publish(pending: PendingCheckpoint, env: DistEnv) -> Path:
    """Join the DCP writes, collect every rank's sums, commit on rank 0 (every rank calls it).

    Every rank reports success or its error before anyone commits, so a failure on one rank
    publishes nothing anywhere and every rank raises."""
    from uniperceiver.engine.distributed import barrier

    mine, error = dict(pending.digests), None
    for save in pending.saves:
        try:
            mine.update(save.wait())
        except (OSError, StorageError, CheckpointError) as exc:
            error = error or exc
    try:
        every = _gather_object((None if error is None else _reason(error), mine), env)
        failed = [(rank, why) for rank, (why, _) in enumerate(every) if why is not None]
        if error is not None:
            raise error
        if failed:
            raise CheckpointError(f"rank {failed[0][0]}: {failed[0][1]}")
        digests = {name: digest for _, part in every for name, digest in part.items()}
        final = pending.final
        if env.is_main:
            if pending.model_cfg is not None:
                digests.update(write_model_config(staging_dir(pending.root, pending.step), pending.model_cfg, digests))
            final = commit_checkpoint(pending.root, pending.step, pending.keep, pending.meta, digests,
                                      pending.algorithm)
        barrier(env)
    except (OSError, StorageError, CheckpointError) as exc:
        raise _write_failed(pending.root, pending.step, pending.final, exc) from exc
    return final


#: How long `abandon_pending` waits for a background DCP write before leaving it behind.
ABANDON_WAIT_S = 120.0


def finish_pending(parts: Trainables, env: DistEnv) -> Path | None:
    """Publish the checkpoint an asynchronous save left in writing, if any (every rank calls it)."""
    pending, parts.pending = parts.pending, None
    return _publish(pending, env) if pending is not None else None


def abandon_pending(parts: Trainables) -> None:
    """On the way out after an error: wait (a bounded time: its peers may be gone) for a background
    write to end, publish nothing, remove its staging folder. The checkpoint before it stays."""
    pending, parts.pending = parts.pending, None
    if pending is None:
        return
    _join_quietly(pending.saves, ABANDON_WAIT_S)
    shutil.rmtree(staging_dir(pending.root, pending.step), ignore_errors=True)


def _gather_object(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's `obj` on every rank (a small picklable value)."""
    if not env.distributed:
        return [obj]
    import torch.distributed as dist

    every: list[Any] = [None] * env.world_size
    dist.all_gather_object(every, obj, group=env.group)
    return every


__all__ = [
    "LATEST_NAME",
    "MODEL_DCP",
    "PendingCheckpoint",
    "Trainables",
    "TrainingCheckpoint",
    "abandon_pending",
    "begin_checkpoint",
    "capture_rng_state",
    "commit_checkpoint",
    "find_valid_checkpoint",
    "finish_pending",
    "gather_full_model",
    "gather_full_state",
    "has_dcp_weights",
    "list_checkpoints",
    "load_checkpoint",
    "model_tensors",
    "load_optimizer_state",
    "load_weights_into",
    "plain_model",
    "prune_checkpoints",
    "read_sharded_weights_into",
    "read_weights_into",
    "resolve_checkpoint_path",
    "restore_optimizer",
    "restore_rng_state",
    "save_training_checkpoint",
    "step_dir_name",
    "unsharded_copy",
    "verify_checkpoint",
    "wants_async",
    "write_main_state",
    "write_model_config",
    "write_rank_state",
    "write_tensors",
]
