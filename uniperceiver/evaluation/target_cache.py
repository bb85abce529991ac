"""A cache of encoded target sets (class names, answers, the 49,411-entry vocabulary).

Why: at evaluation the targets do not change, yet encoding them is expensive (the vocabulary is
49,411 encoder passes). The features depend only on the weights and on the target token ids, so
they are keyed by (a digest of the checkpoint, `TargetSet.key`) and kept in memory for the life
of the cache object and on disk as `<dir>/<model_key>/<target_key>.safetensors` across runs.

The model key is `uniperceiver.modeling.model_dir.weights_digest(model_dir)` for a checkpoint on
disk, or `state_digest(model)` for an in-memory model (`model_key_for`). Disk writes are atomic, a
corrupt or mismatched file is recomputed and overwritten, and nothing here is global: two caches
on the same folder share only the files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from uniperceiver.errors import UpctlError
from uniperceiver.tasks.base import TargetSet
from uniperceiver.utils.files import atomic_write

__all__ = ["TargetCache", "default_cache_dir", "model_key_for"]

_SAFE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_FORMAT = "upctl-targets-v1"


def default_cache_dir() -> Path:
    """`$UPCTL_CACHE` if set, else `~/.cache/upctl/targets`."""
    env = os.environ.get("UPCTL_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/upctl/targets").expanduser()


def model_key_for(model: torch.nn.Module, model_dir: str | Path | None = None) -> str:
    """The cache key of a model: the weights file digest when loaded from a directory, else its state digest."""
    from uniperceiver.modeling.model_dir import WEIGHTS_NAME, state_digest, weights_digest

    if model_dir is not None and (Path(model_dir) / WEIGHTS_NAME).is_file():
        return weights_digest(model_dir)
    return state_digest(model)  # type: ignore[arg-type]


def _check_key(kind: str, key: str) -> str:
    if not isinstance(key, str) or not _SAFE_KEY.match(key):
        raise UpctlError(f"target cache: {kind} {key!r} is not a safe file name (letters, digits, '.', '_', '-')")
    return key


class TargetCache:
    """Encoded target features, in memory and (when `dir` is not None) on disk.

    `get(model_key, target_set, compute)` returns the features [N, D]; `compute()` runs only on a
    miss. Counters: `hits` (memory or disk), `disk_hits` (the disk part of `hits`), `misses`
    (computed). `dir=None` keeps features in memory only.
    """

    def __init__(self, dir: str | Path | None = None) -> None:  # noqa: A002 - `TargetCache(dir)` reads best at the call site
        self.dir = None if dir is None else Path(dir).expanduser()
        self.hits = 0
        self.misses = 0
        self.disk_hits = 0
        self._memory: dict[tuple[str, str], Tensor] = {}

    def __repr__(self) -> str:
        return f"TargetCache(dir={str(self.dir)!r}, hits={self.hits}, disk_hits={self.disk_hits}, misses={self.misses})"

    def path(self, model_key: str, target_set: TargetSet) -> Path | None:
        """Where the features of this (model, target set) live on disk, or None without a folder."""
        if self.dir is None:
            return None
        return self.dir / _check_key("model key", model_key) / f"{_check_key('target key', target_set.key)}.safetensors"

    def get(
        self,
        model_key: str,
        target_set: TargetSet,
        compute: Callable[[], Tensor],
        device: torch.device | str | None = None,
    ) -> Tensor:
        """The features of `target_set` under the model `model_key`, computing them at most once.

        `device`: where the returned tensor lives (default: where `compute` put it, or CPU after a
        disk hit). The tensor is detached: cached features never carry an autograd graph.
        """
        _check_key("model key", model_key)
        _check_key("target key", target_set.key)
        mem_key = (model_key, target_set.key)
        feats = self._memory.get(mem_key)
        if feats is not None:
            self.hits += 1
            return feats if device is None else feats.to(device)
        feats = self._read_disk(model_key, target_set)
        if feats is not None:
            self.hits += 1
            self.disk_hits += 1
        else:
            with torch.no_grad():
                feats = compute()
            if not isinstance(feats, Tensor) or feats.dim() != 2 or feats.shape[0] != len(target_set):
                shape = tuple(feats.shape) if isinstance(feats, Tensor) else type(feats).__name__
                raise UpctlError(
                    f"target cache: encoding {target_set.name!r} gave {shape}, expected [{len(target_set)}, D]"
                )
            feats = feats.detach()
            self.misses += 1
            self._write_disk(model_key, target_set, feats)
        if device is not None:
            feats = feats.to(device)
        self._memory[mem_key] = feats
        return feats

    def clear_memory(self) -> None:
        """Forget the in-memory copies (the disk files stay)."""
        self._memory.clear()

    # -- disk --------------------------------------------------------------------------------------
    def _read_disk(self, model_key: str, target_set: TargetSet) -> Tensor | None:
        path = self.path(model_key, target_set)
        if path is None or not path.is_file():
            return None
        try:
            tensors = st_load(path.read_bytes())
        except (SafetensorError, OSError, ValueError):
            return None  # corrupt or unreadable: recompute and overwrite
        feats = tensors.get("features")
        if feats is None or feats.dim() != 2 or feats.shape[0] != len(target_set):
            return None
        return feats

    def _write_disk(self, model_key: str, target_set: TargetSet, feats: Tensor) -> None:
        path = self.path(model_key, target_set)
        if path is None:
            return
        data = st_save(
            {"features": feats.detach().float().cpu().contiguous()},
            metadata={
                "format": _FORMAT,
                "model_key": model_key,
                "target_key": target_set.key,
                "target_name": target_set.name,
                "count": str(len(target_set)),
            },
        )
        try:
            atomic_write(path, lambda fh: fh.write(data))
        except OSError as exc:
            raise UpctlError(f"target cache: cannot write {path} ({exc}); set UPCTL_CACHE to a writable folder") from None
