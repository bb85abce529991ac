"""Fixtures shared by the trainer test files (imported by name so pytest registers them there)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the trainer tests start subprocesses that share the two cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def mini_data(tmp_path_factory) -> Path:
    """The real `mini` datasets, prepared once per session."""
    from uniperceiver.data.format import prepare_dataset

    root = tmp_path_factory.getbasetemp() / "trainer-mini-data"
    if not (root / ".done").is_file():
        prepare_dataset("mini", None, root, options={"only": "digits,photos,faces,news"})
        (root / ".done").write_text("ok")
    return root


@pytest.fixture()
def cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """`upctl ARGS...` in-process from a fresh working directory; returns the click Result."""
    from typer.testing import CliRunner

    from upctl.main import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("UPCTL_CACHE", str(tmp_path / "cache"))
    for var in ("UPCTL_DEBUG", "UPCTL_DATA"):
        monkeypatch.delenv(var, raising=False)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])
