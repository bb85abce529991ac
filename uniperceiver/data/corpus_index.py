"""Random access to the non-blank lines of a streamed text corpus: a line index built once, memory-mapped.

Why: pre-training samples a BooksWiki-size corpus (tens of GB) like every other task, through a seeded
permutation per epoch and a cursor saved in checkpoints, so it needs "line i" for any i without holding
the corpus. The index is one int64 byte offset per non-blank line, written beside the manifest
(`<dataset>/index/<split>.lines.npy`) and memory-mapped: its pages belong to the OS page cache, not to the
process's heap, so a loader's memory does not grow with the corpus. It is rebuilt when a text file's size
or modification time changes, and checked against the manifest's line counts.

Lines are split on "\\n" only and a line is blank when `str.strip()` leaves nothing, exactly as
`format.iter_corpus_lines` and the bookswiki preparer count them. Reads use `os.pread` (no shared file
position), so data-loader workers forked from one process can share the open files.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

import numpy as np

from uniperceiver.errors import DataError
from uniperceiver.utils.files import atomic_write, atomic_write_json

_CHUNK = 1 << 20  # bytes read per step while scanning a file (bounds the scan's memory: ~10 MB)
_PRINTABLE = np.zeros(256, dtype=bool)
_PRINTABLE[0x21:0x7F] = True  # printable ASCII other than space
_MAX_OPEN = 64  # open text files kept per process


def _scan_file(path: Path) -> np.ndarray:
    """Byte offsets of the non-blank lines of one file.

    Vectorised: a line holding a printable ASCII byte (0x21-0x7E) is non-blank; only the others
    (empty, whitespace, or non-ASCII only) are decoded and stripped in Python.
    """
    found: list[np.ndarray] = []
    carry = b""
    base = 0  # file offset of carry[0]
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(_CHUNK)
            buf = carry + chunk
            if not buf:
                break
            arr = np.frombuffer(buf, dtype=np.uint8)
            newlines = np.flatnonzero(arr == 10)
            ends = newlines if chunk else np.append(newlines, arr.size)  # at EOF the tail is a line
            if ends.size:
                starts = np.concatenate(([0], ends[:-1] + 1))
                printable = np.concatenate(([0], np.cumsum(_PRINTABLE[arr], dtype=np.int32)))
                keep = printable[ends] > printable[starts]
                for k in np.flatnonzero(~keep):  # the rare lines without printable ASCII: decide exactly
                    text = buf[starts[k]:ends[k]].decode("utf-8", errors="replace")
                    keep[k] = bool(text.strip())
                found.append(starts[keep].astype(np.int64) + base)
                cut = int(ends[-1]) + 1
            else:
                cut = 0
            if not chunk:
                break
            carry = buf[cut:]
            base += cut
    return np.concatenate(found) if found else np.empty(0, dtype=np.int64)


class CorpusIndex:
    """The non-blank lines of one split of a text-file corpus, addressable by global line number."""

    def __init__(self, files: list[Path], file_starts: np.ndarray, npy: Path, sizes: list[int],
                 stamps: list | None = None) -> None:
        self.files = files
        self.file_starts = file_starts  # [F + 1] cumulative line counts
        self.npy = npy
        self.offsets = np.load(npy, mmap_mode="r")  # [N] byte offsets, memory-mapped
        self._starts = np.asarray(self.offsets)  # the same pages as a plain array: indexing a np.memmap costs more
        self.sizes = sizes
        #: [path, size, mtime_ns] per file: what the index was built from (caches derived from it compare these)
        self.stamps = stamps if stamps is not None else []
        self._fds: OrderedDict[int, int] = OrderedDict()

    # -- building / opening --------------------------------------------------------------------------
    @classmethod
    def open(cls, dataset, split: str) -> "CorpusIndex":
        """The index of `split`, built (or rebuilt when a file changed) under `<dataset>/index/`."""
        entries = [s for s in dataset.samples(split) if "text_file" in s]
        if not entries:
            raise DataError(f"{dataset.manifest_path(split)}: no text_file samples to index (not a streamed corpus)")
        files = [dataset.media_path({"id": s["id"], "media": s["text_file"]}) for s in entries]
        stamps = []
        for path in files:
            try:
                st = path.stat()
            except OSError as exc:
                raise DataError(f"{path}: cannot read the corpus file ({exc.strerror}); run `upctl prepare` again") from None
            stamps.append([str(path), st.st_size, st.st_mtime_ns])
        where = Path(dataset.root) / "index"
        npy, meta_path = where / f"{split}.lines.npy", where / f"{split}.lines.json"
        meta = None
        if npy.is_file() and meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                meta = None
        if meta is None or meta.get("files") != stamps:
            meta = cls._build(files, [int(s.get("lines", 0)) for s in entries], stamps, npy, meta_path)
        starts = np.asarray(meta["file_starts"], dtype=np.int64)
        index = cls(files, starts, npy, [s[1] for s in stamps], stamps)
        if index.offsets.shape != (int(starts[-1]),):
            raise DataError(f"{npy}: holds {index.offsets.shape[0]:,} offsets, its metadata {int(starts[-1]):,}; "
                            f"delete {where} to rebuild it")
        return index

    @staticmethod
    def _build(files: list[Path], expected: list[int], stamps: list, npy: Path, meta_path: Path) -> dict:
        parts = []
        for path, want in zip(files, expected):
            found = _scan_file(path)
            if want and found.size != want:
                raise DataError(f"{path}: the manifest counts {want:,} non-blank lines, the file has {found.size:,}; "
                                "the file changed since `upctl prepare`: prepare the dataset again")
            parts.append(found)
        offsets = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
        starts = np.concatenate(([0], np.cumsum([p.size for p in parts]))).astype(np.int64)
        npy.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(npy, lambda fh: np.save(fh, offsets))
        meta = {"files": stamps, "file_starts": starts.tolist()}
        atomic_write_json(meta_path, meta)
        return meta

    # -- reading -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.file_starts[-1])

    def line(self, i: int) -> str:
        """Non-blank line `i` (0-based over the split), stripped."""
        n = len(self)
        if not 0 <= i < n:
            raise IndexError(f"line {i} outside the corpus's {n:,} non-blank lines")
        f = int(np.searchsorted(self.file_starts, i, side="right")) - 1
        start = int(self.offsets[i])
        end = int(self.offsets[i + 1]) if i + 1 < int(self.file_starts[f + 1]) else self.sizes[f]
        data = os.pread(self._fd(f), end - start, start)
        return data.split(b"\n", 1)[0].decode("utf-8", errors="replace").strip()

    def read_lines(self, start: int, count: int) -> list[str]:
        """Non-blank lines start .. start + count - 1 (no wrap), stripped, with one read per file.

        Why not `line()` in a loop: a window or a tokenising pass wants runs of neighbouring lines,
        and one `pread` of their byte range costs about what one line does.
        """
        n = len(self)
        if count < 0 or not 0 <= start <= start + count <= n:
            raise IndexError(f"lines {start}..{start + count - 1} outside the corpus's {n:,} non-blank lines")
        out: list[str] = []
        i, stop = start, start + count
        while i < stop:
            f = int(self.file_starts.searchsorted(i, side="right")) - 1
            last = min(stop, int(self.file_starts[f + 1])) - 1  # the last wanted line in this file
            begin = int(self._starts[i])
            end = int(self._starts[last + 1]) if last + 1 < int(self.file_starts[f + 1]) else self.sizes[f]
            data = os.pread(self._fd(f), end - begin, begin)
            want = last - i + 1
            # One decode for the run: "\n" never sits inside a UTF-8 sequence, so this equals decoding per line.
            found = [t for t in map(str.strip, data.decode("utf-8", errors="replace").split("\n")) if t]
            if len(found) != want:
                raise DataError(f"{self.files[f]}: found {len(found):,} non-blank lines where lines {i:,}..{last:,} "
                                "were indexed; the file changed since: prepare the dataset again")
            out += found
            i = last + 1
        return out

    def lines_from(self, i: int) -> Iterator[str]:
        """Lines i, i + 1, ... to the end of the split, then from line 0 again (the corpus wraps)."""
        n = len(self)
        for k in range(n):
            yield self.line((i + k) % n)

    def _fd(self, f: int) -> int:
        fd = self._fds.get(f)
        if fd is None:
            if len(self._fds) >= _MAX_OPEN:
                os.close(self._fds.popitem(last=False)[1])
            try:
                fd = os.open(self.files[f], os.O_RDONLY)
            except OSError as exc:
                raise DataError(f"{self.files[f]}: cannot open the corpus file ({exc.strerror})") from None
            self._fds[f] = fd
        else:
            self._fds.move_to_end(f)
        return fd

    def __getstate__(self) -> dict:  # for spawned workers: neither descriptors nor the mapping travel
        state = dict(self.__dict__)
        state["_fds"] = OrderedDict()
        state["offsets"] = state["_starts"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.offsets = np.load(self.npy, mmap_mode="r")
        self._starts = np.asarray(self.offsets)

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass


__all__ = ["CorpusIndex"]
