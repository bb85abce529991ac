"""img2dataset webdataset shards: find them, index their members once, read one member by seeking.

img2dataset's `--output_format webdataset` writes `<folder>/00000.tar, 00001.tar, ...`, each holding
`<key>.jpg`, `<key>.txt` (the caption) and `<key>.json` per sample, with `00000_stats.json` (its
"successes" is the number of samples in the tar) and `00000.parquet` beside.

Why indexed access and not a streaming loader (the `webdataset` library's WebDataset pipeline): the
trainer's exact resume rests on every task being a list of samples read by index. The batch sampler
(engine/sampler.py) deals a seeded permutation of indices over the ranks, the loader
(engine/loader.py) hands whole planned batches to its workers, and a checkpoint stores only
(epoch, cursor) per task, so `--resume auto` continues with the next unseen sample and even a
different world size re-deals what is left of the epoch. A streaming pipeline would need its own
shard split over ranks x workers, its own shuffle buffer state and its own skip-ahead on resume, and
would lose exactness whenever the number of workers changes. Indexing costs one pass over the tar
headers at prepare time (`index_shard`: data blocks are seeked over, never read, except the small
captions); a sample then records `media` = "<shard>.tar#<member>" plus the member's byte offset and
size, and `read_member` reads exactly those bytes. Decoding stays in data/media.py, so a corrupt
member is a MediaError that the loaders count and skip like any bad file.

A damaged tar (cut short by an interrupted copy, or holding garbage after some point) keeps the
samples whose members lie wholly before the damage; the rest are counted by the preparer.
"""

from __future__ import annotations

import json
import multiprocessing
import posixpath
import re
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from uniperceiver.errors import DataError, MediaError

#: img2dataset names shards with zero-padded numbers: 00000.tar, 00001.tar, ...
SHARD_RE = re.compile(r"^\d{5,}\.tar$")
#: Separates the shard from the member in a manifest's media reference: "00003.tar#000031234.jpg".
MEMBER_SEP = ".tar#"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_END_OF_ARCHIVE = b"\0" * 1024  # two zero blocks close every complete tar


@dataclass(frozen=True)
class Member:
    """One tar member: its name and where its data lies in the file."""

    name: str
    offset: int
    size: int


@dataclass
class ShardIndex:
    """The members of one shard grouped by sample key (tar order), and whether the tar is damaged.

    `damage` is "" for a complete tar, else why the index stopped early; `cut_keys` are samples
    seen only in part before the damage (a member whose data the file does not hold, or a last
    sample without its image or caption, whose remaining members were lost).
    """

    path: Path
    samples: dict[str, dict[str, Member]] = field(default_factory=dict)
    damage: str = ""
    cut_keys: list[str] = field(default_factory=list)
    #: key -> the text of its `txt` member (filled when asked for: `index_shard(captions=True)`).
    captions: dict[str, str] = field(default_factory=dict)


def find_shards(folder: Path) -> list[Path]:
    """The img2dataset tar shards directly in `folder`, sorted by name (empty if none)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if SHARD_RE.match(p.name) and p.is_file())


def stats_successes(tar: Path) -> int | None:
    """`successes` of the shard's `<stem>_stats.json` (img2dataset), or None without a stats file."""
    stats = tar.with_name(f"{tar.stem}_stats.json")
    if not stats.is_file():
        return None
    try:
        data = json.loads(stats.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{stats}: not a JSON stats file of img2dataset ({exc})") from None
    value = data.get("successes") if isinstance(data, dict) else None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise DataError(f"{stats}: key 'successes' should be a count >= 0, got {value!r}")
    return value


def split_name(name: str) -> tuple[str, str]:
    """(key, extension) of a member name as webdataset splits it: at the first dot of the base name."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{head}/{stem}" if head else stem
    return key, ext.lower() if dot else ""


def index_shards(paths: list[Path], workers: int = 1) -> Iterator[ShardIndex]:
    """`index_shard(p, captions=True)` for each path, in order, in `workers` processes.

    Why processes: parsing tar headers is pure Python (about 10,000 members/s per core) and a
    web-scale dataset has tens of millions of members. Forked, not spawned: spawning re-imports the
    caller's main module (a script without a `__main__` guard would run again); the children only
    read the tars and return their indexes. Stopping early (`--option limit=N`) cancels the shards
    not started.
    """
    if workers <= 1 or len(paths) <= 1:
        yield from (index_shard(p, captions=True) for p in paths)
        return
    pool = ProcessPoolExecutor(min(workers, len(paths)), mp_context=multiprocessing.get_context("fork"))
    try:
        yield from pool.map(_index_with_captions, paths)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _index_with_captions(tar: Path) -> ShardIndex:
    return index_shard(tar, captions=True)


def index_shard(tar: Path, *, captions: bool = False) -> ShardIndex:
    """Read the member headers of one tar (data blocks are skipped) into a ShardIndex; with
    `captions`, also the text of every sample's `txt` member.

    Never raises for a damaged tar: what precedes the damage is kept and `damage` says what happened.
    """
    index = ShardIndex(tar)
    try:
        _index_members(tar, index)
        if captions:
            _read_captions(tar, index)
    except OSError as exc:  # a read error of the disk or the network mount: the shard is damaged
        index.damage = index.damage or f"read error ({exc.strerror or exc})"
    if index.damage and index.samples:
        # The last sample may have lost members after the damage: keep it only when it is whole.
        last = next(reversed(index.samples))
        if not has_image(index.samples[last]) or "txt" not in index.samples[last]:
            index.cut_keys.append(last)
            del index.samples[last]
            index.captions.pop(last, None)
    return index


def _index_members(tar: Path, index: ShardIndex) -> None:
    """Fill `index.samples` from the headers; set `index.damage` when the tar is not whole."""
    size = tar.stat().st_size
    with open(tar, "rb") as fh:
        try:
            tf = tarfile.open(fileobj=fh, mode="r:")
        except tarfile.TarError as exc:
            index.damage = f"not a readable tar ({exc})"
            return
        with tf:
            end = _read_headers(tf, index, size)
        if not index.damage:
            fh.seek(end)
            if fh.read(len(_END_OF_ARCHIVE)) != _END_OF_ARCHIVE:
                index.damage = f"no end-of-archive marker at byte {end} (cut short or overwritten)"


def _read_captions(tar: Path, index: ShardIndex) -> None:
    with open(tar, "rb") as fh:
        for key, members in index.samples.items():
            if "txt" in members:
                fh.seek(members["txt"].offset)
                index.captions[key] = fh.read(members["txt"].size).decode("utf-8", errors="replace")


def _read_headers(tf: tarfile.TarFile, index: ShardIndex, size: int) -> int:
    """Add the regular members to `index` until the end or the damage; returns where the end marker
    should start. A member whose data runs past the end of the file drops its whole sample."""
    while True:
        try:
            info = tf.next()
        except tarfile.TarError as exc:  # "unexpected end of data": cut in the last member's padding
            index.damage = str(exc) or type(exc).__name__
            return tf.offset
        if info is None:
            return tf.offset
        if not info.isfile():
            continue
        key, ext = split_name(info.name)
        if info.offset_data + info.size > size:
            index.damage = f"member {info.name} ends past the end of the file"
            index.samples.pop(key, None)
            index.cut_keys.append(key)
            return tf.offset
        index.samples.setdefault(key, {})[ext] = Member(info.name, info.offset_data, info.size)


def clean_name(name: str) -> bool:
    """A member name that survives the lexical normalisation of media paths unchanged (no "..",
    ".", "//" or leading "/"), so its reference always names the member it was made from."""
    return bool(name) and not name.startswith("/") and posixpath.normpath(name) == name and \
        name.split("/", 1)[0] != ".."


def has_image(members: dict[str, Member]) -> bool:
    return any(ext in members for ext in IMAGE_EXTS)


def image_member(members: dict[str, Member]) -> Member | None:
    """The sample's image member (the first of IMAGE_EXTS present), or None."""
    for ext in IMAGE_EXTS:
        if ext in members:
            return members[ext]
    return None


def member_ref(shard_rel: str, member: Member) -> str:
    """The manifest media reference of a member: "<shard>.tar#<member name>"."""
    if not shard_rel.endswith(".tar"):
        raise ValueError(f"{shard_rel!r} is not a .tar shard")
    return f"{shard_rel}#{member.name}"


def member_span(sample: dict[str, Any]) -> tuple[int, int] | None:
    """(offset, size) of a manifest sample whose media is a shard member; None for a plain file."""
    if "media_offset" not in sample:
        return None
    offset, size = sample.get("media_offset"), sample.get("media_size")
    for key, value in (("media_offset", offset), ("media_size", size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise DataError(f"sample {sample.get('id')!r}: {key!r} should be a byte count >= 0, got {value!r}")
    return int(offset), int(size)  # type: ignore[arg-type]


def shard_of(ref: str | Path) -> Path:
    """The tar file of a member reference ("a/00003.tar#000031234.jpg" -> "a/00003.tar")."""
    text = str(ref)
    at = text.find(MEMBER_SEP)
    return Path(text[: at + len(".tar")]) if at >= 0 else Path(text)


def read_member(ref: str | Path, offset: int, size: int) -> bytes:
    """The `size` bytes at `offset` of the tar named by `ref` (a member reference or the tar itself).

    Raises MediaError naming the reference: "missing" without the tar, "empty" for a zero-size
    member, "unreadable" when the tar no longer holds those bytes (cut after it was prepared).
    """
    tar = shard_of(ref)
    if size == 0:
        raise MediaError(ref, "empty", "zero-byte member")
    try:
        with open(tar, "rb") as fh:
            fh.seek(offset)
            data = fh.read(size)
    except FileNotFoundError:
        raise MediaError(ref, "missing", f"no shard {tar}") from None
    except OSError as exc:
        raise MediaError(ref, "unreadable", str(exc)) from None
    if len(data) != size:
        raise MediaError(ref, "unreadable", f"the shard holds {len(data)} of the member's {size} bytes")
    return data
