"""GLUE MNLI (prepared dataset `glue-mnli`); the layout and label order are described in `_glue.py`."""

from __future__ import annotations

from pathlib import Path

from uniperceiver.data.format import PrepareSummary
from uniperceiver.data.preparers._glue import TASKS, layout, prepare_glue

DESCRIPTION = "GLUE MNLI (text classification / regression)"
LAYOUT = layout(TASKS["mnli"])
OPTIONS: dict[str, str] = {}


def prepare(
    raw_root: Path, out_dir: Path, *, download: bool = False, progress=None, options: dict | None = None
) -> PrepareSummary:
    return prepare_glue("mnli", raw_root, out_dir, download=download, progress=progress, options=options or {})
