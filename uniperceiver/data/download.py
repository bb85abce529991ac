"""Resumable HTTP downloads with a sha256 check, and archive extraction that refuses unsafe members.

Used by `upctl prepare DATASET --download` for the few datasets with stable public URLs. A
download goes to `<dest>.part` first; an interrupted run resumes from that partial file with an
HTTP Range request (a server that ignores Range makes it start over), and the file is renamed to
`dest` only once it is complete and its checksum (when one is known) matches.

Extraction checks every member before writing anything: absolute paths, `..` components, links
pointing outside the target and device files make the whole archive refused.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from uniperceiver.errors import UpctlError
from uniperceiver.utils.files import sha256_file
from uniperceiver.utils.progress import Progress

_CHUNK = 1 << 20


class DownloadError(UpctlError):
    """A download failed, was truncated, or its checksum does not match."""


class UnsafeArchiveError(UpctlError):
    """An archive member would be written outside the extraction folder (or is a device/link)."""


@dataclass(frozen=True)
class RemoteFile:
    """One downloadable file of a dataset: where it comes from and where it goes under raw_root.

    `extract`: unpack the archive (kept in raw_root/downloads/) into raw_root / `extract_to`;
    otherwise the file itself is saved as raw_root / `extract_to` / `filename`.
    """

    url: str
    filename: str
    sha256: str | None = None
    extract: bool = False
    extract_to: str = "."
    size: int | None = None


def download(
    url: str,
    dest: str | Path,
    *,
    sha256: str | None = None,
    progress: Progress | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download `url` to `dest`, resuming `dest.part` if present; verify `sha256` when given.

    A complete `dest` whose checksum matches (or any complete `dest` when no checksum is known)
    is kept as is. Raises DownloadError naming the URL and the file on any failure.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file():
        if sha256 is None or sha256_file(dest) == sha256.lower():
            return dest
        dest.unlink()  # a stale or corrupt complete file: fetch again
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "upctl/0.1"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    desc = f"download {dest.name}"
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            status = getattr(resp, "status", 200)
            if have and status == 206:
                mode = "ab"
            else:
                have, mode = 0, "wb"  # server ignored Range (or nothing to resume): start over
            length = resp.headers.get("Content-Length")
            total = have + int(length) if length is not None and length.isdigit() else None
            done = have
            with open(part, mode) as fh:
                while True:
                    chunk = resp.read(_CHUNK)
                    if not chunk:
                        break
                    fh.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, total, desc)
                fh.flush()
                os.fsync(fh.fileno())
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # range not satisfiable: the partial file is already complete
            total = have
        else:
            raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason} while downloading to {dest}") from None
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(
            f"{url}: download to {dest} failed ({reason}); run the same command again to resume from {part.name}"
        ) from None
    size = part.stat().st_size
    if total is not None and size != total:
        raise DownloadError(f"{url}: got {size} of {total} bytes in {part}; run again to resume")
    if sha256 is not None:
        digest = sha256_file(part)
        if digest != sha256.lower():
            part.unlink()
            raise DownloadError(
                f"{url}: sha256 mismatch for {dest.name}: expected {sha256.lower()}, got {digest} (partial file removed)"
            )
    os.replace(part, dest)
    return dest


def _check_member_path(name: str, archive: Path) -> PurePosixPath:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path; refusing to extract")
    if ".." in p.parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} escapes the target folder ('..'); refusing to extract")
    return p


def _inside(target: Path, rel: PurePosixPath) -> bool:
    root = os.path.normpath(str(target))
    full = os.path.normpath(os.path.join(root, *rel.parts)) if rel.parts else root
    return os.path.commonpath([root, full]) == root


def check_archive(archive: str | Path, target: str | Path) -> list[str]:
    """Validate every member of a zip/tar archive; return the member names. Raises UnsafeArchiveError."""
    archive, target = Path(archive), Path(target)
    names: list[str] = []
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                rel = _check_member_path(info.filename, archive)
                if not _inside(target, rel):
                    raise UnsafeArchiveError(f"{archive}: member {info.filename!r} escapes the target folder")
                mode = (info.external_attr >> 16) & 0o170000
                if mode == 0o120000:
                    raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a symlink; refusing to extract")
                names.append(info.filename)
        return names
    try:
        tf = tarfile.open(archive)
    except (tarfile.TarError, OSError) as exc:
        raise UnsafeArchiveError(f"{archive}: not a zip or tar archive ({exc})") from None
    with tf:
        for m in tf.getmembers():
            rel = _check_member_path(m.name, archive)
            if not _inside(target, rel):
                raise UnsafeArchiveError(f"{archive}: member {m.name!r} escapes the target folder")
            if m.isdev() or m.isfifo():
                raise UnsafeArchiveError(f"{archive}: member {m.name!r} is a device or fifo; refusing to extract")
            if m.issym() or m.islnk():
                # a symlink is relative to its own folder, a hard link to the archive root
                link = PurePosixPath(m.linkname.replace("\\", "/"))
                base = rel.parent if m.issym() else PurePosixPath()
                resolved = os.path.normpath(os.path.join(str(target), *base.parts, *link.parts))
                if link.is_absolute() or os.path.commonpath(
                    [os.path.normpath(str(target)), resolved]
                ) != os.path.normpath(str(target)):
                    raise UnsafeArchiveError(
                        f"{archive}: member {m.name!r} links to {m.linkname!r} outside the target folder"
                    )
            names.append(m.name)
    return names


def extract_archive(archive: str | Path, target: str | Path) -> list[str]:
    """Extract a zip or tar(.gz/.bz2/.xz) archive into `target` after checking all members."""
    archive, target = Path(archive), Path(target)
    names = check_archive(archive, target)
    target.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                rel = _check_member_path(info.filename, archive)
                out = target.joinpath(*rel.parts)
                if info.is_dir():
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = out.with_name(out.name + ".extracting")
                with zf.open(info) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
                os.replace(tmp, out)
        return names
    with tarfile.open(archive) as tf:
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        try:
            tf.extractall(target, **kwargs)
        except getattr(tarfile, "FilterError", ()) as exc:  # Python >= 3.11.4 also filters itself
            raise UnsafeArchiveError(f"{archive}: {exc}; refusing to extract") from None
    return names


def fetch(
    files: list[RemoteFile],
    raw_root: Path,
    *,
    mirror: str | None = None,
    progress: Progress | None = None,
) -> list[str]:
    """Download (and extract) each file into raw_root; already extracted archives are skipped.

    `mirror`: a base URL that replaces each file's URL (mirror + "/" + filename), for local
    mirrors and caches. Returns the paths written, relative to raw_root.
    """
    raw_root = Path(raw_root)
    raw_root.mkdir(parents=True, exist_ok=True)
    done: list[str] = []
    for f in files:
        url = f"{mirror.rstrip('/')}/{f.filename}" if mirror else f.url
        stamp = raw_root / ".upctl" / f"{f.filename}.extracted"
        if f.extract and stamp.is_file():
            continue
        dest = raw_root / "downloads" / f.filename if f.extract else raw_root / f.extract_to / f.filename
        path = download(url, dest, sha256=f.sha256, progress=progress)
        done.append(str(path.relative_to(raw_root)))
        if f.extract:
            extract_archive(path, raw_root / f.extract_to)
            stamp.parent.mkdir(parents=True, exist_ok=True)
            stamp.write_text(sha256_file(path) + "\n")
    return done
