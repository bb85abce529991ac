"""`upctl bench --sections checkpoint`: saving and resuming a training checkpoint, old paths vs DCP.

Three paths, the same model and optimizer state:

- old ("buffered"): every file built as bytes in memory (a full copy of model and optimizer
  state), written, then every file read back to hash it; resuming verified every file, verified
  them again when loading, hashed the weights a third time against config.json, and read the
  full weights into a state dict beside the model;
- new ("streamed"): files streamed from the live tensors and hashed on their way to disk; on
  resume every file is hashed once (files side by side), the weights are read straight into the
  parameters (format v1: the whole optimizer state in optimizer.pt);
- dcp (today's, format v3): the weights and the optimizer's tensors through
  torch.distributed.checkpoint (every rank writes and reads its own part; here one process, two
  writer threads), XXH3-128 sums computed while written (the older paths: sha256); on resume every
  file is hashed once, the weights read straight into the parameters and the optimizer state
  straight into new state tensors.

Each measurement runs in a fresh process (a process's resident high-water mark only grows), on a
model of the named size with a full AdamW state, three times; rows give medians. `extra_peak_mb`
is the resident-memory high-water mark above what the process held before (model + optimizer
state for a save; the fresh model and an empty optimizer for a resume, so a resume's figure
includes the optimizer state it loads: `state_mb` says how much that is).
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from uniperceiver.bench.timing import current_rss_bytes, peak_rss_bytes, reset_peak_rss, run_for_result

METHODS = ("buffered", "streamed", "dcp")


def _trainables(size: str) -> tuple[Any, Any, Any]:
    """A model of `size`, its AdamW with a full state (one step taken) and the schedule."""
    from uniperceiver.config.schema import OptimSection
    from uniperceiver.engine.optim import build_optimizer, build_scheduler
    from uniperceiver.modeling import build_model

    model = build_model(size)
    optim = OptimSection()
    optimizer = build_optimizer(model, optim)
    scheduler = build_scheduler(optimizer, optim, 1000)
    return model, optimizer, scheduler


def _fill_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _save(root: Path, method: str, model: Any, optimizer: Any, scheduler: Any) -> Path:
    """The writer of `save_training_checkpoint` (one process), with a real TrainState."""
    from uniperceiver.engine import train_checkpoint as ckpt
    from uniperceiver.engine.train_state import TrainState, capture_rng_state

    from uniperceiver.engine import dcp_state

    buffered = method == "buffered"
    state = TrainState(step=1, data={"draw": 1, "samplers": {}, "skipped": {}}, rng=capture_rng_state())
    parts = ckpt.Trainables(model, optimizer, scheduler, None, None)  # type: ignore[arg-type]
    tmp = ckpt.begin_checkpoint(root, state.step)
    tensors, rest = dcp_state.split_optimizer_state(model, optimizer) if method == "dcp" else ({}, None)
    digests = ckpt.write_main_state(tmp, parts, state.shared_dict(), buffered=buffered, optimizer_rest=rest)
    if method == "dcp":
        digests.update(dcp_state.save_tensors(tmp / ckpt.MODEL_DCP, ckpt.model_tensors(model), thread_count=2))
        digests.update(dcp_state.save_tensors(tmp / ckpt.SHARDED_DIR, tensors, thread_count=2))
        digests.update(ckpt.write_model_config(tmp, model.cfg, digests))
    digests.update(ckpt.write_rank_state(tmp, 0, state.rank_dict() or {}, buffered=buffered,
                                         algorithm="sha256" if method != "dcp" else "xxh3_128"))
    return ckpt.commit_checkpoint(root, state.step, keep=1, extra_meta={}, digests=digests)


def _resume(root: Path, method: str, model: Any, optimizer: Any, scheduler: Any) -> None:
    """What the trainer does on `--resume auto`, the old way or the new way."""
    from uniperceiver.engine import train_checkpoint as ckpt
    from uniperceiver.modeling.model_dir import load_state

    if method == "buffered":
        path = ckpt.list_checkpoints(root)[0]
        _verify_one_by_one(path)  # find_valid_checkpoint
        _verify_one_by_one(path)  # load_checkpoint verified again
        saved = ckpt.load_checkpoint(path, verified=True)
        ckpt.load_weights_into(model, load_state(path), str(path))  # weights hashed a third time, then copied
    else:
        path = ckpt.find_valid_checkpoint(root)
        assert path is not None
        saved = ckpt.load_checkpoint(path, verified=True)
        ckpt.read_weights_into(model, path)
    ckpt.restore_optimizer(saved, model, optimizer)
    scheduler.load_state_dict(saved.scheduler)


def _verify_one_by_one(path: Path) -> None:
    """The first verifier: every file of meta.json hashed in turn (today's hashes them side by side)."""
    import json

    from uniperceiver.utils.files import sha256_file

    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    for name, digest in meta["files"].items():
        if sha256_file(path / name) != digest:
            raise RuntimeError(f"{path / name}: checksum mismatch")


def _checkpoint_worker(size: str, method: str, phase: str, folder: str) -> dict[str, Any]:
    """One save or one resume in this (fresh) process: seconds and the extra resident peak."""
    torch.manual_seed(0)
    model, optimizer, scheduler = _trainables(size)
    if phase == "save":
        _fill_state(model, optimizer)
    base = current_rss_bytes()
    reset_peak_rss()
    start = time.perf_counter()
    if phase == "save":
        _save(Path(folder), method, model, optimizer, scheduler)
    else:
        _resume(Path(folder), method, model, optimizer, scheduler)
    seconds = time.perf_counter() - start
    state = sum(t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values()
                if torch.is_tensor(t))
    return {"seconds": seconds, "extra_peak_mb": (peak_rss_bytes() - base) / 2**20, "state_mb": state / 2**20,
            "bytes_on_disk": sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())}


def _in_subprocess(*args: str) -> dict[str, Any]:
    code = ("import json; from uniperceiver.bench.checkpoint_section import _checkpoint_worker as f; "
            f"print('RESULT ' + json.dumps(f(*{list(args)!r})))")
    return run_for_result([sys.executable, "-c", code], timeout=3600)


def measure(size: str, repeats: int = 3, folder: Path | None = None) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """{method: {"save": [result per repeat], "resume": [...]}}; the methods alternate per repeat."""
    work = Path(tempfile.mkdtemp(prefix="upctl-bench-ckpt-", dir=folder))
    out: dict[str, dict[str, list[dict[str, Any]]]] = {m: {"save": [], "resume": []} for m in METHODS}
    try:
        for _ in range(repeats):
            for method in METHODS:
                root = work / method
                shutil.rmtree(root, ignore_errors=True)
                out[method]["save"].append(_in_subprocess(size, method, "save", str(root)))
                out[method]["resume"].append(_in_subprocess(size, method, "resume", str(root)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in rows))


def checkpoint_section(report: Any, device: torch.device, quick: bool, sizes: list[str] | None = None) -> None:
    """Rows per size (default base and large; base alone with `quick`): old (buffered), streamed and
    DCP save / resume (median seconds, extra peak MB) and the DCP path's speed-up over the old one."""
    import os

    for size in sizes or (["base"] if quick else ["base", "large"]):
        load = os.getloadavg()
        results = measure(size, repeats=3)
        for phase in ("save", "resume"):
            old, mid, new = results["buffered"][phase], results["streamed"][phase], results["dcp"][phase]
            report.add("checkpoint", f"{size} {phase}: old (buffered) vs streamed vs dcp",
                       seconds_old=round(_median(old, "seconds"), 2), seconds_streamed=round(_median(mid, "seconds"), 2),
                       seconds_dcp=round(_median(new, "seconds"), 2),
                       speedup=round(_median(old, "seconds") / max(_median(new, "seconds"), 1e-9), 2),
                       extra_peak_mb_old=round(_median(old, "extra_peak_mb")),
                       extra_peak_mb_streamed=round(_median(mid, "extra_peak_mb")),
                       extra_peak_mb_dcp=round(_median(new, "extra_peak_mb")),
                       optimizer_state_mb=round(_median(new, "state_mb")),
                       checkpoint_mb=round(_median(new, "bytes_on_disk") / 2**20),
                       load_avg_1m=round(load[0], 2))


__all__ = ["METHODS", "checkpoint_section", "measure"]
