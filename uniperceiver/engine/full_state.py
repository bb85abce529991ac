"""Full (unsharded) model and optimizer state of a sharded (FSDP) model, and back.

Why apart from train_checkpoint.py: these are the collectives that turn FSDP's DTensor shards into
the plain tensors a model folder holds (final/, the weights of a step folder) and the format v1
optimizer.pt, and back; the step-folder logic does not need to know how.
"""

from __future__ import annotations

from typing import Any

import torch

from uniperceiver.engine import dcp_state
from uniperceiver.errors import CheckpointError
from uniperceiver.modeling.model import UniPerceiver


def plain_model(cfg: Any, state: dict[str, torch.Tensor]) -> UniPerceiver:
    """A plain UniPerceiver holding `state`'s tensors (no copy, no initialisation: built on meta)."""
    with torch.device("meta"):
        model = UniPerceiver(cfg)
    model.load_state_dict(state, assign=True)
    return model


_param_names = dcp_state.param_names


def gather_full_model(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full weights of a sharded model on the CPU of rank 0 (a collective; others get {})."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gather_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model state, optimizer state) of a sharded model, full and on the CPU of rank 0.

    A collective: every rank calls it; other ranks get empty containers. The optimizer state is
    converted from torch.distributed.checkpoint's parameter-name keys to the parameter indices of
    `optimizer.state_dict()`, so the file is the one a DDP or single-process run writes.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=opts)
    if not optimizer.state:  # nothing stepped yet: DCP would initialise it with a zero-gradient step
        return model_state, optimizer.state_dict()
    named = get_optimizer_state_dict(model, optimizer, options=opts)
    if not named:
        return model_state, {}
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in named["param_groups"]]
    return model_state, {"state": {index[n]: v for n, v in named["state"].items()}, "param_groups": groups}


def check_groups(saved: dict[str, Any], optimizer: torch.optim.Optimizer, source: str) -> None:
    sizes = [len(g["params"]) for g in saved.get("param_groups", [])]
    want = [len(g["params"]) for g in optimizer.param_groups]
    if sizes != want:
        raise CheckpointError(
            f"cannot resume: {source}/optimizer.pt has parameter groups of sizes {sizes}, this run's optimizer "
            f"{want} (another model or tuning mode)"
        )


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any],
                         source: str) -> None:
    """Load a full optimizer state (parameter-index keys) into `optimizer`, sharding it under FSDP."""
    from uniperceiver.engine.distributed import is_sharded

    groups = saved.get("param_groups", [])
    check_groups(saved, optimizer, source)
    if not is_sharded(model) or not saved.get("state"):
        optimizer.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    names = _param_names(model, optimizer)
    named = {
        "state": {names[int(i)]: v for i, v in saved["state"].items()},
        "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in groups],
    }
    # strict=False: parameters no step has used yet have no saved state (AdamW creates it lazily).
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True, strict=False))
    # DCP first gives every parameter a state (a zero-gradient step with lr 0); drop the ones the
    # checkpoint has none for, so they start from scratch exactly as in the uninterrupted run.
    by_name = dict(model.named_parameters())
    for name in set(names) - set(named["state"]):
        optimizer.state.pop(by_name[name], None)


def unsharded_copy(model: torch.nn.Module) -> UniPerceiver:
    """A plain model with the full weights of a sharded one, on every rank (a collective)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    copy = plain_model(model.cfg, {k: v.detach().clone() for k, v in state.items()})  # type: ignore[attr-defined]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for name, param in copy.named_parameters():
        param.requires_grad_(flags.get(name, True))
    return copy.train(model.training)


__all__ = [
    "check_groups", "gather_full_model", "gather_full_state", "load_optimizer_state", "plain_model", "unsharded_copy",
]
