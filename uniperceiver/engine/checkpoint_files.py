"""The files of a training step folder: staging, writing each file hashed on its way to disk,
config.json, meta.json, the commit (one rename) and pruning; the layout is described in
train_checkpoint.py, which orchestrates a save across ranks and re-exports every name here.

Why apart: train_checkpoint.py keeps what needs the ranks (the DCP saves, collecting every rank's
sums, asynchronous saves); what one process does to a folder lives here.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from uniperceiver.engine.checkpoint_io import (
    torch_save_hashed,
    write_hashed,
    write_safetensors,
)
from uniperceiver.engine.full_state import plain_model
from uniperceiver.evaluation.checkpoints import (
    DCP_FOLDERS,
    FORMAT,
    FORMAT_V1,
    FORMAT_V2,
    LATEST_NAME,
    META_NAME,
    SHARDED_DIR,
    list_checkpoints,
)
from uniperceiver.modeling.model_dir import (
    CONFIG_NAME,
    MODEL_DCP,
    MODEL_FORMAT,
    WEIGHTS_NAME,
    dcp_weights_config,
    save_model,
)
from uniperceiver.utils.digests import CHECKPOINT_DIGEST, LEGACY_DIGEST, file_digest
from uniperceiver.utils.files import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)

if TYPE_CHECKING:
    from uniperceiver.engine.train_checkpoint import Trainables


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


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


def write_rank_state(tmp: Path, rank: int, state: dict[str, Any], *, buffered: bool = False,
                     algorithm: str = CHECKPOINT_DIGEST) -> dict[str, str]:
    """Each rank's part of the TrainState (data cursors, RNG states: they differ between ranks).

    Returns {file name: digest} (hashed while writing; {} with `buffered`, the first writer's way)."""
    name = f"rng-rank{rank}.pt"
    if buffered:
        atomic_write_bytes(tmp / name, _torch_bytes(state))
        return {}
    return {name: torch_save_hashed(tmp / name, state, algorithm)}


def write_main_state(
    tmp: Path,
    parts: Trainables,
    shared: dict[str, Any],
    full_state: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
    *,
    buffered: bool = False,
    optimizer_rest: dict[str, Any] | None = None,
) -> dict[str, str]:
    """The replicated small state (identical on every rank): written by rank 0; returns {file: digest}.

    `shared` is `TrainState.shared_dict()`. With `optimizer_rest` (the optimizer state's non-tensor
    part, `dcp_state.split_optimizer_state`; today's format) only optimizer.pt, scheduler.pt and
    trainer.pt are written here: the tensors go through DCP (`write_tensors`) and config.json is
    written at publishing (it lists the weights' digests). Without it, the format v1 writers of the
    checkpoint benchmark: the weights as model.safetensors + config.json and the whole optimizer
    state in optimizer.pt, sha256 sums; `full_state` = (model state, optimizer state) already
    gathered from a sharded (FSDP) model (`gather_full_state`), None reads both from `parts`;
    `buffered` builds each file as bytes in memory (hashed by re-reading at commit) and returns {}.
    """
    if optimizer_rest is not None:
        return {name: torch_save_hashed(tmp / name, obj) for name, obj in (
            ("optimizer.pt", optimizer_rest), ("scheduler.pt", parts.scheduler.state_dict()), ("trainer.pt", shared))}
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
    sha = LEGACY_DIGEST
    digests = {WEIGHTS_NAME: write_hashed(tmp / WEIGHTS_NAME, lambda fh: write_safetensors(fh, model_state), sha)}
    # config.json as `save_model` writes it: `load_model` can read a step folder.
    config = {"model": parts.model.cfg.to_dict(), "format": MODEL_FORMAT, "weights_sha256": digests[WEIGHTS_NAME]}
    text = json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    digests[CONFIG_NAME] = write_hashed(tmp / CONFIG_NAME, lambda fh: fh.write(text.encode("utf-8")), sha)
    for name, obj in (("optimizer.pt", optim_state), ("scheduler.pt", parts.scheduler.state_dict()),
                      ("trainer.pt", shared)):
        digests[name] = torch_save_hashed(tmp / name, obj, sha)
    return digests


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights as DCP saves them: this rank's DTensor shards under FSDP, else the live tensors
    (contiguous, no copy), keyed by state-dict name."""
    from uniperceiver.engine.distributed import is_sharded

    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model)
    return {k: v.detach() if v.is_contiguous() else v.detach().contiguous() for k, v in model.state_dict().items()}


def write_model_config(tmp: Path, cfg: Any, digests: dict[str, str]) -> dict[str, str]:
    """config.json of a step folder (rank 0, at publishing): the model config and the digest of
    every model.dcp file (from `digests`, every rank's); returns {config.json: its digest}."""
    prefix = f"{MODEL_DCP}/"
    files = {name[len(prefix):]: digest for name, digest in digests.items() if name.startswith(prefix)}
    text = json.dumps(dcp_weights_config(cfg, CHECKPOINT_DIGEST, files), indent=2, sort_keys=True,
                      ensure_ascii=False) + "\n"
    return {CONFIG_NAME: write_hashed(tmp / CONFIG_NAME, lambda fh: fh.write(text.encode("utf-8")))}


def commit_checkpoint(ckpt_root: Path, step: int, keep: int, extra_meta: dict[str, Any] | None = None,
                      digests: dict[str, str] | None = None, algorithm: str | None = None) -> Path:
    """Write meta.json with every staged file's sum, rename into place, move `latest`, prune old ones.

    `digests`: the sums already computed while writing (every rank's, DCP files as
    "<folder>/<file>"); only files missing from it are read to be hashed (the buffered writer's).
    `algorithm`: theirs; None = the format's own (today's XXH3-128; sha256 for the v1 writers)."""
    ckpt_root = Path(ckpt_root)
    tmp = staging_dir(ckpt_root, step)
    known = digests or {}
    staged = [p for p in sorted(tmp.iterdir()) if p.is_file() and not p.name.startswith(".")]
    for folder in DCP_FOLDERS:
        if (tmp / folder).is_dir():
            staged += [p for p in sorted((tmp / folder).iterdir()) if p.is_file() and not p.name.endswith(".tmp")]
    # v1 / v2: the earlier writers (benchmarks, tests of resuming older folders)
    fmt = FORMAT if (tmp / MODEL_DCP).is_dir() else FORMAT_V2 if (tmp / SHARDED_DIR).is_dir() else FORMAT_V1
    algorithm = algorithm or (CHECKPOINT_DIGEST if fmt == FORMAT else LEGACY_DIGEST)
    names = [p.relative_to(tmp).as_posix() for p in staged]
    files = {name: known.get(name) or file_digest(tmp / name, algorithm) for name in names}
    meta = {"format": fmt, "step": int(step), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "digest": algorithm,
            "files": files}
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


__all__ = [
    "begin_checkpoint", "commit_checkpoint", "model_tensors", "prune_checkpoints", "staging_dir", "step_dir_name",
    "write_main_state", "write_model_config", "write_rank_state",
]
