"""Hostile input: files crafted to run code, escape folders or exhaust memory are refused.

- Pickles: a REAL malicious pickle (`__reduce__` -> os.system("touch MARKER")); the test first shows
  that an unsafe load does create the marker, then that `upctl convert`, `--resume` (every state
  file of a training checkpoint, with meta.json checksums updated so only the unpickler stands in
  the way) and `--checkpoint` refuse it and the marker never appears.
- YAML: `!!python/object/apply:os.system` in a recipe, in a `--set` value and in a custom task file.
- Paths: manifest media paths leaving the raw root; archive members leaving the extraction folder
  during `upctl prepare --download` (served from a file:// mirror).
- Sizes: a video window claiming 10^9 seconds, a corpus claiming 10^9 lines, a PNG claiming
  10^10 pixels and a recipe asking for 10^9 frames never allocate for what they claim.
"""

from __future__ import annotations

import io
import json
import os
import resource
import shlex
import shutil
import struct
import tarfile
import time
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from uniperceiver.config import recipe_from_dict
from uniperceiver.data.download import UnsafeArchiveError, extract_archive
from uniperceiver.engine import train_checkpoint as ckpt
from uniperceiver.engine.trainer import train
from uniperceiver.errors import CheckpointError, DataError, MediaError
from uniperceiver.modeling.model_config import model_config
from uniperceiver.tasks.catalog import build_task, task_config
from uniperceiver.utils.digests import file_digest

from .conftest import SMALL_MODEL, TINY_RECIPE, invoke, small_recipe, write_recipe


class Evil:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def _evil_torch_file(path: Path, marker: Path, payload: object | None = None) -> Path:
    """A torch.save file whose pickle holds Evil; proves the payload fires on an unsafe load."""
    torch.save(payload if payload is not None else {"model": {"w": Evil(marker)}}, path)
    torch.load(io.BytesIO(path.read_bytes()), weights_only=False)  # the unsafe way (and no extension dispatch)
    assert marker.exists(), "the malicious pickle did not fire: the test would prove nothing"
    marker.unlink()
    return path


def _quiet(message: str) -> None:
    pass


# ------------------------------------------------------------------------------------- pickles


def test_convert_refuses_a_malicious_pickle(tmp_path):
    marker = tmp_path / "PWNED"
    evil = _evil_torch_file(tmp_path / "uni-perceiver-base.pth", marker)
    res = invoke(["convert", evil, tmp_path / "out"])
    assert res.exception is None and res.exit_code == 1, res.output
    assert "weights_only" in res.flat and str(evil) in res.flat
    assert not marker.exists() and not (tmp_path / "out" / "model.safetensors").exists()

    ds = tmp_path / "global_step1"
    ds.mkdir()
    _evil_torch_file(ds / "mp_rank_00_model_states.pt", marker, {"module": {"w": Evil(marker)}})
    res = invoke(["convert", ds, tmp_path / "out-ds"])
    assert res.exit_code == 1 and res.exception is None and not marker.exists(), res.output


@pytest.fixture(scope="module")
def two_steps(mini_data, tmp_path_factory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("hostile-run") / "run"
    raw = small_recipe([{"name": "mini-faces", "batch_size": 8}], train={"max_steps": 2, "ckpt_every": 1})
    assert train(recipe_from_dict(raw), output=out, data_dir=mini_data, log=_quiet).step == 2
    yield out
    shutil.rmtree(out.parent, ignore_errors=True)  # module done: free its disk now, not at session end


def _plant(run: Path, name: str, marker: Path) -> Path:
    """Replace one state file of the newest checkpoint by a malicious pickle and fix meta.json."""
    step = run / "checkpoints" / "step-000002"
    _evil_torch_file(step / name, marker, {"state": {0: {"exp_avg": Evil(marker)}}, "param_groups": []})
    meta = json.loads((step / "meta.json").read_text())
    meta["files"][name] = file_digest(step / name, meta["digest"])
    (step / "meta.json").write_text(json.dumps(meta))
    ckpt.verify_checkpoint(step)  # the checksum no longer protects: only the loader does
    return step


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "trainer.pt", "rng-rank0.pt"])
def test_training_checkpoint_state_files_are_never_unpickled_with_code(two_steps, tmp_path, name):
    run = shutil.copytree(two_steps, tmp_path / "run")
    marker = tmp_path / "PWNED"
    step = _plant(run, name, marker)
    with pytest.raises(CheckpointError, match=name):
        ckpt.load_checkpoint(step)
    assert not marker.exists()


def test_resume_refuses_a_malicious_optimizer_state(two_steps, mini_data, tmp_path):
    run = shutil.copytree(two_steps, tmp_path / "run")
    marker = tmp_path / "PWNED"
    _plant(run, "optimizer.pt", marker)
    recipe = write_recipe(tmp_path / "r.yaml", small_recipe([{"name": "mini-faces", "batch_size": 8}],
                                                            train={"max_steps": 3}))
    for resume in ("auto", str(run / "checkpoints" / "step-000002")):
        res = invoke(["pretrain", recipe, "--data-dir", mini_data, "--output", run, "--resume", resume,
                      "--device", "cpu"])
        assert res.exception is None and res.exit_code == 1, res.output[-2000:]
        assert "optimizer.pt" in res.flat and "Traceback" not in res.output
        assert not marker.exists()


def test_checkpoint_option_never_unpickles_weights(two_steps, mini_data, tmp_path):
    marker = tmp_path / "PWNED"
    model_dir = shutil.copytree(two_steps / "final", tmp_path / "model")
    _evil_torch_file(model_dir / "model.safetensors", marker)
    runs = [
        ["finetune", "--task", "mini-faces", "--checkpoint", model_dir, "--max-steps", "1", "--output",
         tmp_path / "ft", "--data-dir", mini_data, "--device", "cpu"],
        ["prompt-tune", "--task", "mini-faces", "--checkpoint", model_dir, "--max-steps", "1", "--output",
         tmp_path / "pt", "--data-dir", mini_data, "--device", "cpu"],
        ["zeroshot", "--task", "mini-faces", "--checkpoint", model_dir, "--data-dir", mini_data, "--no-cache",
         "--device", "cpu"],
    ]
    for args in runs:
        res = invoke(args)
        assert res.exception is None and res.exit_code == 1, (args[0], res.output[-2000:])
        assert "model.safetensors" in res.flat, (args[0], res.flat[-600:])
        assert not marker.exists(), args[0]
    # a bare .pth given as --checkpoint is refused without being opened
    pth = _evil_torch_file(tmp_path / "weights.pth", marker)
    res = invoke(["finetune", "--task", "mini-faces", "--checkpoint", pth, "--max-steps", "1", "--data-dir",
                  mini_data, "--output", tmp_path / "ft2", "--device", "cpu"])
    assert res.exit_code == 1 and res.exception is None and "not a model folder" in res.flat
    assert not marker.exists()


# ---------------------------------------------------------------------------------------- YAML


def _evil_yaml(marker: Path) -> str:
    return f'!!python/object/apply:os.system ["touch {marker}"]'


def _proves_yaml_payload(text: str, marker: Path) -> None:
    yaml.unsafe_load(text)
    assert marker.exists(), "the YAML payload did not fire"
    marker.unlink()


def test_recipes_and_overrides_are_safe_yaml(tmp_path):
    marker = tmp_path / "PWNED"
    text = TINY_RECIPE.read_text().replace("name: tiny", f"name: {_evil_yaml(marker)}")
    _proves_yaml_payload(text, marker)
    evil = tmp_path / "evil.yaml"
    evil.write_text(text)
    for args in (["validate", evil], ["pretrain", evil, "--output", tmp_path / "run"],
                 ["validate", TINY_RECIPE, "--set", f"name={_evil_yaml(marker)}"],
                 ["validate", TINY_RECIPE, "--set", f"optim.lr={_evil_yaml(marker)}"]):
        res = invoke(args)
        assert res.exception is None and res.exit_code == 1, (args, res.output[-1500:])
        assert "!!python" in res.flat or "python/object" in res.flat, res.flat[-600:]
        assert not marker.exists(), args


def test_custom_task_yaml_and_eval_overrides_are_safe_yaml(two_steps, tmp_path):
    marker = tmp_path / "PWNED"
    text = f"inputs: {{texts: t.txt}}\ncandidates: {_evil_yaml(marker)}\n"
    _proves_yaml_payload(text, marker)
    (tmp_path / "t.txt").write_text("a sentence\n")
    task = tmp_path / "evil-task.yaml"
    task.write_text(text)
    for args in (["zeroshot", "--task", task, "--checkpoint", two_steps / "final", "--no-cache"],
                 ["zeroshot", "--task", "mini-faces", "--checkpoint", two_steps / "final", "--no-cache",
                  "--set", f"top_k={_evil_yaml(marker)}"]):
        res = invoke(args)
        assert res.exception is None and res.exit_code == 1, (args, res.output[-1500:])
        assert not marker.exists(), args


# --------------------------------------------------------------------------- paths: manifests


def _faces_copy(mini_data: Path, tmp: Path) -> Path:
    data = tmp / "data"
    shutil.copytree(mini_data / "mini-faces", data / "mini-faces")
    return data


@pytest.mark.parametrize("media,problem", [
    ("../../etc/passwd", "escapes the raw root"),
    ("faces/../../../etc/passwd", "escapes the raw root"),
    ("/etc/passwd", "is absolute"),
])
def test_manifest_paths_cannot_leave_the_raw_root(mini_data, two_steps, tmp_path, media, problem):
    data = _faces_copy(mini_data, tmp_path)
    for split, line in (("train", 5), ("val", 3)):
        path = data / "mini-faces" / f"{split}.jsonl"
        lines = path.read_text().splitlines()
        row = json.loads(lines[line - 1])
        row["media"] = media
        lines[line - 1] = json.dumps(row)
        path.write_text("\n".join(lines) + "\n")
    recipe = write_recipe(tmp_path / "r.yaml", small_recipe([{"name": "mini-faces", "batch_size": 8}]))
    res = invoke(["pretrain", recipe, "--data-dir", data, "--output", tmp_path / "run", "--device", "cpu"])
    assert res.exception is None and res.exit_code == 1, res.output[-1500:]
    assert f"train.jsonl:5: media path {media!r} {problem}" in res.flat, res.flat[-800:]
    res = invoke(["zeroshot", "--task", "mini-faces", "--checkpoint", two_steps / "final", "--data-dir", data,
                  "--no-cache", "--device", "cpu"])
    assert res.exception is None and res.exit_code == 1, res.output[-1500:]
    assert f"val.jsonl:3: media path {media!r} {problem}" in res.flat, res.flat[-800:]


# ---------------------------------------------------------------------------- paths: archives


def _zip(path: Path, members: list[tuple[str, bytes]], symlink: tuple[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members:
            zf.writestr(name, data)
        if symlink is not None:
            info = zipfile.ZipInfo(symlink[0])
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, symlink[1])
    return path


def _tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tf.addfile(info, io.BytesIO(m[1]))
    return path


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def _files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


@pytest.mark.parametrize("case", ["dotdot", "nested-dotdot", "absolute", "symlink"])
def test_download_refuses_a_zip_with_escaping_members(tmp_path, case):
    www, raw, data = tmp_path / "www", tmp_path / "box" / "raw", tmp_path / "data"
    www.mkdir()
    escape = tmp_path / "box" / "escaped.txt"
    good = ("SST-2/train.tsv", b"sentence\tlabel\nfine\t1\n")
    members = {
        "dotdot": [good, ("../escaped.txt", b"owned")],
        "nested-dotdot": [good, ("SST-2/../../escaped.txt", b"owned")],
        "absolute": [good, (str(escape), b"owned")],
        "symlink": [good],
    }[case]
    _zip(www / "SST-2.zip", members, symlink=("SST-2/link", str(tmp_path)) if case == "symlink" else None)
    res = invoke(["prepare", "glue-sst2", "--download", "--root", raw, "--data-dir", data,
                  "--option", f"mirror={www.as_uri()}"])
    assert res.exception is None and res.exit_code == 1, res.output[-1500:]
    assert "refusing to extract" in res.flat or "escapes the target folder" in res.flat, res.flat[-800:]
    assert not escape.exists()
    assert _files_under(raw) <= {"downloads", "downloads/SST-2.zip"}, _files_under(raw)  # nothing extracted


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink-out", "write-through-symlink", "hardlink-out",
                                  "device"])
def test_download_refuses_a_tar_with_escaping_members(tmp_path, case):
    www, raw, data = tmp_path / "www", tmp_path / "box" / "raw", tmp_path / "data"
    www.mkdir()
    outside = tmp_path / "box" / "outside"
    outside.mkdir(parents=True)
    clip = ("YouTubeClips/a_1_2.avi", b"not really a video")
    dev = tarfile.TarInfo("YouTubeClips/null")
    dev.type, dev.devmajor, dev.devminor = tarfile.CHRTYPE, 1, 3
    members = {
        "dotdot": [clip, ("../outside/escaped.txt", b"owned")],
        "absolute": [clip, (str(outside / "escaped.txt"), b"owned")],
        "symlink-out": [clip, _link("YouTubeClips/link", str(outside))],
        "write-through-symlink": [clip, _link("YouTubeClips/link", "../../outside"),
                                  ("YouTubeClips/link/escaped.txt", b"owned")],
        "hardlink-out": [clip, _link("YouTubeClips/passwd", "/etc/passwd", tarfile.LNKTYPE)],
        "device": [clip, dev],
    }[case]
    _tar(www / "YouTubeClips.tar", members)
    res = invoke(["prepare", "msvd", "--download", "--root", raw, "--data-dir", data,
                  "--option", f"mirror={www.as_uri()}"])
    assert res.exception is None and res.exit_code == 1, res.output[-1500:]
    assert "refusing to extract" in res.flat or "outside the target folder" in res.flat \
        or "escapes the target folder" in res.flat, res.flat[-800:]
    assert not list(outside.iterdir())
    assert _files_under(raw) <= {"downloads", "downloads/YouTubeClips.tar"}, _files_under(raw)
    with pytest.raises(UnsafeArchiveError):
        extract_archive(www / "YouTubeClips.tar", tmp_path / "direct")
    assert not list(outside.iterdir())


# ----------------------------------------------------------------------------------------- sizes


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def test_a_video_window_claiming_a_billion_seconds_reads_only_the_frames_asked_for(mini_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(mini_data / "mini-video", data / "mini-video")
    cfg = model_config("tiny", **SMALL_MODEL)
    task = build_task(task_config("mini-video"), data, cfg)
    row = dict(task.examples("train")[0])
    before, t0 = _peak_rss_mb(), time.perf_counter()
    for start, end in ((0.0, 1e9), (1e9, 2e9), (-1e9, 1e9)):
        row.update(start=start, end=end)
        for train_mode in (True, False):
            item = task.load(row, train=train_mode, rng=np.random.default_rng(0))
            frames = item["pixels"].shape[-4]
            assert frames == task.cfg.options["frames"], item["pixels"].shape
    assert time.perf_counter() - t0 < 30
    assert _peak_rss_mb() - before < 300, "memory grew with the claimed window"


def test_a_corpus_claiming_a_billion_lines_is_refused_by_its_line_index(mini_data, tmp_path):
    """The manifest's line count is checked against the file when the line index is built: a lie is a
    clear error naming the file, found in one read of the (small) file, not a billion-line loop."""
    data, raw = tmp_path / "data", tmp_path / "raw"
    raw.mkdir()
    (raw / "book.txt").write_text("A first sentence of the book.\nA second one.\n")
    shutil.copytree(mini_data / "mini-news", data / "mini-news")
    meta = json.loads((data / "mini-news" / "meta.json").read_text())
    meta["raw_root"] = str(raw)
    (data / "mini-news" / "meta.json").write_text(json.dumps(meta))
    (data / "mini-news" / "train.jsonl").write_text(
        json.dumps({"id": "book.txt", "text_file": "book.txt", "lines": 10**9}) + "\n")
    task = build_task(task_config("mini-news-mlm"), data, model_config("tiny", **SMALL_MODEL))
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=r"book\.txt: the manifest counts 1,000,000,000 non-blank lines, the file has 2"):
        task.examples("train")
    assert time.perf_counter() - t0 < 10


def _png_claiming(path: Path, width: int, height: int) -> Path:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_an_image_claiming_ten_billion_pixels_is_refused_without_allocating(mini_data, tmp_path):
    data = _faces_copy(mini_data, tmp_path)
    raw = tmp_path / "raw"
    raw.mkdir()
    _png_claiming(raw / "bomb.png", 100_000, 100_000)
    meta = json.loads((data / "mini-faces" / "meta.json").read_text())
    meta["raw_root"] = str(raw)
    (data / "mini-faces" / "meta.json").write_text(json.dumps(meta))
    task = build_task(task_config("mini-faces"), data, model_config("tiny", **SMALL_MODEL))
    before = _peak_rss_mb()
    with pytest.raises(MediaError) as err:
        task.load({"id": "bomb", "media": "bomb.png", "label": 0}, train=True, rng=np.random.default_rng(0))
    assert err.value.kind == "bad_format" and "bomb.png" in str(err.value)
    assert _peak_rss_mb() - before < 200


def test_a_recipe_asking_for_a_billion_frames_is_refused(mini_data, tmp_path):
    res = invoke(["pretrain", TINY_RECIPE, "--data-dir", mini_data, "--output", tmp_path / "run", "--device", "cpu",
                  "--set", "tasks.mini-video.options.frames=1000000000", "--max-steps", "1"])
    assert res.exception is None and res.exit_code == 1, res.output[-1500:]
    assert "frames=1000000000" in res.flat, res.flat[-800:]
