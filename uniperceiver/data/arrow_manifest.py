"""Prepared manifests read by index from a memory-mapped Arrow IPC file, shared by every process.

Why: a split held as a Python `list[dict]` costs about 0.9 GB per million image-caption rows in
every rank, and again in every forked loader worker as reference counts touch the pages. An Arrow
IPC file opened with `pyarrow.memory_map` is read in place: the operating system keeps one copy
of its pages in the page cache for every process on the machine, and a process only pays for the
few Python objects of the rows it is reading right now.

`<split>.arrow` sits beside `<split>.jsonl` (the JSONL stays the human-readable source) and holds
record batches of three columns:

    id         string   the sample's id (views exclude and few-shot subsets match on it)
    num_texts  int32    len(sample["texts"]), or -1 when the sample has no "texts" list
    sample     string   the sample's JSONL line, verbatim

Why the row is kept as its JSON text rather than one typed column per key: manifests differ per
dataset (a label is an int or a float, `answer_scores` has free keys, keys are optional), and
`json.loads` of the very same line is the only way to give exactly the dict the JSONL gives. The
file's schema metadata records the size and modification time of the JSONL it was made from, so
an edited or re-prepared JSONL is converted again on the next open (`is_current`).

`ArrowRows` is a `Sequence[dict]`: `len(rows)`, `rows[i]` (one JSON decode), `rows[a:b]` (a list).
`ViewRows` indexes a view (parts, excluded ids, one row per caption) with three small numpy arrays.
`find_rows(rows, ids)` finds the rows of a few ids (a saved few-shot subset) without decoding the rest.
"""

from __future__ import annotations

import bisect
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, overload

import numpy as np

from uniperceiver.errors import DataError, StorageError

if TYPE_CHECKING:
    from uniperceiver.data.format import PreparedDataset

ARROW_SUFFIX = ".arrow"
#: Schema metadata key naming this layout; a file without it (or another value) is converted again.
LAYOUT_KEY = b"upctl_manifest"
LAYOUT = b"1"
#: Rows per record batch: bounds the memory of a conversion, and a batch's offsets stay int32.
BATCH_ROWS = 65_536

#: One manifest row as the converter receives it: (id, number of texts or -1, the JSONL line).
ManifestRecord = tuple[str, int, str]


def arrow_path(jsonl: Path) -> Path:
    """Where the Arrow copy of a JSONL manifest lives: beside it, same stem."""
    return Path(jsonl).with_suffix(ARROW_SUFFIX)


def _source_stamp(jsonl: Path) -> dict[bytes, bytes]:
    st = os.stat(jsonl)
    return {b"source_size": str(st.st_size).encode(), b"source_mtime_ns": str(st.st_mtime_ns).encode()}


def is_current(jsonl: Path) -> bool:
    """True when `<split>.arrow` exists, is readable, and was made from the JSONL as it is now."""
    import pyarrow as pa

    path = arrow_path(jsonl)
    if not path.is_file():
        return False
    try:
        with pa.memory_map(str(path), "r") as source:
            meta = pa.ipc.open_file(source).schema.metadata or {}
    except (pa.ArrowException, OSError):
        return False  # truncated or foreign: convert again
    stamp = _source_stamp(jsonl)
    return meta.get(LAYOUT_KEY) == LAYOUT and all(meta.get(k) == v for k, v in stamp.items())


def _schema(stamp: dict[bytes, bytes]) -> Any:
    import pyarrow as pa

    fields = [pa.field("id", pa.string()), pa.field("num_texts", pa.int32()), pa.field("sample", pa.string())]
    return pa.schema(fields, metadata={LAYOUT_KEY: LAYOUT, **stamp})


def _batch(schema: Any, chunk: list[ManifestRecord]) -> Any:
    import pyarrow as pa

    ids, counts, lines = zip(*chunk) if chunk else ((), (), ())
    return pa.record_batch([pa.array(ids, pa.string()), pa.array(counts, pa.int32()), pa.array(lines, pa.string())],
                           schema=schema)


def write_arrow(jsonl: Path, records: Iterable[ManifestRecord]) -> Path:
    """Write `records` (the JSONL's rows, in order) as `<split>.arrow`, atomically; returns its path.

    The source stamp is taken before reading, so a JSONL replaced during the conversion is seen
    as newer on the next open. An OSError becomes a StorageError naming the file; a DataError from
    `records` (a malformed line) propagates. Either way no partial file is left.
    """
    import pyarrow as pa

    path = arrow_path(jsonl)
    schema = _schema(_source_stamp(jsonl))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise StorageError(f"{path}: could not write: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            with pa.ipc.new_file(fh, schema) as writer:
                chunk: list[ManifestRecord] = []
                for record in records:
                    chunk.append(record)
                    if len(chunk) == BATCH_ROWS:
                        writer.write_batch(_batch(schema, chunk))
                        chunk = []
                if chunk:
                    writer.write_batch(_batch(schema, chunk))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise StorageError(f"{path}: could not write: {exc.strerror or exc}") from exc
        raise
    return path


def _row_index(index: int, n: int, what: str) -> int:
    """`index` (negative counts from the end) as a row of `n`; IndexError naming `what` outside."""
    i = int(index) + n if int(index) < 0 else int(index)
    if not 0 <= i < n:
        raise IndexError(f"{what}: row {index} out of range (0..{n - 1})")
    return i


class ArrowRows(Sequence[dict]):
    """A manifest's rows by index from its memory-mapped Arrow file; `rows[i]` == JSONL row i.

    A forked loader worker reads through the mapping it inherits (the same physical pages, the same
    file even if a newer copy replaces it meanwhile; reading a row calls no Arrow code, only numpy
    and memoryview slicing); a pickled copy (spawned workers) carries only the path and maps it again.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._batches: list[Any] = []
        self._offsets: list[np.ndarray] = []
        self._data: list[memoryview] = []
        self._starts: list[int] = [0]
        self._open()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"ArrowRows({str(self.path)!r}, rows={len(self)})"

    def _open(self) -> None:
        import pyarrow as pa

        try:
            reader = pa.ipc.open_file(pa.memory_map(str(self.path), "r"))
            batches = [reader.get_batch(b) for b in range(reader.num_record_batches)]
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{self.path}: unreadable manifest file ({exc}); delete it to convert the JSONL again") from None
        if [f.name for f in reader.schema] != ["id", "num_texts", "sample"]:
            raise DataError(f"{self.path}: expected columns id, num_texts, sample; delete it to convert the JSONL again")
        for batch in batches:
            column = batch.column(2)
            _, offsets, data = column.buffers()
            n = len(column)
            self._batches.append(batch)
            self._offsets.append(np.frombuffer(offsets, dtype=np.int32, count=n + 1, offset=column.offset * 4)
                                 if n else np.zeros(1, np.int32))
            self._data.append(memoryview(data) if data is not None else memoryview(b""))
            self._starts.append(self._starts[-1] + n)

    def __len__(self) -> int:
        return self._starts[-1]

    def _line(self, index: int) -> bytes:
        b = bisect.bisect_right(self._starts, index) - 1
        offsets = self._offsets[b]
        row = index - self._starts[b]
        return self._data[b][int(offsets[row]) : int(offsets[row + 1])].tobytes()

    @overload
    def __getitem__(self, index: int) -> dict: ...

    @overload
    def __getitem__(self, index: slice) -> list[dict]: ...

    def __getitem__(self, index: int | slice) -> dict | list[dict]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return json.loads(self._line(_row_index(index, len(self), str(self.path))))

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self[i]

    def ids(self) -> list[str]:
        """Every row's id, in order (one pass over the id column; the sample text is not decoded)."""
        return [str(x) for batch in self._batches for x in batch.column(0).to_pylist()]

    def excluded_mask(self, excluded: set[str]) -> np.ndarray:
        """[rows] bool: True where the row's id is in `excluded` (compared inside Arrow, no Python strings)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if not excluded or not len(self):
            return np.zeros(len(self), dtype=bool)
        values = pa.array(sorted(excluded), pa.string())
        return np.concatenate([pc.is_in(b.column(0), value_set=values).to_numpy(zero_copy_only=False)
                               for b in self._batches])

    def find(self, ids: set[str]) -> dict[str, int]:
        """{id: row} of the rows whose id is in `ids`, the last row where an id repeats (as a dict built
        over the rows would keep). Matched inside Arrow: only the matches become Python strings."""
        import pyarrow as pa
        import pyarrow.compute as pc

        found: dict[str, int] = {}
        if not ids:
            return found
        values = pa.array(sorted(ids), pa.string())
        for start, batch in zip(self._starts, self._batches):
            mask = pc.is_in(batch.column(0), value_set=values)
            hits = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
            for row, sid in zip(hits.tolist(), pc.filter(batch.column(0), mask).to_pylist()):
                found[str(sid)] = start + row
        return found

    def num_texts(self) -> np.ndarray:
        """[rows] int32: each row's number of captions, -1 for a row without a "texts" list."""
        parts = [batch.column(1).to_numpy(zero_copy_only=False) for batch in self._batches]
        return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)


class ViewRows(Sequence[dict]):
    """A view (docs/DATA-FORMAT.md) by index: row j is part `part_of[j]`, row `row_of[j]`, and with
    `caption_of` (unit "pair") only its caption `caption_of[j]`, id "<id>#<k>" and `parent_id`."""

    def __init__(self, parts: list[ArrowRows], part_of: np.ndarray, row_of: np.ndarray,
                 caption_of: np.ndarray | None) -> None:
        self.parts = parts
        self.part_of, self.row_of, self.caption_of = part_of, row_of, caption_of

    def __len__(self) -> int:
        return len(self.row_of)

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = _row_index(index, len(self), "view")
        sample = self.parts[int(self.part_of[i])][int(self.row_of[i])]
        if self.caption_of is None:
            return sample
        sid, k = str(sample["id"]), int(self.caption_of[i])
        return {**sample, "id": f"{sid}#{k}", "texts": [sample["texts"][k]], "parent_id": sid}

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self[i]

    def find(self, ids: set[str]) -> dict[str, int]:
        """{id: view row} of the rows whose id is in `ids` ("<id>#<k>" for unit "pair"), the last where
        an id repeats. Each part is searched in Arrow for the parent ids; only the matches are decoded."""
        pair = self.caption_of is not None
        parents = {i.rpartition("#")[0] for i in ids if "#" in i} if pair else set(ids)
        found: dict[str, int] = {}
        for p, part in enumerate(self.parts):
            parent_of = {row: pid for pid, row in part.find(parents).items()}
            if not parent_of:
                continue
            hit_rows = np.fromiter(parent_of, dtype=np.int64, count=len(parent_of))
            for j in np.flatnonzero((self.part_of == p) & np.isin(self.row_of, hit_rows)).tolist():
                pid = parent_of[int(self.row_of[j])]
                sid = f"{pid}#{int(self.caption_of[j])}" if self.caption_of is not None else pid
                if sid in ids:
                    found[sid] = j
        return found


def find_rows(rows: Sequence[dict], ids: set[str]) -> dict[str, int]:
    """{id: index} of the rows of `rows` (a split's or view's `PreparedDataset.rows`) whose id is in
    `ids`, the last index where an id repeats. Arrow and view rows match without decoding the other
    rows; any other sequence (the list of the read-only fallback) is scanned."""
    if isinstance(rows, (ArrowRows, ViewRows)):
        return rows.find(ids)
    return {sid: i for i, sample in enumerate(rows) if (sid := str(sample["id"])) in ids}


def view_index(parts: list[ArrowRows], excluded: set[str], pair: bool, view: str) -> ViewRows:
    """Index the rows of `parts` in order, leaving out ids in `excluded`; with `pair`, one entry per
    caption, and a kept row without a "texts" list is a DataError naming its manifest and id."""
    part_of, row_of, caption_of = [], [], []
    for p, rows in enumerate(parts):
        keep = np.flatnonzero(~rows.excluded_mask(excluded)).astype(np.int64)
        repeat = rows.num_texts()[keep].astype(np.int64) if pair else np.ones(len(keep), np.int64)
        if pair and (repeat < 0).any():
            sid = rows[int(keep[np.argmax(repeat < 0)])]["id"]
            raise DataError(f"{rows.path.with_suffix('.jsonl')} sample {sid!r}: view {view!r} pairs captions "
                            "but the sample has no 'texts' list")
        row_of.append(np.repeat(keep, repeat))
        part_of.append(np.full(int(repeat.sum()), p, dtype=np.int16))
        if pair:
            first = np.repeat(np.cumsum(repeat) - repeat, repeat)
            caption_of.append((np.arange(int(repeat.sum())) - first).astype(np.int32))
    cat = (lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt))
    return ViewRows(parts, cat(part_of, np.int16), cat(row_of, np.int64),
                    cat(caption_of, np.int32) if pair else None)


# -- a prepared dataset's splits -------------------------------------------------------------------
def _records(dataset: PreparedDataset, split: str) -> Iterator[ManifestRecord]:
    from uniperceiver.data.format import read_manifest

    for line, sample in read_manifest(dataset.manifest_path(split), dataset.name):
        texts = sample.get("texts")
        yield str(sample["id"]), len(texts) if isinstance(texts, list) else -1, line


def manifest_rows(dataset: PreparedDataset, split: str) -> ArrowRows:
    """A prepared split's `ArrowRows`, converting its JSONL first when the Arrow file is missing or stale.

    Ranks opening a split together may each convert it; every copy is whole (os.replace) and equal.
    """
    jsonl = dataset.manifest_path(split)
    if not jsonl.is_file():
        raise DataError(f"{jsonl}: manifest missing; run `upctl prepare {dataset.name}` again")
    if not is_current(jsonl):
        write_arrow(jsonl, _records(dataset, split))
    return ArrowRows(arrow_path(jsonl))


def split_rows(dataset: PreparedDataset, split: str) -> Sequence[dict]:
    """A split's or view's rows by index (`PreparedDataset.rows`); a folder that cannot be written
    (read-only storage, full disk) gives the JSONL read into a list instead."""
    try:
        if split not in dataset.views:
            return manifest_rows(dataset, split)
        view = dataset.views[split]
        unit = view.get("unit", "sample")
        if unit not in ("sample", "pair"):
            raise DataError(f"{dataset.root / 'meta.json'}: view {split!r} has unit {unit!r}; expected 'sample' or 'pair'")
        excluded = set(manifest_rows(dataset, view["exclude"]).ids()) if view.get("exclude") else set()
        parts = [manifest_rows(dataset, part) for part in dataset.split_parts(split)]
        return view_index(parts, excluded, unit == "pair", split)
    except StorageError:
        return dataset.load_split(split)


def convert_dataset(dataset: PreparedDataset) -> list[Path]:
    """Write (or refresh) the Arrow file of every prepared split; returns their paths."""
    return [manifest_rows(dataset, split).path for split in dataset.splits]
