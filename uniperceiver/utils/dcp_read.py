"""Reading a torch.distributed.checkpoint (DCP) folder safely and without extra copies.

Why in utils (below modeling): a training step folder keeps its weights as a DCP folder, and
`load_model` reads step folders as model folders, so the reader cannot live in the engine. What
it adds to DCP's own FileSystemReader:

- DCP's `.metadata` file is a pickle; it is read with an unpickler that knows only DCP's own
  metadata classes, so a crafted file is refused with one line instead of running code (the tensors
  themselves are read by DCP with `weights_only=True`);
- every whole, plain CPU tensor is read straight into its target's memory with `readinto`
  (`SafeReader`), instead of DCP's unpickle-then-copy.
"""

from __future__ import annotations

import io
import pickle
import warnings
from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from uniperceiver.errors import CheckpointError

#: DCP's metadata file name inside a DCP folder.
DCP_METADATA = ".metadata"


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor without copying it (contiguous tensors; others are copied once)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


#: The start of DCP's warning that no process group exists: one process is a supported case here.
SINGLE_PROCESS_WARNING = "torch.distributed is disabled"


@contextmanager
def _single_process_is_meant() -> Generator[None, None, None]:
    """Silence DCP's warning that no process group exists, for the calls made inside the block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=SINGLE_PROCESS_WARNING, category=UserWarning)
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
    view, got = tensor_bytes(target), 0
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


def load_tensors(folder: Path, targets: dict[str, torch.Tensor], group: Any = None, *, no_dist: bool = False) -> None:
    """Fill `targets` (flat, every key saved) in place from the DCP checkpoint in `folder`.

    Each target may be a plain tensor or a DTensor of this run's layout: DCP reads the parts each
    rank needs, whatever the number of ranks that wrote them.
    """
    try:
        with _single_process_is_meant():
            dcp.load(targets, storage_reader=SafeReader(folder), process_group=group, no_dist=no_dist)
    except CheckpointError:
        raise
    except CheckpointException as exc:
        inner = _inner_checkpoint_error(exc)
        if inner is not None:
            raise inner from None
        raise CheckpointError(f"{folder}: unreadable DCP checkpoint ({_first_line(exc)})") from None


def _inner_checkpoint_error(exc: CheckpointException) -> CheckpointError | None:
    for failure in getattr(exc, "failures", {}).values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, CheckpointError):
            return inner
    return None

def read_state_dict(folder: Path, *, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP folder (or only `keys`), whole and on the CPU, in one process."""
    meta = read_metadata(folder)
    wanted = keys if keys is not None else [k for k, md in meta.state_dict_metadata.items()
                                            if isinstance(md, TensorStorageMetadata)]
    targets: dict[str, torch.Tensor] = {}
    for key in wanted:
        md = meta.state_dict_metadata.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise CheckpointError(f"{folder}: the DCP checkpoint holds no tensor {key!r}")
        targets[key] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
    if targets:
        load_tensors(folder, targets, no_dist=True)
    return targets


__all__ = ["DCP_METADATA", "SafeReader", "load_tensors", "read_metadata", "read_state_dict", "tensor_bytes"]
