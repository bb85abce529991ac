"""Data-parallel set-up from the `torchrun` environment, and the collectives the trainer needs.

- `init_distributed()` reads RANK / WORLD_SIZE / LOCAL_RANK (torchrun) and joins the process group:
  NCCL on GPUs, gloo on CPUs. A single process needs no set-up at all.
- Every rank draws its own task per step (reference), so ranks run different graphs: DDP uses
  find_unused_parameters=True, and the shared target sets (vocabulary, class names) of all the
  tasks drawn on any rank are encoded together, each rank a contiguous shard with gradients,
  then all-gathered differentiably (`shard_encode`). Those collectives run on a second process
  group so they can never interleave with DDP's gradient all-reduce on the default group.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from uniperceiver.errors import ConfigError


@dataclass
class DistEnv:
    """Where this process sits. `group` is the side group for target gathering and agreement."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    group: Any = None
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(device: str | None = None) -> torch.device:
    """`device` if given ("cpu", "cuda", "cuda:1"), else CUDA when available, else CPU."""
    if device:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available on this machine")
        return dev
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def init_distributed(device: str | None = None, timeout_s: float = 1800.0) -> DistEnv:
    """Join the torchrun process group when WORLD_SIZE > 1; otherwise describe a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    dev = pick_device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else (local % max(1, torch.cuda.device_count()))
        dev = torch.device("cuda", index)
        torch.cuda.set_device(dev)
    if world <= 1:
        return DistEnv(0, 1, 0, dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        owns = True
    # A second group of the same backend: target gathering and small agreements never share a
    # queue with DDP's bucketed gradient all-reduce, whose order differs between ranks.
    group = dist.new_group(backend=backend)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local, dev, backend, group, owns)


def shutdown_distributed(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(module: nn.Module, env: DistEnv) -> nn.Module:
    """DDP with find_unused_parameters=True (each rank trains a different task) when distributed."""
    if not env.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [env.device.index] if env.device.type == "cuda" else None
    return DDP(module, device_ids=ids, find_unused_parameters=True)


def all_gather_with_grad(tensor: Tensor, group: Any = None) -> Tensor:
    """Concatenate `tensor` from every rank along dim 0; gradients flow back to each rank's piece.

    All ranks must pass tensors of the same shape. Identity without a process group.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor.contiguous(), group=group), dim=0)


def gather_ints(values: list[int], env: DistEnv) -> list[list[int]]:
    """Every rank's small list of ints (same length everywhere), e.g. the task each rank drew."""
    if not env.distributed:
        return [list(values)]
    t = torch.tensor(values, dtype=torch.long)
    if env.backend == "nccl":
        t = t.to(env.device)
    out = [torch.zeros_like(t) for _ in range(env.world_size)]
    dist.all_gather(out, t, group=env.group)
    return [o.cpu().tolist() for o in out]


def any_flag(flag: bool, env: DistEnv) -> bool:
    """True on every rank when any rank passes True (agreement on skip / stop decisions)."""
    if not env.distributed:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.long)
    if env.backend == "nccl":
        t = t.to(env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=env.group)
    return bool(t.item())


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier(group=env.group)


def shard_bounds(n: int, world: int, rank: int) -> tuple[int, int, int]:
    """Contiguous shard [start, stop) of n rows for `rank`, and the padded shard length."""
    per = -(-n // world)
    start = min(n, rank * per)
    stop = min(n, start + per)
    return start, stop, per


def shard_encode(model: nn.Module, ids: Tensor, valid: Tensor, env: DistEnv, chunk: int = 4096) -> Tensor:
    """Encode N target sequences split across ranks, all-gathered with gradients: [N, D] everywhere.

    Each rank encodes rows [rank * ceil(N/W), ...) with gradients; shards are padded to equal length
    (padding rows are real sequences, dropped after gathering) so the all-gather is well defined.
    """
    n = ids.shape[0]
    start, stop, per = shard_bounds(n, env.world_size, env.rank)
    local_ids, local_valid = ids[start:stop], valid[start:stop]
    if local_ids.shape[0] < per:  # pad with copies of row 0
        pad = per - local_ids.shape[0]
        local_ids = torch.cat([local_ids, ids[:1].expand(pad, -1)], 0)
        local_valid = torch.cat([local_valid, valid[:1].expand(pad, -1)], 0)
    feats = encode_rows(model, local_ids, local_valid, chunk)
    gathered = all_gather_with_grad(feats, env.group)
    if env.world_size == 1:
        return gathered[:n]
    pieces = []
    for r in range(env.world_size):
        s, e, _ = shard_bounds(n, env.world_size, r)
        pieces.append(gathered[r * per : r * per + (e - s)])
    return torch.cat(pieces, 0)


def encode_rows(model: nn.Module, ids: Tensor, valid: Tensor, chunk: int = 4096) -> Tensor:
    """`model.encode_text` over rows in chunks, trimming padding columns per chunk."""
    device = model.device  # type: ignore[attr-defined]
    outs = []
    for s in range(0, ids.shape[0], chunk):
        i = ids[s : s + chunk].to(device)
        v = valid[s : s + chunk].to(device)
        keep = max(1, int(v.sum(1).max()))
        outs.append(model.encode_text(i[:, :keep], v[:, :keep]))  # type: ignore[attr-defined]
    return torch.cat(outs, 0)


__all__ = [
    "DistEnv",
    "all_gather_with_grad",
    "any_flag",
    "barrier",
    "encode_rows",
    "gather_ints",
    "init_distributed",
    "pick_device",
    "shard_bounds",
    "shard_encode",
    "shutdown_distributed",
    "wrap_model",
]
