"""The tensors of a training checkpoint through torch.distributed.checkpoint (DCP): the weights
(`model.dcp/`) and the optimizer state (`optim.dcp/`).

Why: weights and optimizer state are the whole bulk of a checkpoint (AdamW keeps two tensors per
parameter). Written through DCP, every rank writes its own part in parallel (under FSDP its shards;
under DDP the replicated tensors are split between the ranks) and reads only what it needs back, on
any number of ranks; no rank ever gathers or copies the full state.

What this module adds to DCP:

- `HashingWriter` (a `FileSystemWriter`): every file a rank writes is hashed on its way to disk
  (`utils.digests`), so the sums meta.json records cost no second read;
- reading goes through `utils.dcp_read` (a restricted unpickler for `.metadata`, tensors read in
  place), shared with `load_model`, which reads a step folder's `model.dcp/` as a model folder;
- only tensors go through DCP (no pickled "bytes" entries): the weights under their state-dict
  names; the optimizer's under `optim/<parameter name>/<state key>`, the parameter groups and the
  list of keys in the small `optimizer.pt` beside the folder (see train_checkpoint.py).
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from uniperceiver.errors import CheckpointError
from uniperceiver.evaluation.checkpoints import SHARDED_DIR
from uniperceiver.utils.dcp_read import (
    DCP_METADATA,
    SINGLE_PROCESS_WARNING,
    SafeReader,
    _first_line,
    _single_process_is_meant,
    load_tensors,
    read_metadata,
)
from uniperceiver.utils.digests import CHECKPOINT_DIGEST, new_hasher

#: The optimizer's DCP folder inside a step folder.
DCP_DIR = SHARDED_DIR
KEY_PREFIX = "optim/"


# -- writing: every file hashed while written ------------------------------------------------------


class _HashingStream(io.RawIOBase):
    """A writable stream that feeds every byte to the checkpoint hasher on its way to the real file."""

    def __init__(self, fh: Any, on_error: Any) -> None:
        self._fh = fh
        self._sha = new_hasher(CHECKPOINT_DIGEST)
        self._on_error = on_error

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._sha.update(view)
        try:
            self._fh.write(view)
        except OSError as exc:
            self._on_error(exc)
            raise
        return view.nbytes

    def tell(self) -> int:
        return self._fh.tell()

    def flush(self) -> None:
        self._fh.flush()

    def fileno(self) -> int:
        return self._fh.fileno()

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


class HashingFileSystem(FileSystem):
    """DCP's local file system, recording the digest of every file written (name -> digest)."""

    def __init__(self) -> None:
        super().__init__()
        self.digests: dict[str, str] = {}
        #: The first OSError a write raised (DCP wraps it in its own exception on the way out).
        self.error: OSError | None = None
        self._lock = threading.Lock()

    def _failed(self, exc: OSError) -> None:
        with self._lock:
            self.error = self.error or exc

    @contextmanager
    def create_stream(self, path: Any, mode: str) -> Generator[io.IOBase, None, None]:
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        path = Path(path)
        try:
            fh = path.open(mode)
        except OSError as exc:
            self._failed(exc)
            raise
        with fh:
            stream = _HashingStream(fh, self._failed)
            yield stream  # type: ignore[misc]
        with self._lock:
            self.digests[path.name] = stream.hexdigest()

    def rename(self, path: Any, new_path: Any) -> None:
        super().rename(path, new_path)
        with self._lock:  # the coordinator writes .metadata under a temporary name first
            if Path(path).name in self.digests:
                self.digests[Path(new_path).name] = self.digests.pop(Path(path).name)


class HashingWriter(FileSystemWriter):
    """A DCP FileSystemWriter whose files are hashed while written (`digests`: file name -> hex digest)."""

    def __init__(self, path: Path, thread_count: int = 1) -> None:
        super().__init__(path, thread_count=thread_count, sync_files=True, overwrite=False)
        self.fs = HashingFileSystem()

    @property
    def digests(self) -> dict[str, str]:
        return dict(self.fs.digests)


class DcpSave:
    """One DCP save of a flat dict of tensors into `folder`, synchronous or asynchronous; a collective.

    Asynchronous (`dcp.async_save`): the tensors are first copied to CPU memory (staging), then written
    by a background thread, so training may go on changing the live tensors; `wait()` joins it. Call
    `wait()` on every rank before anything relies on the files: it returns {"<folder name>/<file>": digest}
    of the files THIS rank wrote (rank 0 also writes .metadata) and raises the OSError of a failed write
    (a full disk reads as one) or one CheckpointError.
    """

    def __init__(self, folder: Path, tensors: dict[str, torch.Tensor], group: Any = None, thread_count: int = 1,
                 asynchronous: bool = False) -> None:
        self.folder = Path(folder)
        self.thread_count = thread_count
        self.writer = HashingWriter(self.folder, thread_count=thread_count)
        self._future: Any = None
        if asynchronous and group is None:
            # An asynchronous save of one process warns from DCP's own thread, which a catch_warnings
            # block here cannot reach: that one message is ignored for the rest of the process.
            warnings.filterwarnings("ignore", message=SINGLE_PROCESS_WARNING, category=UserWarning)
        try:
            with _single_process_is_meant():
                if asynchronous:
                    self._future = dcp.async_save(tensors, storage_writer=self.writer, process_group=group)
                else:
                    dcp.save(tensors, storage_writer=self.writer, process_group=group)
        except CheckpointException as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if self.writer.fs.error is not None:
            raise self.writer.fs.error from None
        raise CheckpointError(f"{self.folder}: could not write the sharded state ({_first_line(exc)})") from None

    def wait(self, timeout_s: float | None = None) -> dict[str, str]:
        """Join the write (asynchronous) and check that every file of this rank was written; a write
        still running after `timeout_s` is a CheckpointError (it is left to finish on its own)."""
        future, self._future = self._future, None
        if future is not None:
            try:
                future.result(timeout=timeout_s)
            except (Exception, CheckpointException) as exc:  # DCP wraps failures in a BaseException
                self._fail(exc)
        # DCP's extra writer threads die on an error without telling the caller: check their files too
        if self.writer.fs.error is not None:
            raise self.writer.fs.error
        written = [name for name in self.writer.digests if name.endswith(".distcp")]
        if len(written) != self.thread_count:
            raise CheckpointError(f"{self.folder}: {self.thread_count - len(written)} of this rank's "
                                  f"{self.thread_count} DCP file(s) were not written (a writer thread failed)")
        return {f"{self.folder.name}/{name}": digest for name, digest in self.writer.digests.items()}


def save_tensors(folder: Path, tensors: dict[str, torch.Tensor], group: Any = None,
                 thread_count: int = 1) -> dict[str, str]:
    """Write `tensors` (a flat dict) as a DCP checkpoint in `folder` now; see `DcpSave.wait`."""
    return DcpSave(folder, tensors, group, thread_count).wait()


# -- the optimizer state, flat -------------------------------------------------------------------------


def param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of every optimizer parameter, in `optimizer.state_dict()`'s index order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def split_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(flat tensors for DCP, the small rest) of `optimizer`'s state; no tensor is copied.

    The rest holds the parameter groups (index-keyed, as `optimizer.state_dict()`), each parameter
    index's name and the keys of its state (tensor keys go to DCP, other values stay here).
    """
    full = optimizer.state_dict()
    names = param_names(model, optimizer)
    tensors: dict[str, torch.Tensor] = {}
    keys: dict[int, list[str]] = {}
    plain: dict[int, dict[str, Any]] = {}
    for index, entry in full["state"].items():
        name = names[int(index)]
        keys[int(index)] = []
        for key, value in entry.items():
            if torch.is_tensor(value):
                # contiguous, so that each record holds the tensor's bytes in order (no copy: they are)
                tensors[f"{KEY_PREFIX}{name}/{key}"] = value.detach() if value.is_contiguous() else value.contiguous()
                keys[int(index)].append(key)
            else:
                plain.setdefault(int(index), {})[key] = value
    rest = {"param_groups": full["param_groups"], "names": names, "tensor_keys": keys, "plain": plain}
    return tensors, rest


def _target_like(meta: TensorStorageMetadata, param: torch.Tensor | None) -> torch.Tensor:
    """An empty tensor to read one saved state tensor into: laid out like its parameter when it has
    the parameter's shape (a DTensor shard under FSDP), else a plain CPU tensor of the saved shape."""
    dtype = meta.properties.dtype
    if param is not None and tuple(param.shape) == tuple(meta.size):
        return torch.empty_like(param, dtype=dtype)
    device = param.device if param is not None and not hasattr(param, "device_mesh") else torch.device("cpu")
    return torch.empty(tuple(meta.size), dtype=dtype, device=device)


def read_optimizer_state(folder: Path, rest: dict[str, Any], model: torch.nn.Module | None,
                         optimizer: torch.optim.Optimizer | None, group: Any = None) -> dict[str, Any]:
    """The optimizer state dict (index-keyed, `optimizer.load_state_dict` ready) read from `folder`.

    With `model` and `optimizer` the tensors are laid out like this run's parameters (and indexed by
    this run's parameter order); without, every tensor is read whole on the CPU (inspection, tests).
    """
    names: list[str] = list(rest.get("names", []))
    meta = read_metadata(folder)
    params = dict(model.named_parameters()) if model is not None else {}
    now = {n: i for i, n in enumerate(param_names(model, optimizer))} if model is not None and optimizer is not None \
        else {n: i for i, n in enumerate(names)}
    targets: dict[str, torch.Tensor] = {}
    for index, keys in rest.get("tensor_keys", {}).items():
        name = names[int(index)]
        for key in keys:
            flat = f"{KEY_PREFIX}{name}/{key}"
            md = meta.state_dict_metadata.get(flat)
            if not isinstance(md, TensorStorageMetadata):
                raise CheckpointError(f"{folder}: the sharded optimizer state lacks {flat!r}")
            targets[flat] = _target_like(md, params.get(name))
    if targets:
        load_tensors(folder, targets, group)
    state: dict[int, dict[str, Any]] = {}
    for index, keys in rest.get("tensor_keys", {}).items():
        name = names[int(index)]
        if name not in now:
            raise CheckpointError(f"{folder}: optimizer state for parameter {name!r}, which this model does not train")
        entry = {key: targets[f"{KEY_PREFIX}{name}/{key}"] for key in keys}
        entry.update(rest.get("plain", {}).get(index, {}))
        state[now[name]] = entry
    # saved parameter index -> this run's index of the same parameter (the same when nothing moved)
    groups = [{**g, "params": [now.get(names[int(i)], int(i)) if int(i) < len(names) else int(i) for i in g["params"]]}
              for g in rest.get("param_groups", [])]
    return {"state": state, "param_groups": groups}


__all__ = [
    "DCP_DIR", "DCP_METADATA", "DcpSave", "HashingWriter", "SafeReader", "load_tensors", "param_names",
    "read_metadata", "read_optimizer_state", "save_tensors", "split_optimizer_state",
]
