"""`all_gather_with_grad` on two real gloo processes: the same features and the same gradients as the
deprecated `torch.distributed.nn.functional.all_gather` it replaces, and no FutureWarning of its own.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from uniperceiver.utils.collectives import all_gather_with_grad

REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    """
    import json, sys, warnings
    import torch, torch.distributed as dist
    from uniperceiver.utils.collectives import all_gather_with_grad

    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    side = dist.new_group(backend="gloo")

    def run(gather, group):
        # Each rank holds different rows and scores the gathered rows with its own weights, so the
        # gradient of a rank's rows depends on every rank's loss (the sum the backward must form).
        g = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
        w = torch.randn(5 * world, 3, generator=g, dtype=torch.float64)
        every = gather(x, group)
        loss = (every.pow(2) * w).sum() + every[: 5].sum()
        loss.backward()
        return every.detach(), x.grad

    def old(x, group):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            from torch.distributed.nn.functional import all_gather
            return torch.cat(all_gather(x, group=group), dim=0)

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # ours must not warn
        new_out, new_grad = run(all_gather_with_grad, side)
        new_out_w, new_grad_w = run(all_gather_with_grad, None)  # the default group as well
    old_out, old_grad = run(old, side)
    expected_rows = torch.cat([torch.randn(5, 3, generator=torch.Generator().manual_seed(100 + r),
                                           dtype=torch.float64) for r in range(world)])
    json.dump({
        "rows": bool(torch.equal(new_out, expected_rows)),
        "out": float((new_out - old_out).abs().max()),
        "grad": float((new_grad - old_grad).abs().max()),
        "grad_scale": float(old_grad.abs().max()),
        "default_group": bool(torch.equal(new_out_w, new_out) and torch.equal(new_grad_w, new_grad)),
    }, open(f"{out}/rank{rank}.json", "w"))
    dist.barrier()  # no rank tears its connections down while the other still uses them
    dist.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gradients_equal_the_deprecated_all_gather_on_two_gloo_ranks(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in range(2):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["rows"] and r["default_group"], r
        assert r["out"] == 0.0, r
        assert r["grad_scale"] > 0 and r["grad"] <= 1e-12 * r["grad_scale"], r


def test_identity_without_a_process_group():
    x = torch.randn(3, 4, requires_grad=True)
    assert all_gather_with_grad(x) is x
