"""Streaming checkpoint files: hashed while written, read straight into the live tensors.

Why: the first checkpoint writer turned the whole state into bytes in memory (a full copy of the
model and optimizer), wrote them, then read every file back to checksum it; resuming hashed every
file again and materialised the full weights beside the model. Here

- `write_hashed` streams an object into an atomic file (utils.files: temp file, fsync, rename)
  through `HashingFile`, so the sum that meta.json records (`utils.digests`) is computed from the
  bytes as they go to disk: no copy, no second read;
- `write_safetensors` writes a model's tensors as a safetensors file tensor by tensor from the
  tensors' own memory (the format `load_model` reads; the header is built from shapes alone);
- `read_safetensors_into` reads a verified safetensors file into the model's existing parameters
  with `readinto` (no second copy of the weights in memory);
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import IO, Any, Callable

import torch

from uniperceiver.errors import CheckpointError
from uniperceiver.utils.dcp_read import tensor_bytes as _raw
from uniperceiver.utils.digests import CHECKPOINT_DIGEST, new_hasher
from uniperceiver.utils.files import atomic_write

#: torch dtype -> safetensors dtype name (the dtypes a UniPerceiver state can hold).
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_NAME_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


class HashingFile:
    """A write-only file object that feeds every byte to a hasher (`algorithm`) on its way to `fh`."""

    def __init__(self, fh: IO[bytes], algorithm: str = CHECKPOINT_DIGEST) -> None:
        self._fh = fh
        self._sha = new_hasher(algorithm)
        self.size = 0
        #: The OSError a write raised (torch.save replaces it by its own RuntimeError on the way out).
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._sha.update(view)
        self.size += view.nbytes
        try:
            return self._fh.write(view)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self._fh.flush()

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def write_hashed(path: Path, write: Callable[[HashingFile], None], algorithm: str = CHECKPOINT_DIGEST) -> str:
    """Atomically write `path` with `write(fileobj)`; returns the hex digest of what was written."""
    digest: list[str] = []

    def run(fh: IO[bytes]) -> None:
        hashed = HashingFile(fh, algorithm)
        write(hashed)
        digest.append(hashed.hexdigest())

    atomic_write(path, run)
    return digest[0]


def torch_save_hashed(path: Path, obj: Any, algorithm: str = CHECKPOINT_DIGEST) -> str:
    """`torch.save(obj)` streamed into `path` (each storage written from its own memory)."""

    def save(fh: HashingFile) -> None:
        try:
            torch.save(obj, fh)
        except RuntimeError:
            if fh.error is not None:  # a full disk, not a serialisation problem: say so
                raise fh.error from None
            raise

    return write_hashed(path, save, algorithm)


def write_safetensors(fh: IO[bytes] | HashingFile, tensors: dict[str, torch.Tensor]) -> None:
    """Write `tensors` in the safetensors format, one tensor at a time from its own memory."""
    header: dict[str, Any] = {}
    offset = 0
    names = sorted(tensors)
    for name in names:
        t = tensors[name]
        if t.dtype not in DTYPE_NAMES:
            raise CheckpointError(f"tensor {name!r}: dtype {t.dtype} cannot be written as safetensors")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the reference writer does
    fh.write(struct.pack("<Q", len(raw)))
    fh.write(raw)
    for name in names:
        fh.write(_raw(tensors[name]))


def read_safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(start of the data, header without __metadata__) of a safetensors file; CheckpointError if malformed."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its header)")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise CheckpointError(f"{path}: safetensors header of {length} bytes in a {size}-byte file")
        try:
            header = json.loads(fh.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: malformed safetensors header ({exc})") from None
    header.pop("__metadata__", None)
    return 8 + length, header


def read_safetensors_into(path: Path, targets: dict[str, torch.Tensor]) -> None:
    """Read every tensor of a (verified) safetensors file into the tensor of the same name in `targets`.

    CPU targets of the stored dtype are filled in place with `readinto`; others get a copy of one
    tensor at a time. Names and shapes must match exactly (checked from the header first).
    """
    start, header = read_safetensors_header(path)
    unknown = sorted(set(header) - set(targets))
    missing = sorted(set(targets) - set(header))
    if unknown or missing:
        raise CheckpointError(f"{path}: unexpected key(s) {unknown[:5]} / missing key(s) {missing[:5]} for this model")
    with open(path, "rb", buffering=0) as fh:
        for name, info in header.items():
            dest = targets[name]
            dtype = _NAME_DTYPES.get(info.get("dtype"))
            if dtype is None or list(info["shape"]) != list(dest.shape):
                raise CheckpointError(
                    f"{path}: key {name!r} is {info.get('dtype')} {info.get('shape')}, the model expects "
                    f"{list(dest.shape)}"
                )
            begin, end = (int(x) for x in info["data_offsets"])
            fh.seek(start + begin)
            inplace = dest.device.type == "cpu" and dest.dtype == dtype and dest.is_contiguous()
            buf = dest if inplace else torch.empty(dest.shape, dtype=dtype)
            view = _raw(buf) if buf.numel() else memoryview(b"")
            if view.nbytes != end - begin:
                raise CheckpointError(f"{path}: key {name!r} holds {end - begin} bytes, expected {view.nbytes}")
            got = 0
            while got < view.nbytes:
                n = fh.readinto(view[got:])
                if not n:
                    raise CheckpointError(f"{path}: truncated in key {name!r}")
                got += n
            if not inplace:
                with torch.no_grad():
                    dest.copy_(buf)


__all__ = [
    "DTYPE_NAMES", "HashingFile", "read_safetensors_header", "read_safetensors_into",
    "torch_save_hashed", "write_hashed", "write_safetensors",
]
