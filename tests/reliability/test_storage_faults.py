"""Storage faults: a full disk (ENOSPC) in the middle of a checkpoint or manifest write, and
truncated or bit-flipped checkpoints.

ENOSPC is injected where every atomic write of the project goes through: `tempfile.mkstemp` +
`os.fdopen` (uniperceiver/utils/files.py, ManifestWriter). Writes to the chosen temporary file stop
with OSError(ENOSPC) after part of the data went to disk, as on a real full disk.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest

from uniperceiver.config import recipe_from_dict
from uniperceiver.data.format import open_dataset, prepare_dataset
from uniperceiver.engine import train_checkpoint as ckpt
from uniperceiver.engine.trainer import train
from uniperceiver.errors import CheckpointError, UpctlError
from uniperceiver.modeling.model_dir import load_model

from .conftest import assert_same_tensors, invoke, load_weights, small_recipe, write_recipe

TASKS = [{"name": "mini-faces", "batch_size": 8}]


class _Faulty:
    """A file object whose writes fail with ENOSPC once `budget` bytes have been written."""

    def __init__(self, fh, budget: int) -> None:
        self._fh = fh
        self._left = budget

    def write(self, data) -> int:
        if len(data) > self._left:
            self._fh.write(data[: self._left])  # a real full disk accepts part of the data first
            self._left = 0
            self._fh.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._left -= len(data)
        return self._fh.write(data)

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self) -> "_Faulty":
        return self

    def __exit__(self, *exc) -> None:
        self._fh.close()


class FullDisk:
    """Make the temp file of atomic writes whose final path matches `match` run out of space
    (after letting the first `skip` matching files through)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, match: Callable[[str], bool], budget: int = 100,
                 skip: int = 0) -> None:
        self.hits: list[str] = []
        self.passed: list[str] = []
        real_mkstemp, real_fdopen = tempfile.mkstemp, os.fdopen
        pending: dict[int, str] = {}

        def mkstemp(*args, **kwargs):
            fd, path = real_mkstemp(*args, **kwargs)
            pending[fd] = path
            return fd, path

        def fdopen(fd, *args, **kwargs):
            fh = real_fdopen(fd, *args, **kwargs)
            path = pending.pop(fd, None)
            if path is not None and match(path):
                if len(self.passed) < skip:
                    self.passed.append(path)
                    return fh
                self.hits.append(path)
                return _Faulty(fh, budget)
            return fh

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
        monkeypatch.setattr(os, "fdopen", fdopen)


def _temp_of(folder_part: str, name: str) -> Callable[[str], bool]:
    """Matches the temporary file atomic_write uses for `<...folder_part...>/<name>`."""
    return lambda path: folder_part in path and os.path.basename(path).startswith(f".{name}.")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _quiet(message: str) -> None:
    pass


# --------------------------------------------------------------------- ENOSPC during a checkpoint


@pytest.fixture(scope="module")
def uninterrupted(mini_data, tmp_path_factory) -> Iterator[Path]:
    """The 4-step run every faulty run is compared with."""
    out = tmp_path_factory.mktemp("enospc-reference") / "run"
    raw = small_recipe(TASKS, train={"max_steps": 4, "ckpt_every": 2})
    result = train(recipe_from_dict(raw), output=out, data_dir=mini_data, log=_quiet)
    assert result.step == 4
    yield out
    shutil.rmtree(out.parent, ignore_errors=True)  # module done: free its disk now, not at session end


def _full_dcp_disk(monkeypatch: pytest.MonkeyPatch, folder_part: str) -> list[str]:
    """Make the DCP data files written under `folder_part` run out of space (they are not atomic
    writes: DCP opens them itself; the staging folder they are in is what makes them atomic)."""
    hits: list[str] = []
    real_open = Path.open

    def open_(self, mode="r", *args, **kwargs):
        fh = real_open(self, mode, *args, **kwargs)
        if "w" in mode and folder_part in str(self) and self.name.endswith(".distcp"):
            hits.append(str(self))
            return _Faulty(fh, 5)
        return fh

    monkeypatch.setattr(Path, "open", open_)
    return hits


@pytest.mark.parametrize("name", ["model.dcp", "optim.dcp", "config.json", "optimizer.pt", "rng-rank0.pt",
                                  "meta.json", "latest"])
# DCP's extra writer threads die on the injected error with a traceback (DcpSave.wait reports it):
# expected here, so pytest's unhandled-thread warning is not shown.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_enospc_during_a_checkpoint_write_keeps_the_previous_checkpoint(mini_data, tmp_path, monkeypatch, name):
    out = tmp_path / "run"
    raw = small_recipe(TASKS, train={"max_steps": 4, "ckpt_every": 2})
    if name.endswith(".dcp"):  # a weights or optimizer shard, as each rank writes it
        disk = SimpleNamespace(hits=_full_dcp_disk(monkeypatch, f".tmp-step-000004/{name}/"))
    elif name == "latest":  # the pointer file: let step 2's update through, fail step 4's
        disk = FullDisk(monkeypatch, _temp_of(f"{out}/checkpoints", name), budget=5, skip=1)
    else:
        disk = FullDisk(monkeypatch, _temp_of("checkpoints/.tmp-step-000004", name), budget=5)
    with pytest.raises((OSError, UpctlError)) as err:
        train(recipe_from_dict(raw), output=out, data_dir=mini_data, log=_quiet)
    assert disk.hits, f"no write of {name} happened"
    assert "No space left on device" in str(err.value) or getattr(err.value, "errno", None) == errno.ENOSPC
    root = out / "checkpoints"
    # the previous checkpoint is intact and is what a resume would use
    assert (root / ckpt.LATEST_NAME).read_text().strip() == "step-000002"
    assert ckpt.find_valid_checkpoint(root, warn=_quiet) == root / "step-000002"
    # nothing half-written under a final name: every step folder verifies, no stray temp file
    for path in ckpt.list_checkpoints(root):
        ckpt.verify_checkpoint(path)
    assert not [p for p in root.rglob(".*.tmp") if p.is_file()]
    assert not (out / "final").exists()


def test_resume_after_enospc_gives_the_uninterrupted_result(mini_data, uninterrupted, tmp_path, monkeypatch):
    out = tmp_path / "run"
    raw = small_recipe(TASKS, train={"max_steps": 4, "ckpt_every": 2})
    with monkeypatch.context() as mp:
        FullDisk(mp, _temp_of(".tmp-step-000004", "optimizer.pt"))
        with pytest.raises((OSError, UpctlError)):
            train(recipe_from_dict(raw), output=out, data_dir=mini_data, log=_quiet)
    result = train(recipe_from_dict(raw), output=out, resume="auto", data_dir=mini_data, log=_quiet)
    assert result.resumed_from == out / "checkpoints" / "step-000002" and result.step == 4
    assert_same_tensors(load_weights(out / "final"), load_weights(uninterrupted / "final"), "final weights")


def test_enospc_during_a_checkpoint_write_is_one_clear_line(mini_data, tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path / "r.yaml", small_recipe(TASKS, train={"max_steps": 4, "ckpt_every": 2}))
    FullDisk(monkeypatch, _temp_of(".tmp-step-000002", "optimizer.pt"))
    res = invoke(["pretrain", recipe, "--data-dir", mini_data, "--output", tmp_path / "run", "--device", "cpu"])
    assert res.exception is None, f"{type(res.exception).__name__}: {res.exception}"
    assert res.exit_code == 1
    assert "No space left on device" in res.flat and "step-000002" in res.flat


# ----------------------------------------------------------------------- ENOSPC during a manifest


@pytest.fixture()
def faces_data(tmp_path) -> Path:
    data = tmp_path / "data"
    prepare_dataset("mini", None, data, options={"only": "faces"})
    return data


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: _digest(p) for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("name", ["train.jsonl", "val.jsonl", "meta.json"])
def test_enospc_during_a_manifest_write_keeps_the_previous_files(faces_data, monkeypatch, name):
    folder = faces_data / "mini-faces"
    before = _snapshot(folder)
    disk = FullDisk(monkeypatch, _temp_of(str(folder), name), budget=200)
    with pytest.raises((OSError, UpctlError)) as err:
        prepare_dataset("mini", None, faces_data, options={"only": "faces"})
    assert disk.hits
    assert "No space left on device" in str(err.value) or getattr(err.value, "errno", None) == errno.ENOSPC
    monkeypatch.undo()
    assert _snapshot(folder) == before  # same re-run: every file byte-identical, no temp file left
    open_dataset("mini-faces", faces_data).verify()


def test_a_failed_re_prepare_never_leaves_a_mix_of_old_and_new_splits(faces_data, monkeypatch):
    from uniperceiver.errors import DataError

    folder = faces_data / "mini-faces"
    FullDisk(monkeypatch, _temp_of(str(folder), "val.jsonl"), budget=200)
    with pytest.raises((OSError, UpctlError)):
        prepare_dataset("mini", None, faces_data, options={"only": "faces", "seed": "1"})  # another split
    monkeypatch.undo()
    try:
        ds = open_dataset("mini-faces", faces_data)
        train_ids = {s["id"] for s in ds.samples("train")}
        val_ids = {s["id"] for s in ds.samples("val")}
    except DataError:
        return  # refusing the half-updated dataset with a clear error is fine
    assert not train_ids & val_ids, f"{len(train_ids & val_ids)} samples are in both train and val"


def test_enospc_during_prepare_is_one_clear_line(faces_data, monkeypatch):
    FullDisk(monkeypatch, _temp_of(str(faces_data / "mini-faces"), "train.jsonl"), budget=200)
    res = invoke(["prepare", "mini", "--data-dir", faces_data, "--option", "only=faces"])
    assert res.exception is None, f"{type(res.exception).__name__}: {res.exception}"
    assert res.exit_code == 1 and "No space left on device" in res.flat and "train.jsonl" in res.flat


# --------------------------------------------------------------- truncated / bit-flipped checkpoints


@pytest.fixture(scope="module")
def three_steps(mini_data, tmp_path_factory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("corrupt") / "run"
    raw = small_recipe(TASKS, train={"max_steps": 3, "ckpt_every": 1})
    assert train(recipe_from_dict(raw), output=out, data_dir=mini_data, log=_quiet).step == 3
    yield out
    shutil.rmtree(out.parent, ignore_errors=True)  # module done: free its disk now, not at session end


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:  # flip the lowest bit of one byte in the middle (a valid-looking file with one wrong value)
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("name,how", [
    ("model.dcp/__0_0.distcp", "flip"), ("model.dcp/.metadata", "truncate"), ("optim.dcp/__0_1.distcp", "flip"),
    ("optimizer.pt", "truncate"), ("optimizer.pt", "flip"),
    ("rng-rank0.pt", "flip"), ("trainer.pt", "truncate"), ("config.json", "flip"), ("meta.json", "truncate"),
])
def test_damaged_checkpoint_is_detected_and_the_previous_one_used_with_a_warning(three_steps, tmp_path, name, how):
    run = _copy_run(three_steps, tmp_path / "run")
    root = run / "checkpoints"
    _damage(root / "step-000003" / name, how)
    warnings: list[str] = []
    assert ckpt.find_valid_checkpoint(root, warn=warnings.append) == root / "step-000002"
    assert len(warnings) == 1 and "step-000003" in warnings[0] and "step-000002" in warnings[0], warnings
    assert name in warnings[0] or name == "meta.json"
    with pytest.raises(CheckpointError, match="step-000003"):
        ckpt.load_checkpoint(root / "step-000003")


def test_resume_auto_skips_a_bit_flipped_checkpoint_and_says_so(three_steps, mini_data, tmp_path):
    run = _copy_run(three_steps, tmp_path / "run")
    _damage(run / "checkpoints" / "step-000003" / "model.dcp" / "__0_0.distcp", "flip")
    recipe = write_recipe(tmp_path / "r.yaml", small_recipe(TASKS, train={"max_steps": 3, "ckpt_every": 1}))
    res = invoke(["pretrain", recipe, "--data-dir", mini_data, "--output", run, "--resume", "auto", "--device", "cpu"])
    assert res.exception is None and res.exit_code == 0, res.output[-2000:]
    text = res.flat
    assert "step-000003 is corrupt" in text and "falling back to" in text and "resumed from" in text, text[-2000:]
    assert f"{run / 'checkpoints' / 'step-000002'} at step 2" in text
    # the resumed run redoes step 3 exactly: the same weights as the undamaged run
    assert_same_tensors(load_weights(run / "final"), load_weights(three_steps / "final"), "final weights")
    ckpt.verify_checkpoint(run / "checkpoints" / "step-000003")


def test_resume_from_an_explicit_damaged_checkpoint_is_refused(three_steps, mini_data, tmp_path):
    run = _copy_run(three_steps, tmp_path / "run")
    bad = run / "checkpoints" / "step-000003"
    _damage(bad / "optimizer.pt", "flip")
    recipe = write_recipe(tmp_path / "r.yaml", small_recipe(TASKS, train={"max_steps": 4}))
    res = invoke(["pretrain", recipe, "--data-dir", mini_data, "--output", tmp_path / "other", "--resume", bad,
                  "--device", "cpu"])
    assert res.exception is None and res.exit_code == 1, res.output[-2000:]
    assert "optimizer.pt" in res.flat and "checksum" in res.flat and "Traceback" not in res.output


def test_truncated_final_weights_are_refused(three_steps, tmp_path):
    run = _copy_run(three_steps, tmp_path / "run")
    _damage(run / "final" / "model.safetensors", "truncate")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(run / "final")


def test_bit_flipped_final_weights_are_refused(three_steps, tmp_path):
    run = _copy_run(three_steps, tmp_path / "run")
    _damage(run / "final" / "model.safetensors", "flip")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(run / "final")
