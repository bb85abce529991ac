"""Run folders: where a training run keeps its recipe, metrics, curves and checkpoints.

    runs/<stage>-<task>-<YYYYmmdd-HHMMSS>/
        recipe.yaml          the fully resolved recipe (overrides applied): rerun it as is
        metrics.csv          step,time_s,phase,task,name,value (long format: any metric, any task)
        events.out.tfevents  TensorBoard, when tensorboard is installed
        curves.png           loss per task and learning rate (matplotlib, Agg backend)
        checkpoints/         step-NNNNNN/ folders and the `latest` pointer
        final/               the final weights as a model directory (what later stages load)

Long format because tasks report different statistics and evaluation adds metrics mid-run; a
resumed run first drops rows logged after its checkpoint, so the curve has no duplicates.
"""

from __future__ import annotations

import csv
import io
import re
import time
from pathlib import Path
from typing import Any, Iterable

# Finding a run's weights is read-only layout knowledge that evaluation needs too (it sits below the engine).
from uniperceiver.evaluation.checkpoints import (  # noqa: F401 - re-exported
    CKPT_DIR, FINAL_NAME, RUN_INFO, RunRecord, default_runs_root, list_runs, model_dir_of_run, newest_pretrained,
    read_run_info, resolve_model_dir,
)
from uniperceiver.utils.files import atomic_write_bytes, atomic_write_text

METRICS_NAME = "metrics.csv"
RECIPE_NAME = "recipe.yaml"
PLOT_NAME = "curves.png"
CSV_FIELDS = ("step", "time_s", "phase", "task", "name", "value")
_SAFE = re.compile(r"[^A-Za-z0-9_.\-]+")


def run_name(stage: str, label: str, when: float | None = None) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(when))
    return f"{stage.replace('_', '-')}-{_SAFE.sub('_', label).strip('_') or 'run'}-{stamp}"


def new_run_dir(root: Path, stage: str, label: str) -> Path:
    """A fresh, unique run folder under `root` (a suffix -2, -3 ... when two start in one second)."""
    root = Path(root)
    base = run_name(stage, label)
    path = root / base
    n = 2
    while path.exists():
        path = root / f"{base}-{n}"
        n += 1
    path.mkdir(parents=True)
    return path


class MetricsLog:
    """Append-only CSV of metrics (flushed per write), plus TensorBoard scalars when available."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, purge_step: int | None = None) -> None:
        """`purge_step`: a resumed run's first step; TensorBoard hides older events at or after it."""
        self.path = Path(run_dir) / METRICS_NAME
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

                self._tb = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)
            except Exception:  # tensorboard not installed: CSV only
                self._tb = None
        new = not self.path.is_file() or self.path.stat().st_size == 0
        self._fh = open(self.path, "a", newline="", encoding="utf-8")
        self._csv = csv.writer(self._fh)
        if new:
            self._csv.writerow(CSV_FIELDS)
            self._fh.flush()

    @property
    def tensorboard(self) -> bool:
        return self._tb is not None

    def write(self, step: int, phase: str, task: str, values: dict[str, float], time_s: float) -> None:
        for name, value in values.items():
            self._csv.writerow([step, f"{time_s:.3f}", phase, task, name, repr(float(value))])
            if self._tb is not None:
                tag = f"{phase}/{task}/{name}" if task else f"{phase}/{name}"
                self._tb.add_scalar(tag, float(value), step)
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def truncate_metrics(run_dir: Path, after_step: int) -> int:
    """Drop rows with step > after_step (logged after the checkpoint a run resumes from)."""
    path = Path(run_dir) / METRICS_NAME
    if not path.is_file():
        return 0
    rows = read_metrics(path)
    keep = [r for r in rows if int(r["step"]) <= after_step]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_FIELDS)
    for r in keep:
        w.writerow([r[k] for k in CSV_FIELDS])
    atomic_write_text(path, buf.getvalue())
    return len(rows) - len(keep)


def read_metrics(path: Path) -> list[dict[str, str]]:
    """Rows of a metrics.csv as dicts of strings (a partly written last line is ignored)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_NAME
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return [r for r in rows if all(r.get(k) not in (None, "") for k in ("step", "name", "value"))]


def plot_curves(run_dir: Path) -> Path | None:
    """Loss per task and the learning rate against steps as curves.png; None when nothing to plot."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS_NAME
    if not path.is_file():
        return None
    rows = read_metrics(path)
    losses: dict[str, list[tuple[int, float]]] = {}
    lrs: list[tuple[int, float]] = []
    for r in rows:
        if r["phase"] != "train":
            continue
        if r["name"] == "loss":
            losses.setdefault(r["task"] or "all", []).append((int(r["step"]), float(r["value"])))
        elif r["name"] == "lr" and not r["task"]:
            lrs.append((int(r["step"]), float(r["value"])))
    if not losses and not lrs:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no display

    fig = Figure(figsize=(10, 4), dpi=100)
    ax1, ax2 = fig.subplots(1, 2)
    if len(losses) > 1:
        losses.pop("all", None)  # the mixture's mean mixes different losses: show tasks only
    for task, pts in sorted(losses.items()):
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], label=task, linewidth=1,
                 marker="." if len(pts) < 50 else None)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss")
    if losses:
        ax1.legend(fontsize=7)
    ax2.plot([p[0] for p in lrs], [p[1] for p in lrs], color="tab:orange")
    ax2.set_xlabel("step")
    ax2.set_ylabel("learning rate")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    out = run_dir / PLOT_NAME
    atomic_write_bytes(out, buf.getvalue())
    return out


def write_run_info(run_dir: Path, info: dict[str, Any]) -> None:
    from uniperceiver.utils.files import atomic_write_json

    atomic_write_json(Path(run_dir) / RUN_INFO, info)


def iter_step_losses(run_dir: Path) -> Iterable[tuple[int, str, float]]:
    """(step, task, loss) of every logged training loss row."""
    for r in read_metrics(Path(run_dir) / METRICS_NAME):
        if r["phase"] == "train" and r["name"] == "loss":
            yield int(r["step"]), r["task"], float(r["value"])


__all__ = [
    "CKPT_DIR",
    "FINAL_NAME",
    "METRICS_NAME",
    "MetricsLog",
    "RunRecord",
    "iter_step_losses",
    "list_runs",
    "model_dir_of_run",
    "new_run_dir",
    "newest_pretrained",
    "plot_curves",
    "read_metrics",
    "read_run_info",
    "resolve_model_dir",
    "run_name",
    "truncate_metrics",
    "write_run_info",
]
