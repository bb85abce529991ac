"""Two real gloo processes (torchrun): identical weights after multi-task training where each rank
draws its own task; the sharded, differentiable target encoding equals the single-process one in
features and gradients; every rank's data cursors and RNG states land in the checkpoint.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from uniperceiver.engine import train_checkpoint as ckpt
from uniperceiver.engine.distributed import DistEnv, all_gather_with_grad, shard_bounds, shard_encode

import sys as _sys
_sys.path.insert(0, str(Path(__file__).parent))
from _trainer_fixtures import mini_data  # noqa: E402,F401  (shared fixture)

REPO = Path(__file__).resolve().parents[1]


WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist
    from uniperceiver.config import recipe_from_dict
    from uniperceiver.engine.distributed import DistEnv, shard_encode
    from uniperceiver.engine.trainer import train
    from uniperceiver.modeling import build_model
    from uniperceiver.modeling.model_dir import state_digest
    from uniperceiver.tasks.base import encode_targets, vocab_target_set

    out, data = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    env = DistEnv(rank, world, rank, torch.device("cpu"), "gloo", dist.new_group(backend="gloo"))

    # 1) sharded target encoding == single-process encoding, in features and in gradients
    torch.manual_seed(0)
    model = build_model("tiny", depth=1)
    ts = vocab_target_set(list(range(0, 1001, 7)))  # 143 rows: uneven shards, padding path
    weight = torch.randn(len(ts), model.cfg.width, generator=torch.Generator().manual_seed(1))
    feats = shard_encode(model, ts.ids, ts.valid, env, chunk=50)
    (feats * weight).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for g in grads.values():  # what DDP does: average over ranks
        dist.all_reduce(g)
        g /= world
    model.zero_grad()
    ref = encode_targets(model, ts)
    (ref * weight).sum().backward()
    feat_diff = float((feats - ref).abs().max())
    grad_diff = max(float((grads[n] - p.grad).abs().max() / p.grad.abs().max().clamp(min=1e-12))
                    for n, p in model.named_parameters() if p.grad is not None)  # relative to the largest entry
    missing = sorted(n for n, p in model.named_parameters() if (p.grad is not None) != (n in grads))

    # 2) multi-task training: every rank draws its own task; weights stay identical
    raw = {"name": "ddp-test", "model": {"size": "tiny", "overrides": {"depth": 2}},
           "optim": {"lr": 2e-3, "warmup_steps": 1, "weight_decay": 0.05, "min_lr": 1e-5, "clip_grad": 1.0},
           "train": {"max_steps": 4, "ckpt_every": 0, "log_every": 1, "seed": 3},
           "tasks": [{"name": "mini-faces", "batch_size": 4},
                     {"name": "mini-news-mlm", "batch_size": 2, "options": {"max_len": 24}},
                     {"name": "mini-photos-retrieval", "batch_size": 4}]}
    result = train(recipe_from_dict(raw), output=os.path.join(out, "run"), data_dir=data, log=lambda m: None)
    drawn = [name for _, name, _ in result.history]
    json.dump({"feat_diff": feat_diff, "grad_diff": grad_diff, "missing": missing,
               "digest": state_digest(result.model), "drawn": drawn, "step": result.step,
               "world": world}, open(os.path.join(out, f"rank{rank}.json"), "w"))
    dist.destroy_process_group()
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_end_with_identical_weights_and_exact_sharded_targets(mini_data, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), str(tmp_path), str(mini_data)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["world"] == r1["world"] == 2
    for r in (r0, r1):
        assert r["feat_diff"] < 1e-5 and r["grad_diff"] < 1e-5 and not r["missing"], r
    assert r0["step"] == r1["step"] == 4
    assert r0["digest"] == r1["digest"]
    assert r0["drawn"] != r1["drawn"]  # each rank drew its own tasks (seeded by rank)
    run = tmp_path / "run"
    assert (run / "final" / "model.safetensors").is_file()
    last = ckpt.find_valid_checkpoint(run / "checkpoints")
    assert last is not None and {"rng-rank0.pt", "rng-rank1.pt"} <= {p.name for p in last.iterdir()}
    s0, s1 = ckpt.load_checkpoint(last, 0), ckpt.load_checkpoint(last, 1)
    assert s0.rank_state["data"]["draw"] == s1.rank_state["data"]["draw"] == 4
    assert s0.rank_state["data"]["samplers"] != s1.rank_state["data"]["samplers"] or r0["drawn"] != r1["drawn"]


def test_shard_bounds_and_single_process_identities():
    assert [shard_bounds(10, 3, r) for r in range(3)] == [(0, 4, 4), (4, 8, 4), (8, 10, 4)]
    assert [shard_bounds(2, 4, r)[:2] for r in range(4)] == [(0, 1), (1, 2), (2, 2), (2, 2)]
    x = torch.randn(3, 4, requires_grad=True)
    assert all_gather_with_grad(x) is x  # no process group: identity
    from uniperceiver.modeling import build_model
    from uniperceiver.tasks.base import encode_targets, vocab_target_set

    model = build_model("tiny", depth=1)
    ts = vocab_target_set([5, 9, 11])
    with torch.no_grad():
        assert torch.allclose(shard_encode(model, ts.ids, ts.valid, DistEnv()), encode_targets(model, ts), atol=1e-6)
