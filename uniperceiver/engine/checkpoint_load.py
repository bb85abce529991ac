"""Reading a training step folder back: the TrainState, the optimizer state (formats v2 and v3
through DCP, each rank its own part; format v1 from optimizer.pt), the weights straight into a model
(v3 from the DCP folder model.dcp/, v1 and v2 from model.safetensors).

Why apart from train_checkpoint.py (the writing side): a resume needs none of the writers, and each
side stays small enough to read in one sitting. `train_checkpoint` re-exports every name here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file

from uniperceiver.engine import dcp_state
from uniperceiver.engine.checkpoint_io import read_safetensors_into
from uniperceiver.engine.full_state import check_groups, load_optimizer_state
from uniperceiver.engine.train_state import TrainState
from uniperceiver.errors import CheckpointError
from uniperceiver.evaluation.checkpoints import (
    FORMAT,
    FORMAT_V2,
    LATEST_NAME,
    META_NAME,
    SHARDED_DIR,
    HashFiles,
    Warn,
    find_valid_checkpoint,
    list_checkpoints,
    verify_checkpoint,
)
from uniperceiver.modeling.model import UniPerceiver
from uniperceiver.modeling.model_dir import (
    MODEL_DCP,
    WEIGHTS_NAME,
    check_dcp_weights_fit,
    check_state_fits,
    read_config,
    read_dcp_weights_into,
)
from uniperceiver.utils import dcp_read

if TYPE_CHECKING:
    from uniperceiver.engine.distributed import DistEnv


def torch_load(path: Path) -> Any:
    """`torch.load(weights_only=True)` on the CPU: tensors and plain containers only, never code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors, truncated zip files
        raise CheckpointError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None


@dataclass
class TrainingCheckpoint:
    """What `load_checkpoint` read back (every state on CPU); `state` is the saved TrainState.

    The weights are read only when asked for (`model_state`, or `read_weights_into` straight into a
    model's parameters): resuming never holds a second full copy of them.
    """

    path: Path
    step: int
    meta: dict[str, Any]
    #: optimizer.pt as saved: the whole optimizer state (format v1) or its non-tensor part (v2).
    optimizer_file: dict[str, Any]
    scheduler: dict[str, Any]
    state: TrainState
    _weights: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    _optimizer: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def sharded_optimizer(self) -> bool:
        """True when the optimizer's tensors are in the DCP folder (formats v2 and v3)."""
        return self.meta.get("format") in (FORMAT_V2, FORMAT)

    @property
    def optimizer(self) -> dict[str, Any]:
        """The whole optimizer state, index-keyed as `optimizer.state_dict()`, on the CPU (inspection:
        a resume uses `restore_optimizer`, which reads each rank's part in place)."""
        if self._optimizer is None:
            self._optimizer = (dcp_state.read_optimizer_state(self.path / SHARDED_DIR, self.optimizer_file, None, None)
                               if self.sharded_optimizer else self.optimizer_file)
        return self._optimizer

    @property
    def model_state(self) -> dict[str, torch.Tensor]:
        """The weights as a state dict (read from model.dcp/ or model.safetensors on first use)."""
        if self._weights is None and has_dcp_weights(self.path):
            self._weights = dcp_read.read_state_dict(self.path / MODEL_DCP)
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
    shared = torch_load(path / "trainer.pt")
    mine = torch_load(rank_file) if rank_file.is_file() else None
    saved_world = shared.get("world_size") if isinstance(shared, dict) else None
    peers = None
    if world_size is not None and isinstance(saved_world, int) and saved_world != world_size:
        files = [path / f"rng-rank{r}.pt" for r in range(saved_world)]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"cannot resume {path} on {world_size} rank(s): it lacks {', '.join(absent)} of "
                                  f"the {saved_world} ranks that wrote it; resume with {saved_world} rank(s)")
        peers = [torch_load(f) for f in files]
    return TrainingCheckpoint(
        path=path,
        step=int(meta["step"]),
        meta=meta,
        optimizer_file=torch_load(path / "optimizer.pt"),
        scheduler=torch_load(path / "scheduler.pt"),
        state=TrainState.from_dicts(shared, mine, str(path), peers),
    )


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / META_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path / META_NAME}: unreadable ({exc})") from None


def read_weights_into(model: UniPerceiver, path: Path) -> None:
    """Copy a verified step folder's weights straight into `model`'s parameters and buffers
    (no intermediate state dict); names and shapes are checked against the saved ones first.

    Every rank reads the whole weights on its own (DCP's no-process-group read): the trainer reads
    them into the plain model before wrapping it, as every rank builds the whole model anyway, and
    FSDP then keeps each rank's shard."""
    if has_dcp_weights(path):
        read_dcp_weights_into(model, Path(path) / MODEL_DCP)
        return
    read_safetensors_into(Path(path) / WEIGHTS_NAME, model.state_dict())


def has_dcp_weights(path: Path) -> bool:
    """Whether a step folder keeps its weights in model.dcp/ (format v3)."""
    return (Path(path) / MODEL_DCP / dcp_read.DCP_METADATA).is_file()


def read_sharded_weights_into(model: torch.nn.Module, path: Path, env: DistEnv) -> None:
    """Under FSDP, after wrapping: every rank reads only its own shards of a format v3 step folder's
    weights (a collective); names and shapes are checked against the saved ones first.

    Why not `read_weights_into` before wrapping: that reads the whole weights on every rank, N times
    the bytes for N ranks; DCP reads each rank's shards wherever the writing ranks put them."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        set_model_state_dict,
    )

    folder = Path(path) / MODEL_DCP
    check_dcp_weights_fit(model, folder)
    state = get_model_state_dict(model)
    dcp_read.load_tensors(folder, state, env.group if env.distributed else None)
    set_model_state_dict(model, state)


def restore_optimizer(saved: TrainingCheckpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      env: DistEnv | None = None) -> None:
    """Put a checkpoint's optimizer state into `optimizer`: format v2 reads, through DCP, only the
    parts this rank holds (laid out like its parameters: shards under FSDP) straight into new state
    tensors; format v1 loads optimizer.pt."""
    if not saved.sharded_optimizer:
        load_optimizer_state(model, optimizer, saved.optimizer_file, str(saved.path))
        return
    check_groups(saved.optimizer_file, optimizer, str(saved.path))
    group = env.group if env is not None and env.distributed else None
    state = dcp_state.read_optimizer_state(saved.path / SHARDED_DIR, saved.optimizer_file, model, optimizer, group)
    optimizer.load_state_dict(state)


def load_weights_into(model: UniPerceiver, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy a checkpoint's weights into an existing model after checking names and shapes."""
    check_state_fits(model, state, source)
    model.load_state_dict(state)


def resolve_checkpoint_path(path: str | Path, warn: Warn | None = None, hasher: HashFiles | None = None) -> Path:
    """`--resume PATH`: a step folder, a `checkpoints/` folder or a run folder -> a verified step folder
    (`hasher`: see `verify_checkpoint`)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"--resume {path}: no such file or folder")
    if (p / META_NAME).is_file():
        verify_checkpoint(p, hasher)
        return p
    for root in (p, p / "checkpoints"):
        if root.is_dir() and (list_checkpoints(root) or (root / LATEST_NAME).is_file()):
            found = find_valid_checkpoint(root, warn, hasher=hasher)
            if found is not None:
                return found
            raise CheckpointError(f"--resume {path}: no valid checkpoint under {root}")
    raise CheckpointError(f"--resume {path}: not a checkpoint folder (no {META_NAME}, no step-* folders)")


__all__ = [
    "TrainingCheckpoint", "has_dcp_weights", "load_checkpoint", "load_weights_into", "read_sharded_weights_into",
    "read_weights_into", "resolve_checkpoint_path", "restore_optimizer", "torch_load",
]
