"""The optimizer state of a training checkpoint through torch.distributed.checkpoint (DCP).

Why: the optimizer state is the bulk of a checkpoint (AdamW keeps two tensors per parameter). Written
through DCP, every rank writes its own part in parallel (under FSDP its shard; under DDP the
replicated tensors are split between the ranks) and reads only what it needs back, on any number of
ranks; no rank ever gathers or copies the full state.

What this module adds to DCP:

- `HashingWriter` (a `FileSystemWriter`): every file a rank writes is hashed on its way to disk, so
  the sha256 sums meta.json records cost no second read;
- `SafeReader` (a `FileSystemReader`): DCP's `.metadata` file is a pickle; it is read with an
  unpickler that knows only DCP's own metadata classes, so a crafted file is refused with one line
  instead of running code (the tensors themselves are read by DCP with `weights_only=True`);
- only tensors go through DCP (no pickled "bytes" entries): the flat keys are
  `optim/<parameter name>/<state key>`; the parameter groups and the list of keys live in the small
  `optimizer.pt` beside the folder (see train_checkpoint.py).
"""

from __future__ import annotations

import hashlib
import io
import pickle
import threading
import warnings
from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from uniperceiver.errors import CheckpointError
from uniperceiver.evaluation.checkpoints import SHARDED_DIR

#: The DCP folder inside a step folder.
DCP_DIR = SHARDED_DIR
#: DCP's metadata file name inside DCP_DIR.
DCP_METADATA = ".metadata"
KEY_PREFIX = "optim/"


# -- writing: every file hashed while written ------------------------------------------------------


class _HashingStream(io.RawIOBase):
    """A writable stream that feeds every byte to sha256 on its way to the real file."""

    def __init__(self, fh: Any, on_error: Any) -> None:
        self._fh = fh
        self._sha = hashlib.sha256()
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
    """DCP's local file system, recording the sha256 of every file written (name -> digest)."""

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
    """A DCP FileSystemWriter whose files are hashed while written (`digests`: file name -> sha256)."""

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
    `wait()` on every rank before anything relies on the files: it returns {"<DCP_DIR>/<file>": sha256}
    of the files THIS rank wrote (rank 0 also writes .metadata) and raises the OSError of a failed write
    (a full disk reads as one) or one CheckpointError.
    """

    def __init__(self, folder: Path, tensors: dict[str, torch.Tensor], group: Any = None, thread_count: int = 1,
                 asynchronous: bool = False) -> None:
        self.folder = Path(folder)
        self.thread_count = thread_count
        self.writer = HashingWriter(self.folder, thread_count=thread_count)
        self._future: Any = None
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
        raise CheckpointError(f"{self.folder}: could not write the sharded optimizer state ({_first_line(exc)})") from None

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


@contextmanager
def _single_process_is_meant() -> Generator[None, None, None]:
    """Silence DCP's warning that no process group exists: one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _first_line(exc: BaseException) -> str:
    """One line saying what failed: for DCP's collected failures, the first rank's own error."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, failure = next(iter(failures.items()))
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, BaseException):
            return f"rank {rank}: {type(inner).__name__}: {_first_line(inner)}"
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


# -- reading: a metadata file cannot run code ------------------------------------------------------------


#: Every global a DCP .metadata pickle of tensors may name (module -> names); nothing else loads.
_ALLOWED: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset({
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    }),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch": frozenset({"Size"} | {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}),
    "torch.serialization": frozenset({"_get_layout"}),
    "pathlib": frozenset({"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"}),
    "collections": frozenset({"OrderedDict"}),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, fh: Any, source: Path) -> None:
        super().__init__(fh)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise CheckpointError(
            f"{self._source}: refused to load global {module}.{name} (a checkpoint cannot run code; "
            "only DCP metadata classes are allowed)"
        )


def read_metadata(folder: Path) -> Metadata:
    """DCP's metadata of `folder`, read with the restricted unpickler (CheckpointError if refused)."""
    path = Path(folder) / DCP_METADATA
    try:
        with open(path, "rb") as fh:
            meta = _MetadataUnpickler(fh, path).load()
    except CheckpointError:
        raise
    except Exception as exc:  # truncated or malformed pickles raise many types
        raise CheckpointError(f"{path}: unreadable DCP metadata ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, Metadata):
        raise CheckpointError(f"{path}: not DCP metadata (a {type(meta).__name__})")
    return meta


class SafeReader(FileSystemReader):
    """A DCP FileSystemReader whose `.metadata` goes through the restricted unpickler, and which
    reads every whole, plain tensor straight into its target's memory.

    Why the second: DCP's reader unpickles each saved tensor into a new tensor, then copies it into
    the target (two passes over the whole optimizer state, and a transient allocation per tensor).
    A DCP tensor record is a `torch.save` zip whose one storage is stored uncompressed; when it is
    exactly the target's bytes (same dtype, whole tensor, a storage of exactly its size: the writer
    saves contiguous tensors, see `split_optimizer_state`), `readinto` fills the target directly.
    Anything else (a resharded piece, a padded shard) goes through DCP's reader.
    """

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        from torch.distributed.checkpoint.metadata import StorageMeta

        meta = read_metadata(Path(self.path))
        if getattr(meta, "storage_meta", None) is None:
            meta.storage_meta = StorageMeta()
        meta.storage_meta.load_id = self.load_id
        return meta

    def read_data(self, plan: Any, planner: Any) -> Any:
        from dataclasses import replace

        by_file: dict[str, list[tuple[Any, Any]]] = {}
        for req in plan.items:
            info = self.storage_data[req.storage_index]
            by_file.setdefault(info.relative_path, []).append((req, info))
        rest = []
        for relative, items in by_file.items():
            with open(Path(self.path) / relative, "rb", buffering=0) as fh:
                for req, info in sorted(items, key=lambda item: item[1].offset):
                    if not _read_in_place(fh, req, info, planner):
                        rest.append(req)
        if rest:
            return super().read_data(replace(plan, items=rest), planner)
        done: torch.futures.Future = torch.futures.Future()
        done.set_result(None)
        return done


def _read_in_place(fh: Any, req: Any, info: Any, planner: Any) -> bool:
    """Read one whole saved tensor into its target with `readinto`; False when it does not qualify."""
    import zipfile

    from torch.distributed.checkpoint.planner import LoadItemType

    from uniperceiver.engine.checkpoint_io import _raw

    if req.type != LoadItemType.TENSOR or info.transform_descriptors:
        return False
    target = planner.resolve_tensor(req).detach()
    if target.device.type != "cpu" or not target.is_contiguous() or any(req.storage_offsets) \
            or any(req.dest_offsets) or list(req.lengths) != list(target.shape):
        return False
    try:
        archive = zipfile.ZipFile(_Slice(fh, info.offset, info.length))
        storages = [z for z in archive.infolist() if z.filename.rsplit("/", 2)[-2:-1] == ["data"]]
        order = next((z for z in archive.infolist() if z.filename.endswith("/byteorder")), None)
        little = order is None or archive.read(order) == b"little"
    except (zipfile.BadZipFile, OSError, ValueError):
        return False  # DCP's reader will say what is wrong with it
    nbytes = target.numel() * target.element_size()
    if len(storages) != 1 or storages[0].compress_type != zipfile.ZIP_STORED or storages[0].file_size != nbytes \
            or not little or not _dtype_matches(planner, req, target):
        return False
    fh.seek(info.offset + storages[0].header_offset)
    header = fh.read(30)
    start = info.offset + storages[0].header_offset + 30 + int.from_bytes(header[26:28], "little") \
        + int.from_bytes(header[28:30], "little")
    fh.seek(start)
    view, got = _raw(target), 0
    while got < nbytes:
        n = fh.readinto(view[got:])
        if not n:
            raise CheckpointError(f"{fh.name}: truncated in {req.storage_index.fqn!r}")
        got += n
    planner.commit_tensor(req, target)
    return True


def _dtype_matches(planner: Any, req: Any, target: torch.Tensor) -> bool:
    md = planner.metadata.state_dict_metadata.get(req.storage_index.fqn)
    return isinstance(md, TensorStorageMetadata) and md.properties.dtype == target.dtype


class _Slice(io.RawIOBase):
    """A read-only window [offset, offset + length) of an open file (what zipfile needs to read one
    tensor record of a DCP file)."""

    def __init__(self, fh: Any, offset: int, length: int) -> None:
        self._fh, self._start, self._length, self._pos = fh, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._length}[whence]
        self._pos = max(0, min(self._length, base + pos))
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = min(view.nbytes, self._length - self._pos)
        if n <= 0:
            return 0
        self._fh.seek(self._start + self._pos)
        got = self._fh.readinto(view[:n]) or 0
        self._pos += got
        return got


def load_tensors(folder: Path, targets: dict[str, torch.Tensor], group: Any = None) -> None:
    """Fill `targets` (flat, every key saved) in place from the DCP checkpoint in `folder`.

    Each target may be a plain tensor or a DTensor of this run's layout: DCP reads the parts each
    rank needs, whatever the number of ranks that wrote them.
    """
    try:
        with _single_process_is_meant():
            dcp.load(targets, storage_reader=SafeReader(folder), process_group=group)
    except CheckpointError:
        raise
    except CheckpointException as exc:
        inner = _inner_checkpoint_error(exc)
        if inner is not None:
            raise inner from None
        raise CheckpointError(f"{folder}: unreadable sharded optimizer state ({_first_line(exc)})") from None


def _inner_checkpoint_error(exc: CheckpointException) -> CheckpointError | None:
    for failure in getattr(exc, "failures", {}).values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, CheckpointError):
            return inner
    return None


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
