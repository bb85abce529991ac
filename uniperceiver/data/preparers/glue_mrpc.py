"""GLUE MRPC (prepared dataset `glue-mrpc`); the layout and label order are described in `_glue.py`."""

from __future__ import annotations

from pathlib import Path

from uniperceiver.data.format import PrepareSummary
from uniperceiver.data.preparers._glue import TASKS, layout, prepare_glue

DESCRIPTION = "GLUE MRPC (text classification / regression)"
LAYOUT = layout(TASKS["mrpc"])
OPTIONS: dict[str, str] = {}


def prepare(
    raw_root: Path, out_dir: Path, *, download: bool = False, progress=None, options: dict | None = None
) -> PrepareSummary:
    return prepare_glue("mrpc", raw_root, out_dir, download=download, progress=progress, options=options or {})
