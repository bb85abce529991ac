"""Downloads against a local HTTP server on 127.0.0.1 (resume, checksum), and safe archive extraction."""

from __future__ import annotations

import hashlib
import http.server
import io
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest
from fixtures import layouts

from uniperceiver.data.download import DownloadError, UnsafeArchiveError, download, extract_archive
from uniperceiver.data.format import open_dataset, prepare_dataset
from uniperceiver.errors import DataError


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with HTTP Range support (what S3 and most servers do); records Range headers."""

    ranges: list[str | None] = []
    honour_range = True

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        self.ranges.append(self.headers.get("Range"))
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404, "Not Found")
            return
        data = path.read_bytes()
        rng = self.headers.get("Range")
        if rng and self.honour_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_error(416, "Range Not Satisfiable")
                return
            body = data[start:]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture()
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()

    class Handler(_RangeHandler):
        ranges: list = []

        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{httpd.server_address[1]}", Handler
    finally:
        httpd.shutdown()
        httpd.server_close()


def _payload(tmp_path: Path) -> bytes:
    """Real bytes (a packaged photo as JPEG), repeated to span several read chunks."""
    from fixtures.raw_media import write_image

    return write_image(tmp_path / "payload.jpg", 2, size=(320, 240)).read_bytes() * 12


def test_resume_from_partial_file(server, tmp_path):
    root, url, handler = server
    data = _payload(tmp_path)
    (root / "blob.bin").write_bytes(data)
    dest = tmp_path / "dl" / "blob.bin"
    dest.parent.mkdir()
    Path(str(dest) + ".part").write_bytes(data[:1000])
    out = download(f"{url}/blob.bin", dest, sha256=hashlib.sha256(data).hexdigest())
    assert out.read_bytes() == data
    assert handler.ranges == ["bytes=1000-"]
    assert not Path(str(dest) + ".part").exists()
    download(f"{url}/blob.bin", dest)  # complete file: no request at all
    assert handler.ranges == ["bytes=1000-"]


def test_server_ignoring_range_restarts(server, tmp_path):
    root, url, handler = server
    handler.honour_range = False
    data = _payload(tmp_path)
    (root / "blob.bin").write_bytes(data)
    dest = tmp_path / "blob.bin"
    Path(str(dest) + ".part").write_bytes(b"garbage that must not survive")
    assert download(f"{url}/blob.bin", dest).read_bytes() == data


def test_checksum_mismatch_and_http_errors(server, tmp_path):
    root, url, _ = server
    (root / "blob.bin").write_bytes(b"real content of the file")
    dest = tmp_path / "blob.bin"
    with pytest.raises(DownloadError, match="sha256 mismatch for blob.bin: expected 0000"):
        download(f"{url}/blob.bin", dest, sha256="0" * 64)
    assert not dest.exists() and not Path(str(dest) + ".part").exists()
    with pytest.raises(DownloadError, match=r"/nope\.zip: HTTP 404"):
        download(f"{url}/nope.zip", tmp_path / "nope.zip")


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_archive_members_escaping_are_refused(tmp_path):
    target = tmp_path / "out"
    for bad in ("../evil", "ok/../../evil", "/abs/evil"):
        z = _zip(tmp_path / "bad.zip", {"fine.txt": b"x", bad: b"pwned"})
        with pytest.raises(UnsafeArchiveError, match="refusing|escapes"):
            extract_archive(z, target)
    assert not target.exists() and not (tmp_path / "evil").exists()

    tar_path = tmp_path / "bad.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tf:
        info = tarfile.TarInfo("../evil")
        info.size = 5
        tf.addfile(info, io.BytesIO(b"pwned"))
    with pytest.raises(UnsafeArchiveError, match=r"'\.\./evil' escapes"):
        extract_archive(tar_path, target)
    link_tar = tmp_path / "link.tar"
    with tarfile.open(link_tar, "w") as tf:
        info = tarfile.TarInfo("data/link")
        info.type = tarfile.SYMTYPE
        info.linkname = "../../etc/passwd"
        tf.addfile(info)
    with pytest.raises(UnsafeArchiveError, match="links to '../../etc/passwd' outside"):
        extract_archive(link_tar, target)
    assert not target.exists()

    good = _zip(tmp_path / "good.zip", {"a/b.txt": b"hello", "c.txt": b"bye"})
    assert sorted(extract_archive(good, target)) == ["a/b.txt", "c.txt"]
    assert (target / "a" / "b.txt").read_bytes() == b"hello"


def test_prepare_glue_sst2_download_from_mirror(server, tmp_path):
    root, url, _ = server
    glue = tmp_path / "glue_src"
    layouts.make_glue(glue)
    with zipfile.ZipFile(root / "SST-2.zip", "w") as zf:  # the official archive holds SST-2/<file>.tsv
        for f in sorted((glue / "SST-2").iterdir()):
            zf.write(f, f"SST-2/{f.name}")
    raw, data = tmp_path / "raw" / "glue-sst2", tmp_path / "data"
    s = prepare_dataset("glue-sst2", raw, data, download=True, options={"mirror": url})
    assert s.splits == {"train": 4, "val": 2, "test": 2}
    assert s.downloaded == ["downloads/SST-2.zip"]
    assert (raw / "SST-2" / "train.tsv").is_file()
    assert open_dataset("glue-sst2", data).meta["options"] == {}  # the mirror is not a dataset property
    # a second run finds the archive already extracted and downloads nothing
    assert prepare_dataset("glue-sst2", raw, data, download=True, options={"mirror": url}).downloaded == []


def test_download_without_public_url_says_what_to_get(tmp_path):
    with pytest.raises(
        DataError, match=r"imagenet has no stable public download URL: get train/<wnid>/\*\.JPEG .* under "
    ):
        prepare_dataset("imagenet", tmp_path / "raw", tmp_path / "data", download=True)
    with pytest.raises(DataError, match="glue-mrpc has no single public archive"):
        prepare_dataset("glue-mrpc", tmp_path / "raw", tmp_path / "data", download=True)
