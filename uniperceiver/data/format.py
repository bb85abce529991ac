"""The prepared-dataset format (docs/DATA-FORMAT.md): the contract between preparers, loaders and tasks.

`<data_dir>/<dataset>/meta.json` + one JSON-lines manifest per split. Media stay where the user
downloaded them (`meta["raw_root"]`); manifests hold paths relative to that root, so a prepared
folder is small, can be re-created at any time, and never duplicates images or videos.

Write side: `ManifestWriter` (one split, atomic) and `write_meta`. Read side: `open_dataset` ->
`PreparedDataset` (streams manifests, refuses media paths that escape the raw root; `rows(split)`
reads them by index from a memory-mapped Arrow copy, data/arrow_manifest.py) and
`iter_corpus_lines` (huge text corpora, streamed line by line). `prepare_dataset` runs a preparer.

Views (`meta["views"]`, e.g. {"trainval": {"parts": ["train", "val"], "exclude": "minval", "unit":
"pair", "num_samples": 52010, "fewshot_rule": "per_pair"}}) are named, read-only combinations of
manifests that cost no disk: the reference's training pools (COCO train + val; VQAv2 train + val
minus a held-out "minval" + Visual Genome QA). `parts` are streamed in order, `exclude` drops the
ids of another split, unit "pair" yields one sample per caption ("<id>#<k>", texts [caption k],
"parent_id" <id>: the reference's flattened (video, caption) list). A view opens like a split.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator, Iterable, Sequence, cast

from uniperceiver.errors import StorageError, DataError
from uniperceiver.utils.files import atomic_write_json, sha256_file
from uniperceiver.utils.progress import Progress

FORMAT_VERSION = 1
META_FILE = "meta.json"
SPLITS_DIR = "splits"


# Skip reasons produced by media checks; summaries add them up as missing / unreadable media.
MISSING_REASONS = ("missing_media",)
UNREADABLE_REASONS = ("empty_media", "unreadable_media", "bad_format_media")

_SPLIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_CANONICAL_SPLITS = ("train", "val", "test")
_MAX_EXAMPLES = 5


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """`--data-dir` if given, else `$UPCTL_DATA`, else `./data` (absolute, `~` expanded)."""
    if data_dir is None or str(data_dir) == "":
        data_dir = os.environ.get("UPCTL_DATA") or "data"
    return Path(data_dir).expanduser().absolute()


def sort_splits(names: list[str] | Any) -> list[str]:
    """train, val, test first (the order users expect), then the rest alphabetically."""
    names = list(names)
    head = [s for s in _CANONICAL_SPLITS if s in names]
    return head + sorted(s for s in names if s not in _CANONICAL_SPLITS)


def check_relative_media(media: Any, where: str) -> str:
    """A manifest media path must be a non-empty relative path that stays under the raw root."""
    if not isinstance(media, str) or not media:
        raise DataError(f"{where}: 'media' must be a non-empty relative path string, got {media!r}")
    if os.path.isabs(media) or media.startswith(("/", "\\")):
        raise DataError(f"{where}: media path {media!r} is absolute; manifests hold paths relative to raw_root")
    norm = os.path.normpath(media)
    if norm == ".." or norm.startswith(".." + os.sep) or norm.startswith("../"):
        raise DataError(f"{where}: media path {media!r} escapes the raw root")
    return media


# --------------------------------------------------------------------------------------------
# read side


def read_manifest(path: Path, dataset: str) -> Iterator[tuple[str, dict]]:
    """(line, sample) for each non-blank line of a JSONL manifest, checked: a JSON object with an
    "id", a media path inside the raw root; anything else is a DataError naming file:line."""
    if not path.is_file():
        raise DataError(f"{path}: manifest missing; run `upctl prepare {dataset}` again")
    with open(path, "r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                sample = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
            if not isinstance(sample, dict) or "id" not in sample:
                raise DataError(f"{path}:{lineno}: expected a JSON object with an 'id' key")
            if "media" in sample:
                check_relative_media(sample["media"], f"{path}:{lineno}")
            yield line.strip(), sample


class PreparedDataset:
    """A prepared dataset folder: its meta and streamed access to its manifests."""

    def __init__(self, name: str, root: Path, meta: dict) -> None:
        self.name = name
        self.root = Path(root)
        self.meta = meta

    def __repr__(self) -> str:
        return f"PreparedDataset({self.name!r}, root={str(self.root)!r}, splits={self.splits})"

    @property
    def raw_root(self) -> Path:
        return Path(self.meta["raw_root"])

    @property
    def splits(self) -> list[str]:
        return sort_splits(self.meta.get("splits", {}))

    @property
    def classes(self) -> list[str] | None:
        return (self.meta.get("targets") or {}).get("classes")

    @property
    def answers(self) -> list[str] | None:
        return (self.meta.get("targets") or {}).get("answers")

    @property
    def synonyms(self) -> list[list[str]] | None:
        return (self.meta.get("targets") or {}).get("synonyms")

    @property
    def media_type(self) -> str:
        return self.meta.get("media_type", "mixed")

    @property
    def views(self) -> dict[str, dict]:
        """Named combinations of splits (module docstring), e.g. the reference's training pools."""
        return dict(self.meta.get("views") or {})

    def has_split(self, split: str) -> bool:
        """True for a prepared split or a view."""
        return split in self.meta.get("splits", {}) or split in self.views

    def num_samples(self, split: str) -> int:
        self._check_split(split)
        if split in self.views:
            return int(self.views[split]["num_samples"])
        return int(self.meta["splits"][split])

    def manifest_path(self, split: str) -> Path:
        self._check_split(split)
        if split in self.views:
            raise DataError(f"dataset {self.name!r}: {split!r} is a view of {self.split_parts(split)}, not a manifest")
        return self.root / f"{split}.jsonl"

    def split_parts(self, split: str) -> list[str]:
        """The manifests `split` reads: the parts of a view, else the split itself."""
        self._check_split(split)
        return [str(p) for p in self.views[split]["parts"]] if split in self.views else [split]

    def _check_split(self, split: str) -> None:
        if not self.has_split(split):
            views = f"; views: {', '.join(sorted(self.views))}" if self.views else ""
            raise DataError(
                f"dataset {self.name!r} has no split {split!r} "
                f"(prepared splits: {', '.join(self.splits) or 'none'}{views})"
            )

    def split_digest(self, split: str) -> str:
        """sha256 of what `split` reads: the manifest file, or a view's definition and its parts' manifests.

        Saved few-shot subsets record it, so an edited manifest or view invalidates them.
        """
        if split not in self.views:
            return sha256_file(self.manifest_path(split))
        view = self.views[split]
        parts = [*self.split_parts(split), *([view["exclude"]] if view.get("exclude") else [])]
        definition = {k: view.get(k) for k in ("parts", "exclude", "unit")}
        payload = json.dumps([definition, [sha256_file(self.manifest_path(p)) for p in parts]], sort_keys=True)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def samples(self, split: str) -> Iterator[dict]:
        """Stream one split's (or view's) samples in manifest order; a malformed line raises DataError(file:line)."""
        if split in self.views:
            yield from self._view_samples(split)
            return
        for _line, sample in read_manifest(self.manifest_path(split), self.name):
            yield sample

    def rows(self, split: str) -> Sequence[dict]:
        """One split's (or view's) samples by index, `rows[i]` == the i-th of `samples(split)`.

        Read from the memory-mapped `<split>.arrow` beside the JSONL (converted from it on first
        use, atomically), so a million rows cost every rank and loader worker almost nothing;
        where the folder cannot be written, the JSONL is read into a list instead.
        """
        from uniperceiver.data.arrow_manifest import split_rows

        self._check_split(split)
        return split_rows(self, split)

    def _view_samples(self, split: str) -> Iterator[dict]:
        view = self.views[split]
        unit = view.get("unit", "sample")
        if unit not in ("sample", "pair"):
            raise DataError(f"{self.root / META_FILE}: view {split!r} has unit {unit!r}; expected 'sample' or 'pair'")
        dropped = {str(s["id"]) for s in self.samples(view["exclude"])} if view.get("exclude") else set()
        for part in self.split_parts(split):
            for sample in self.samples(part):
                sid = str(sample["id"])
                if sid in dropped:
                    continue
                if unit == "sample":
                    yield sample
                    continue
                texts = sample.get("texts")
                if not isinstance(texts, list):
                    raise DataError(f"{self.manifest_path(part)} sample {sid!r}: view {split!r} pairs captions "
                                    "but the sample has no 'texts' list")
                for k, text in enumerate(texts):
                    yield {**sample, "id": f"{sid}#{k}", "texts": [text], "parent_id": sid}

    def load_split(self, split: str) -> list[dict]:
        """The whole split as a list in memory; for large splits `rows(split)` reads by index instead."""
        return list(self.samples(split))

    def media_path(self, sample: dict) -> Path:
        """Absolute path of a sample's media, refusing anything outside raw_root.

        The check is lexical (no symlink resolution): datasets such as Kinetics legitimately
        use symlinks that point elsewhere on disk.
        """
        where = f"{self.root / 'manifest'} sample {sample.get('id')!r}"
        media = check_relative_media(sample.get("media"), where)
        root = os.path.normpath(str(self.raw_root))
        full = os.path.normpath(os.path.join(root, media))
        if os.path.commonpath([root, full]) != root:
            raise DataError(f"{where}: media path {media!r} escapes the raw root {root}")
        return Path(full)

    def verify(self) -> None:
        """Re-hash every manifest and compare with meta (detects edits or an interrupted re-run)."""
        recorded = self.meta.get("manifest_sha256", {})
        for split in self.splits:
            path = self.manifest_path(split)
            if not path.is_file():
                raise DataError(f"{path}: manifest missing; run `upctl prepare {self.name}` again")
            digest = sha256_file(path)
            if recorded.get(split) != digest:
                raise DataError(
                    f"{path}: sha256 {digest[:12]}... does not match meta.json "
                    f"({str(recorded.get(split))[:12]}...); run `upctl prepare {self.name}` again"
                )


def open_dataset(name: str, data_dir: str | Path | None = None) -> PreparedDataset:
    """Open `<data_dir>/<name>`; a clear DataError if it has not been prepared."""
    base = resolve_data_dir(data_dir)
    root = base / name
    meta_path = root / META_FILE
    if not meta_path.is_file():
        raise DataError(f"dataset {name!r} is not prepared under {base}: run `upctl prepare {name}` first")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{meta_path}:{exc.lineno}: malformed JSON ({exc.msg}); run `upctl prepare {name}` again"
        ) from None
    if not isinstance(meta, dict) or "raw_root" not in meta or "splits" not in meta:
        raise DataError(f"{meta_path}: missing 'raw_root' or 'splits'; run `upctl prepare {name}` again")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(
            f"{meta_path}: format_version {version!r} is not supported (expected {FORMAT_VERSION}); "
            f"run `upctl prepare {name}` again"
        )
    return PreparedDataset(name, root, meta)


def iter_corpus_lines(dataset: PreparedDataset, split: str, start_line: int = 0) -> Iterator[str]:
    """Stream a text corpus (manifest lines {"text_file", "lines"}) one non-blank line at a time.

    `start_line` counts non-blank lines across the whole split, so a resumed run can skip the
    files it already consumed without reading them. Samples with an inline "text" are yielded too.
    """
    if start_line < 0:
        raise DataError(f"start_line must be >= 0, got {start_line}")
    skip = start_line
    for sample in dataset.samples(split):
        if "text_file" not in sample:
            if "text" in sample:
                if skip:
                    skip -= 1
                    continue
                yield str(sample["text"])
            continue
        n = int(sample.get("lines", 0))
        if skip >= n:
            skip -= n
            continue
        path = dataset.media_path({"id": sample["id"], "media": sample["text_file"]})
        # newline="\n": lines end at "\n" only, as the line index (data/corpus_index.py) splits them.
        with open(path, "r", encoding="utf-8", errors="replace", newline="\n") as fh:
            for line in fh:
                text = line.strip()
                if not text:
                    continue
                if skip:
                    skip -= 1
                    continue
                yield text


# --------------------------------------------------------------------------------------------
# write side


class ManifestWriter:
    """Write `<out_dir>/<split>.jsonl` atomically: a temp file renamed only when the block succeeds.

    `add(sample)` appends one sample (an "id" is required and must be unique); `skip(reason,
    detail)` counts a sample that was left out, so nothing is ever dropped silently.
    """

    def __init__(self, out_dir: Path, split: str) -> None:
        if not _SPLIT_RE.match(split):
            raise DataError(f"invalid split name {split!r}: use letters, digits, '_', '-', '.'")
        self.out_dir = Path(out_dir)
        self.split = split
        self.path = self.out_dir / f"{split}.jsonl"
        self.count = 0
        #: Captions over the written samples (a "pair" view over this split has this many samples).
        self.num_texts = 0
        self.skipped: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}
        self._ids: set[str] = set()
        self._fh: IO[bytes] | None = None
        self._tmp: str | None = None
        self.committed = False

    def __enter__(self) -> "ManifestWriter":
        self.out_dir.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.out_dir)
        self._fh = os.fdopen(fd, "wb")
        return self

    def add(self, sample: dict) -> None:
        if self._fh is None:
            raise RuntimeError("ManifestWriter.add() outside its `with` block")
        sid = sample.get("id")
        if not isinstance(sid, str) or not sid:
            raise DataError(f"{self.path}: sample without a string 'id': {str(sample)[:200]}")
        if sid in self._ids:
            self.skip("duplicate_id", sid)
            return
        if "media" in sample:
            check_relative_media(sample["media"], f"{self.path} sample {sid!r}")
        self._ids.add(sid)
        line = json.dumps(sample, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        try:
            self._fh.write(line.encode("utf-8") + b"\n")
        except OSError as exc:
            raise StorageError(f"{self.path}: could not write: {exc.strerror or exc}; the previous manifest is kept") from exc
        self.count += 1
        if isinstance(sample.get("texts"), list):
            self.num_texts += len(sample["texts"])

    @property
    def ids(self) -> frozenset[str]:
        """The ids written so far (views check their parts against each other with them)."""
        return frozenset(self._ids)

    def skip(self, reason: str, detail: str = "") -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        ex = self.examples.setdefault(reason, [])
        if detail and len(ex) < _MAX_EXAMPLES:
            ex.append(detail)

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._fh is not None and self._tmp is not None
        try:
            if exc_type is None:
                self._fh.flush()
                os.fsync(self._fh.fileno())
            self._fh.close()
            if exc_type is None:
                # Staged, not yet live: write_meta publishes every split of the run together, so a
                # failure in a later split never leaves new manifests next to old ones.
                os.replace(self._tmp, staged_path(self.path))
                self.committed = True
        except OSError as err:
            raise StorageError(f"{self.path}: could not write: {err.strerror or err}; the previous manifest is kept") from err
        finally:
            if not self.committed:
                try:
                    os.unlink(self._tmp)
                except FileNotFoundError:
                    pass
            self._fh = None


def staged_path(manifest: Path) -> Path:
    """Where a finished manifest waits until write_meta publishes the whole run."""
    return manifest.with_name(f".{manifest.name}.staged")


def discard_staged(dataset_dirs: Iterable[Path]) -> None:
    """Remove manifests staged by a run that failed before write_meta (the old files stay live)."""
    for folder in dataset_dirs:
        for path in Path(folder).glob(".*.jsonl.staged"):
            path.unlink(missing_ok=True)


def write_meta(dataset_dir: Path, meta: dict) -> None:
    """Publish the staged manifests, then write meta.json atomically (format_version, manifest sha256).

    Every split written by this run goes live here together; the short sequence of renames is the
    only window in which a crash could mix old and new splits.
    """
    dataset_dir = Path(dataset_dir)
    meta = dict(meta)
    meta["format_version"] = FORMAT_VERSION
    sha = {}
    for split in meta.get("splits", {}):
        path = dataset_dir / f"{split}.jsonl"
        staged = staged_path(path)
        if not staged.is_file() and not path.is_file():
            raise DataError(f"{path}: manifest of split {split!r} missing while writing meta.json")
        sha[split] = sha256_file(staged if staged.is_file() else path)
    for split in sha:
        path = dataset_dir / f"{split}.jsonl"
        if staged_path(path).is_file():
            os.replace(staged_path(path), path)
    discard_staged([dataset_dir])
    meta["manifest_sha256"] = sha
    atomic_write_json(dataset_dir / META_FILE, meta)


@dataclass
class PrepareSummary:
    """What one `upctl prepare` run did; `to_dict()` is the `--json` payload."""

    dataset: str
    splits: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)
    missing_media: int = 0
    unreadable_media: int = 0
    seconds: float = 0.0
    out_dir: str = ""
    examples: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    source: str = ""
    downloaded: list[str] = field(default_factory=list)
    #: Views written to meta.json (name -> samples), e.g. the reference's training pool "trainval".
    views: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_writers(
        cls, dataset: str, writers: list[ManifestWriter], out_dir: Path, source: str = ""
    ) -> "PrepareSummary":
        s = cls(dataset=dataset, out_dir=str(out_dir), source=source)
        for w in writers:
            s.splits[w.split] = w.count
            if w.skipped:
                s.skipped[w.split] = dict(sorted(w.skipped.items()))
                s.examples[w.split] = {k: v for k, v in sorted(w.examples.items()) if v}
            s.missing_media += sum(w.skipped.get(r, 0) for r in MISSING_REASONS)
            s.unreadable_media += sum(w.skipped.get(r, 0) for r in UNREADABLE_REASONS)
        return s

    def to_dict(self) -> dict:
        return asdict(self)


def prepare_dataset(
    name: str,
    raw_root: str | Path | None,
    data_dir: str | Path | None = None,
    *,
    download: bool = False,
    progress: Progress | None = None,
    options: dict[str, str] | None = None,
) -> PrepareSummary:
    """Run the preparer of `name`, writing `<data_dir>/<name>/`; returns what it did.

    `raw_root` defaults to `<data_dir>/raw/<name>` (where `--download` puts files).
    """
    from uniperceiver.data.preparers import get_preparer

    prepare = get_preparer(name)
    base = resolve_data_dir(data_dir)
    root = (
        Path(raw_root).expanduser().absolute() if raw_root is not None and str(raw_root) != "" else base / "raw" / name
    )
    out_dir = base / name
    start = time.perf_counter()
    try:
        summary = cast(PrepareSummary, prepare(root, out_dir, download=download, progress=progress,
                                               options=dict(options or {})))
    except BaseException:
        # The previous manifests and meta.json are still live; drop what this run had staged
        # (`mini` writes several `mini-*` folders, hence the prefix match).
        discard_staged(p for p in base.glob(f"{name}*") if p.is_dir())
        raise
    summary.seconds = round(time.perf_counter() - start, 3)
    summary.out_dir = summary.out_dir or str(out_dir)
    _remove_stale_manifests(Path(summary.out_dir))  # the folder written: `--name NAME` writes <data_dir>/NAME
    _convert_written(base, name, since=time.time() - summary.seconds - 1.0, written=Path(summary.out_dir))
    return summary


def _convert_written(base: Path, name: str, since: float, written: Path | None = None) -> None:
    """Write the Arrow copies (data/arrow_manifest.py) of every dataset folder this run wrote
    (`mini` writes `mini-*` siblings; `imagefolder --name NAME` writes NAME), so that the first
    training run need not convert them."""
    from uniperceiver.data.arrow_manifest import convert_dataset

    folders = set(base.glob(f"{name}*"))
    if written is not None and written.parent == base:
        folders.add(written)
    for folder in sorted(folders):
        if folder != written and folder.name != name and not folder.name.startswith(f"{name}-"):
            continue
        meta = folder / META_FILE
        if meta.is_file() and meta.stat().st_mtime >= since:
            convert_dataset(open_dataset(folder.name, base))


def _remove_stale_manifests(out_dir: Path) -> None:
    """After a successful run, drop manifests of splits that meta.json no longer lists."""
    meta_path = out_dir / META_FILE
    if not meta_path.is_file():
        return
    splits = set(json.loads(meta_path.read_text(encoding="utf-8")).get("splits", {}))
    for path in [*out_dir.glob("*.jsonl"), *out_dir.glob("*.arrow")]:
        if path.stem not in splits:
            path.unlink()
