"""GLUE WNLI (prepared dataset `glue-wnli`); the layout and label order are described in `_glue.py`."""

from __future__ import annotations

from pathlib import Path

from uniperceiver.data.format import PrepareSummary
from uniperceiver.data.preparers._glue import TASKS, layout, prepare_glue

DESCRIPTION = "GLUE WNLI (text classification / regression)"
LAYOUT = layout(TASKS["wnli"])
OPTIONS: dict[str, str] = {}


def prepare(
    raw_root: Path, out_dir: Path, *, download: bool = False, progress=None, options: dict | None = None
) -> PrepareSummary:
    return prepare_glue("wnli", raw_root, out_dir, download=download, progress=progress, options=options or {})
