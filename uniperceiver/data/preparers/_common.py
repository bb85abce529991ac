"""Shared machinery of the preparers: options, finding files, media checks, writing splits, meta.

A preparer declares its dataset once as a `DatasetSpec` (name, description, layout, options,
downloads, tasks, few-shot rule) and has the shape

    def prepare(raw_root, out_dir, *, download, progress, options) -> PrepareSummary
    (a family module serving several datasets: prepare(variant, raw_root, out_dir, ...))

`DatasetSpec.builder` opens a `Builder` the same way for every dataset (raw root check, then
--download); the Builder parses options, checks each referenced media file (in a small thread
pool, order preserved), writes one manifest per split atomically, records views (named training
pools) and finally meta.json.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from uniperceiver.data import media
from uniperceiver.data.format import ManifestWriter, PrepareSummary, write_meta
from uniperceiver.errors import ConfigError, DataError, MediaError
from uniperceiver.utils.progress import Progress


COMMON_OPTIONS: dict[str, str] = {
    "check": "media check: decode (default; full image decode, video probe + one decoded frame), "
    "verify (image header / video container only; faster), exists (existence and size only)",
    "workers": "threads used to check media (default: min(8, CPU count))",
    "limit": "keep at most N samples per split (0 = all; for quick trials)",
    "mirror": "with --download: base URL of a mirror holding the same file names",
}

_CHUNK = 512
_CACHE_MAX = 200_000


@dataclass(frozen=True)
class Skip:
    """Yielded by a sample generator instead of a sample: counted under `reason`, never dropped silently."""

    reason: str
    detail: str = ""


# --------------------------------------------------------------------------------------------
# options


class Options:
    """`--option key=value` pairs, validated against what the preparer accepts."""

    def __init__(self, dataset: str, raw: dict[str, Any] | None, known: dict[str, str]) -> None:
        self.dataset = dataset
        self.raw = {str(k): v for k, v in (raw or {}).items()}
        unknown = sorted(set(self.raw) - set(known))
        if unknown:
            raise ConfigError(f"unknown option {unknown[0]!r} for {dataset}; accepted: {', '.join(sorted(known))}")

    def str(self, key: str, default: str | None = None) -> str | None:
        v = self.raw.get(key)
        return default if v is None or v == "" else str(v)

    def int(self, key: str, default: int, minimum: int | None = None) -> int:
        v = self.raw.get(key)
        if v is None or v == "":
            return default
        try:
            out = int(v)
        except (TypeError, ValueError):
            raise ConfigError(f"option {key}={v!r} for {self.dataset}: expected an integer") from None
        if minimum is not None and out < minimum:
            raise ConfigError(f"option {key}={v!r} for {self.dataset}: expected an integer >= {minimum}")
        return out

    def bool(self, key: str, default: bool) -> bool:
        v = self.raw.get(key)
        if v is None or v == "":
            return default
        if isinstance(v, bool):
            return v
        s = str(v).strip().lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"option {key}={v!r} for {self.dataset}: expected true or false")

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        v = self.str(key, default)
        assert v is not None
        if v not in choices:
            raise ConfigError(f"option {key}={v!r} for {self.dataset}: expected one of {', '.join(choices)}")
        return v

    def public(self) -> dict[str, Any]:
        """The options recorded in meta.json (the performance knobs do not change the result)."""
        return {k: v for k, v in sorted(self.raw.items()) if k not in ("workers", "mirror")}


# --------------------------------------------------------------------------------------------
# files


def find_first(root: Path, candidates: Iterable[str]) -> Path | None:
    for rel in candidates:
        p = root / rel
        if p.exists():
            return p
    return None


def require_file(root: Path, candidates: list[str], what: str) -> Path:
    p = find_first(root, candidates)
    if p is None or not p.is_file():
        raise DataError(f"{root / candidates[0]}: {what} not found (looked for {', '.join(candidates)} under {root})")
    return p


def require_root(root: Path, dataset: str, layout: str) -> None:
    if not root.is_dir():
        raise DataError(f"{root}: raw root of {dataset} does not exist; put there {layout} (or pass --root DIR)")


def read_json(path: Path) -> Any:
    try:
        with open(path, "r", encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def need(obj: Any, key: str, where: str, kind: type | tuple[type, ...] | None = None) -> Any:
    """obj[key] or a DataError naming the file, the key and what was expected."""
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(f"{where}: missing key {key!r}")
    value = obj[key]
    if kind is not None and not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"{where}: key {key!r} should be {names}, got {type(value).__name__}")
    return value


def read_table(
    path: Path, required: list[str], *, delimiter: str = ",", quoting: int = csv.QUOTE_MINIMAL, encoding: str = "utf-8"
) -> Iterator[tuple[int, dict[str, str], bool]]:
    """Rows of a CSV/TSV file with a header as (line number, row, complete); the header must hold `required`.

    `complete` is False when the row has a different number of fields than the header (the
    caller counts it as a malformed row instead of guessing).
    """
    with open(path, "r", encoding=encoding, newline="") as fh:
        reader = csv.reader(fh, delimiter=delimiter, quoting=quoting)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}: empty file (expected a header with {', '.join(required)})") from None
        header = [h.strip().lstrip("\ufeff") for h in header]
        missing = [c for c in required if c not in header]
        if missing:
            raise DataError(f"{path}:1: header lacks column(s) {', '.join(missing)} (found: {', '.join(header)})")
        for row in reader:
            if not row or all(not c.strip() for c in row):
                continue
            values = {h: (row[i] if i < len(row) else "") for i, h in enumerate(header)}
            yield reader.line_num, values, len(row) == len(header)


def walk_files(root: Path, suffixes: tuple[str, ...]) -> Iterator[Path]:
    """Files under root with one of the suffixes (case-insensitive), sorted, following symlinks."""
    suffixes = tuple(s.lower() for s in suffixes)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(suffixes) and not name.startswith("."):
                yield Path(dirpath) / name


# --------------------------------------------------------------------------------------------
# media checks


def _check_image(path: Path, mode: str) -> str | None:
    if mode == "decode":  # exactly what the loaders will do later
        try:
            media.load_image(path)
        except MediaError as exc:
            return exc.kind
        return None
    from PIL import Image, UnidentifiedImageError

    try:  # "verify": header and structure only, several times faster on large JPEGs
        with Image.open(path) as im:
            im.verify()
    except UnidentifiedImageError:
        return "bad_format"
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
        return "unreadable"
    return None


def _check_video(path: Path, mode: str) -> str | None:
    try:
        media.probe_video(path)  # opens the container, checks the video stream's facts
        if mode == "decode":
            media.sample_video_frames(path, 1, max_side=64)  # and one decoded frame
    except MediaError as exc:
        return exc.kind
    return None


def check_media(path: Path, kind: str, mode: str = "decode") -> str | None:
    """None if the file is usable, else the MediaError kind: missing, empty, unreadable or bad_format."""
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except OSError:
        return "unreadable"
    if not path.is_file():
        return "bad_format"
    if st.st_size == 0:
        return "empty"
    if mode == "exists":
        return None
    if kind == "image":
        return _check_image(path, mode)
    if kind == "video":
        return _check_video(path, mode)
    raise ValueError(f"unknown media kind {kind!r}")


# --------------------------------------------------------------------------------------------
# the builder


class Builder:
    """Writes one prepared dataset: splits (with media checks and skip counts), then meta.json."""

    def __init__(
        self,
        dataset: str,
        raw_root: Path,
        out_dir: Path,
        *,
        options: dict[str, Any] | None,
        progress: Progress | None,
        known_options: dict[str, str] | None = None,
        media_type: str,
        tasks: list[str],
        fewshot_rule: str | None = None,
        layout: str = "",
    ) -> None:
        self.dataset = dataset
        self.raw_root = Path(raw_root).expanduser().absolute()  # meta.json records an absolute root
        self.out_dir = Path(out_dir)
        self.options = Options(dataset, options, {**COMMON_OPTIONS, **(known_options or {})})
        self.check_mode = self.options.choice("check", ("decode", "verify", "exists"), "decode")
        self.workers = self.options.int("workers", min(8, os.cpu_count() or 1), minimum=1)
        self.limit = self.options.int("limit", 0, minimum=0)
        self.progress = progress
        self.media_type = media_type
        self.tasks = tasks
        self.fewshot_rule = fewshot_rule
        self.layout = layout
        self.writers: list[ManifestWriter] = []
        self.views: dict[str, dict[str, Any]] = {}
        self.sources: list[str] = []
        self.downloaded: list[str] = []
        self._checked: dict[str, dict[str, str | None]] = {}

    def rel(self, path: Path) -> str:
        """Path relative to the raw root, '/'-separated (the manifest form)."""
        return Path(os.path.relpath(path, self.raw_root)).as_posix()

    def source(self, path: Path) -> None:
        """Record an annotation file that was read (meta.json 'source')."""
        self.sources.append(self.rel(path) if str(path).startswith(str(self.raw_root)) else str(path))

    def _report(self, done: int, total: int | None, split: str) -> None:
        if self.progress is not None:
            self.progress(done, total, f"{self.dataset} {split}")

    def write_split(
        self,
        split: str,
        items: Iterable[dict | Skip],
        *,
        media_kind: str | None,
        total: int | None = None,
        media_key: str = "media",
    ) -> ManifestWriter:
        """Check the media of each sample (in order), write the good ones, count the rest."""
        check = self.check_mode
        done = 0
        # media shared by several samples (VQA: ~5 questions per image) are checked once
        cache: dict[str, str | None] = self._checked.setdefault(media_kind or "", {})
        with ManifestWriter(self.out_dir, split) as writer, ThreadPoolExecutor(self.workers) as pool:
            it = iter(items)
            while True:
                if self.limit and writer.count >= self.limit:
                    break
                chunk = list(islice(it, _CHUNK))
                if not chunk:
                    break
                if media_kind is not None:
                    if len(cache) > _CACHE_MAX:  # bounded: web-scale pair datasets never repeat images
                        cache.clear()
                    wanted = {x[media_key] for x in chunk if isinstance(x, dict) and media_key in x}
                    todo = sorted(m for m in wanted if m not in cache)
                    cache.update(zip(todo, pool.map(lambda m: check_media(self.raw_root / m, media_kind, check), todo)))
                for x in chunk:
                    done += 1
                    if isinstance(x, Skip):
                        writer.skip(x.reason, x.detail)
                        continue
                    problem = cache.get(x[media_key]) if media_kind is not None and media_key in x else None
                    if problem is not None:
                        writer.skip(f"{problem}_media", x[media_key])
                        continue
                    if self.limit and writer.count >= self.limit:
                        break
                    writer.add(x)
                self._report(done, total, split)
        self.writers.append(writer)
        return writer

    def add_view(
        self,
        name: str,
        parts: Sequence[str],
        *,
        unit: str = "sample",
        exclude: str | None = None,
        fewshot_rule: str | None = None,
        reference: str = "",
    ) -> None:
        """Record a view over splits written by this run (format.py: module docstring).

        Parts that were not written are left out (and so named nowhere); no parts, no view. The
        parts must not share sample ids, or a view's samples would be ambiguous.
        """
        written = {w.split: w for w in self.writers if w.count}
        used = [p for p in parts if p in written]
        if not used:
            return
        if unit == "pair" and exclude:
            raise ValueError("a pair view cannot exclude samples (its size would need the excluded captions)")
        dropped = written[exclude].ids if exclude in written else frozenset()
        seen: set[str] = set()
        count = 0
        for part in used:
            ids = written[part].ids - dropped
            clash = seen & ids
            if clash:
                raise DataError(f"{self.out_dir}: view {name!r}: split {part!r} repeats sample id {min(clash)!r}")
            seen |= ids
            count += written[part].num_texts if unit == "pair" else len(ids)
        view: dict[str, Any] = {"parts": used, "unit": unit, "num_samples": count}
        if exclude in written:
            view["exclude"] = exclude
        if fewshot_rule:
            view["fewshot_rule"] = fewshot_rule
        if reference:
            view["reference"] = reference
        self.views[name] = view

    def finish(self, targets: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> PrepareSummary:
        """Write meta.json (after every manifest is in place) and return the run summary."""
        if not self.writers:
            raise DataError(f"{self.raw_root}: no split of {self.dataset} could be prepared")
        meta: dict[str, Any] = {
            "dataset": self.dataset,
            "source": ", ".join(self.sources),
            "raw_root": str(self.raw_root),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "splits": {w.split: w.count for w in self.writers},
            "targets": targets or {},
            "options": self.options.public(),
            "skipped": {w.split: dict(sorted(w.skipped.items())) for w in self.writers if w.skipped},
            "media_type": self.media_type,
            "tasks": self.tasks,
        }
        if self.fewshot_rule:
            meta["fewshot_rule"] = self.fewshot_rule
        if self.views:
            meta["views"] = self.views
        if extra:
            meta.update(extra)
        write_meta(self.out_dir, meta)
        summary = PrepareSummary.from_writers(self.dataset, self.writers, self.out_dir, source=meta["source"])
        summary.downloaded = list(self.downloaded)
        summary.views = {name: int(v["num_samples"]) for name, v in self.views.items()}
        return summary

    def fetch(self, files: list, download: bool) -> None:
        """With --download, fetch the dataset's public files into the raw root first."""
        if not download:
            return
        if not files:
            what = f"get {self.layout} and put them under {self.raw_root}" if self.layout else "download it yourself"
            raise DataError(f"{self.dataset} has no stable public download URL: {what} (or pass --root DIR)")
        from uniperceiver.data.download import fetch

        self.downloaded = fetch(files, self.raw_root, mirror=self.options.str("mirror"), progress=self.progress)


# --------------------------------------------------------------------------------------------
# the dataset declaration


@dataclass(frozen=True)
class DatasetSpec:
    """What a preparer declares about one prepared dataset (its `upctl prepare NAME`)."""

    name: str
    description: str
    layout: str
    media_type: str
    tasks: tuple[str, ...]
    fewshot_rule: str | None = None
    options: Mapping[str, str] = field(default_factory=dict)
    downloads: tuple[Any, ...] = ()  # RemoteFile (uniperceiver.data.download)

    def builder(
        self,
        raw_root: Path,
        out_dir: Path,
        *,
        download: bool,
        progress: Progress | None,
        options: dict | None,
        fetch: bool = True,
    ) -> Builder:
        """A Builder after the opening every dataset shares: the raw root must exist unless
        --download will fill it, then --download fetches the public files (or says there are none).
        `fetch=False` leaves the download to the caller (to check a hand-placed file first)."""
        b = Builder(
            self.name,
            raw_root,
            out_dir,
            options=options,
            progress=progress,
            known_options=dict(self.options),
            media_type=self.media_type,
            tasks=list(self.tasks),
            fewshot_rule=self.fewshot_rule,
            layout=self.layout,
        )
        if not download:
            require_root(raw_root, self.name, self.layout)
        if fetch:
            b.fetch(list(self.downloads), download)
        return b
