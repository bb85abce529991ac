"""Data-parallel set-up from the `torchrun` environment, and the collectives the trainer needs.

- `init_distributed()` reads RANK / WORLD_SIZE / LOCAL_RANK (torchrun) and joins the process group:
  NCCL on GPUs, gloo on CPUs. A single process needs no set-up at all.
- Every rank draws its own task per step (reference), so ranks run different graphs: DDP uses
  find_unused_parameters=True, and the shared target sets (vocabulary, class names) of all the
  tasks drawn on any rank are encoded together, each rank a contiguous shard with gradients,
  then all-gathered differentiably (`shard_encode`, through `utils.collectives.all_gather_with_grad`). Those collectives run on a second process
  group so they can never interleave with DDP's gradient all-reduce on the default group.
- `train.sharding: fsdp` shards parameters, gradients and optimizer state with FSDP2
  (`fully_shard`) instead. The step module is ONE FSDP unit, not one unit per encoder block: a
  micro-step runs the encoder a task-dependent number of times (targets, then one or two inputs),
  and per-block units issue collectives per block call, so ranks training different tasks would
  issue different collective sequences (gloo hangs or, worse, pairs equal-sized all-gathers of
  different blocks). With one unit every rank issues exactly one all-gather and one reduce-scatter
  per micro-step. Parameters a rank did not use take part with zero gradients (without that, gloo
  silently pairs one rank's gradients of one parameter with another rank's of an equal-sized other
  one); parameters no rank used lose their gradient afterwards (`finish_grads`), which is DDP's
  rule, so AdamW skips them exactly as under DDP. FSDP2 cannot shard 0-dim parameters (the logit
  scales): those stay replicated and `finish_grads` averages their gradients like DDP does.
- A peer that dies makes this rank's next collective fail with a backend error (gloo: "Connection
  closed by peer"); `peer_failure` turns that into `PeerLost`, one line naming this rank, so every
  surviving rank prints one line instead of a backend traceback. The process group's timeout is
  `train.collective_timeout_s`; the step watchdog (watchdog.py) normally acts long before it.
"""

from __future__ import annotations

import datetime
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from uniperceiver.errors import ConfigError, UpctlError
from uniperceiver.utils.collectives import all_gather_with_grad


class PeerLost(UpctlError):
    """A collective failed because another rank died or stopped answering."""


#: What the backends say when the other end of a collective is gone or silent.
_PEER_SIGNS = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out waiting",
               "socket timeout", "nccl communicator was aborted", "read error", "connection refused")


def peer_failure(exc: BaseException, env: "DistEnv") -> PeerLost | None:
    """`PeerLost` (one line naming this rank) for a backend error that means a peer is gone, else None."""
    if not env.distributed or not isinstance(exc, RuntimeError):
        return None
    text = str(exc)
    lowered = text.lower()
    if not isinstance(exc, dist.DistError) and not any(sign in lowered for sign in _PEER_SIGNS):
        return None
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0]  # gloo's "[.../pair.cc:561] " source prefix
    return PeerLost(
        f"rank {env.rank}: another rank of this {env.world_size}-rank job died or stopped answering ({env.backend}: "
        f"{first[:200]}); this rank stops too, the launcher's report names the rank that failed first, and "
        "--resume auto continues from the last checkpoint"
    )


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
    #: Seconds a collective of this job's process groups may wait (`train.collective_timeout_s`).
    timeout_s: float = 1800.0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch_rank() -> int:
    """This process's rank as the launcher (torchrun) set it, 0 otherwise.

    Known before any process group exists, so a caller can decide early who prints (rank 0 only).
    """
    return int(os.environ.get("RANK", "0"))


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
        # torch.distributed.nn (which torch.distributed.checkpoint imports) binds the default group into
        # its functions' default arguments when first imported: imported after the group exists, it
        # keeps the gloo group alive past destroy_process_group and the process aborts at exit
        # ("terminate called without an active exception", about half of 2-rank runs). Before: never.
        import torch.distributed.nn  # noqa: F401

        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        owns = True
    # A second group of the same backend: target gathering and small agreements never share a
    # queue with DDP's bucketed gradient all-reduce, whose order differs between ranks.
    # It gets the same timeout: a group made without one waits the default 30 minutes.
    group = dist.new_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistEnv(dist.get_rank(), dist.get_world_size(), local, dev, backend, group, owns, timeout_s)


def shutdown_distributed(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except RuntimeError:  # after a peer died, tearing down may fail too: the first error is the one to report
            pass


SHARDINGS = ("ddp", "fsdp")


def wrap_model(
    module: nn.Module, env: DistEnv, sharding: str = "ddp", amp_dtype: torch.dtype | None = None
) -> nn.Module:
    """The data-parallel wrapper of `module` when distributed (the module itself on one process).

    sharding "ddp": DDP with find_unused_parameters=True (each rank trains a different task).
    sharding "fsdp": FSDP2 `fully_shard` of the whole module as one unit (see the module docstring),
    bf16 parameters with fp32 gradient reduction when training in bf16 on CUDA. The optimizer must
    be built AFTER this call: FSDP replaces the parameters by sharded DTensor parameters.
    """
    if sharding not in SHARDINGS:
        raise ConfigError(f"train.sharding={sharding!r}; expected one of {', '.join(SHARDINGS)}")
    if not env.distributed:
        return module
    if sharding == "fsdp":
        return _fully_shard(module, env, amp_dtype)
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [env.device.index] if env.device.type == "cuda" else None
    return DDP(module, device_ids=ids, find_unused_parameters=True)


class _FsdpGrads:
    """What FSDP leaves to us: which parameters got a gradient on this rank since the last optimizer
    step, and the replicated (0-dim) parameters whose gradients FSDP does not reduce.

    FSDP computes gradients on its unsharded parameters (the same Parameter objects every step,
    registered on the modules while unsharded), so a post-accumulate-grad hook on each records use.
    """

    def __init__(self, root: nn.Module, replicated: set[nn.Parameter]) -> None:
        self.sharded = [p for _, p in root.named_parameters()]
        keep = {id(p) for p in replicated}
        self.replicated = [i for i, p in enumerate(self.sharded) if id(p) in keep]
        root.unshard()  # type: ignore[operator]  # FSDPModule.unshard: registers the unsharded parameters
        try:
            full = [p for _, p in root.named_parameters()]
            self.used = [False] * len(full)
            for i, p in enumerate(full):
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(self._hook(i))
        finally:
            root.reshard()  # type: ignore[operator]

    def _hook(self, index: int) -> Any:
        def mark(_: Tensor) -> None:
            self.used[index] = True

        return mark


def _fully_shard(module: nn.Module, env: DistEnv, amp_dtype: torch.dtype | None) -> nn.Module:
    if amp_dtype is torch.float16:
        raise ConfigError(
            "train.sharding=fsdp does not support fp16 loss scaling (train.precision=fp16, or auto on a GPU "
            "without bf16); set train.precision=bf16 or fp32, or train.sharding=ddp"
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    policy = MixedPrecisionPolicy()
    if env.device.type == "cuda" and amp_dtype is torch.bfloat16:
        # Inputs keep their dtype (autocast casts per op); the reduction stays in fp32.
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                      cast_forward_inputs=False)
    # fully_shard refuses 0-dim parameters ("doesn't support scalar parameters"): keep them whole.
    scalars = {p for p in module.parameters() if p.dim() == 0}
    sharded = fully_shard(module, mesh=mesh, mp_policy=policy, ignored_params=scalars or None)
    # Ranks use different parameters (a text task never touches the patch embedding): zero
    # gradients keep every rank's reduce-scatter the same size.
    sharded.set_reduce_scatter_unused_params(True)
    sharded.upctl_grads = _FsdpGrads(sharded, scalars)  # type: ignore[assignment]
    return sharded


def _loaded(module_name: str, attr: str) -> Any:
    """A class from a torch.distributed module if that module was imported (else nothing can be one)."""
    mod = sys.modules.get(module_name)
    return getattr(mod, attr, None) if mod is not None else None


def is_fsdp(module: nn.Module) -> bool:
    """True for a module wrapped by `wrap_model(..., sharding="fsdp")` on several ranks."""
    cls = _loaded("torch.distributed.fsdp", "FSDPModule")
    return cls is not None and isinstance(module, cls)


def is_sharded(module: nn.Module) -> bool:
    """True when `module` (or the model inside an FSDP unit) holds sharded DTensor parameters."""
    cls = _loaded("torch.distributed.tensor", "DTensor")
    return cls is not None and any(isinstance(p, cls) for p in module.parameters())


@contextmanager
def skip_grad_sync(module: nn.Module, skip: bool) -> Iterator[None]:
    """Gradient accumulation without communication on non-final micro-steps, for DDP and FSDP.

    DDP: `no_sync()`. FSDP: no reduce-scatter and no reshard after backward, so the next micro-step
    reuses the gathered parameters; both are switched back on for the final micro-step.
    """
    if not skip:
        yield
        return
    if is_fsdp(module):
        module.set_requires_gradient_sync(False)  # type: ignore[operator]
        module.set_reshard_after_backward(False)  # type: ignore[operator]
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)  # type: ignore[operator]
            module.set_reshard_after_backward(True)  # type: ignore[operator]
        return
    if not isinstance(module, nn.parallel.DistributedDataParallel):
        yield
        return
    with module.no_sync():
        yield


def finish_grads(module: nn.Module, env: DistEnv) -> None:
    """FSDP, after the last micro-step's backward: finish the gradients the way DDP leaves them.

    - The replicated 0-dim parameters' gradients are averaged over ranks (zero from a rank that did
      not use one), divided before summing as DDP does.
    - Parameters that NO rank used get no gradient: FSDP reduce-scatters zeros for them (so the
      collectives match), DDP leaves them None and AdamW then skips them (no moment decay, no step
      count).
    One all-reduce on the side group for both. A no-op for DDP and single processes.
    """
    if not is_fsdp(module):
        return
    info: _FsdpGrads = module.upctl_grads  # type: ignore[assignment]  # set by `wrap_model` on every module it shards
    dev = env.device if env.backend == "nccl" else torch.device("cpu")
    parts = [torch.tensor(info.used, dtype=torch.float32, device=dev)]
    for i in info.replicated:
        p = info.sharded[i]
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        parts.append((g.detach().float() / env.world_size).reshape(-1).to(dev))
    buf = torch.cat(parts)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=env.group)
    n = len(info.used)
    used = (buf[:n] > 0).cpu().tolist()
    at = n
    for i in info.replicated:
        p = info.sharded[i]
        p.grad = buf[at : at + p.numel()].view_as(p).to(device=p.device, dtype=p.dtype).clone()
        at += p.numel()
    for flag, param in zip(used, info.sharded):
        if not flag:
            param.grad = None
    info.used = [False] * n


@contextmanager
def full_params(module: nn.Module) -> Iterator[None]:
    """Unsharded parameters on the modules inside (FSDP), e.g. for evaluation between steps."""
    if not is_fsdp(module):
        yield
        return
    module.unshard()  # type: ignore[operator]
    try:
        yield
    finally:
        module.reshard()  # type: ignore[operator]


def clip_gradients(params: Iterable[Tensor], max_norm: float) -> Tensor:
    """`clip_grad_norm_` with the GLOBAL norm also for FSDP's sharded gradients.

    The same two torch steps as `torch.nn.utils.clip_grad_norm_` (so DDP runs are unchanged); with
    DTensor gradients the per-shard norms are combined across ranks (`full_tensor`) before clipping.
    """
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    dtensor = _loaded("torch.distributed.tensor", "DTensor")
    sharded = [g for g in grads if dtensor is not None and isinstance(g, dtensor)]
    if not sharded:
        total = torch.nn.utils.get_total_norm(grads, 2.0)
    else:  # FSDP: sharded gradients (a global norm over the shards) + the replicated 0-dim ones
        plain = [g for g in grads if not isinstance(g, dtensor)]
        norms = [torch.nn.utils.get_total_norm(sharded, 2.0).full_tensor()]
        if plain:
            norms.append(torch.nn.utils.get_total_norm(plain, 2.0).to(norms[0].device))
        total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


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
    "PeerLost",
    "peer_failure",
    "all_gather_with_grad",
    "any_flag",
    "barrier",
    "clip_gradients",
    "finish_grads",
    "encode_rows",
    "full_params",
    "gather_ints",
    "init_distributed",
    "is_fsdp",
    "is_sharded",
    "launch_rank",
    "pick_device",
    "shard_bounds",
    "shard_encode",
    "shutdown_distributed",
    "skip_grad_sync",
    "wrap_model",
]
