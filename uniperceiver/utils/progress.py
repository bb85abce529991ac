"""The one progress type of the library: `progress(done, total, description)`.

Long library work (preparing a dataset, evaluating, benchmarking) reports through this callback so
that the command line can draw a bar while the library itself imports neither typer nor rich.
`total` is None when the amount of work is not known in advance.
"""

from __future__ import annotations

from typing import Callable

Progress = Callable[[int, "int | None", str], None]
