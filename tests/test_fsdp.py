"""`train.sharding: fsdp` on two real gloo ranks (torchrun, CPU), against the same run under DDP.

One torchrun launch trains the tiny model on the mini data (three tasks, every rank draws its own
task per micro-step, so ranks leave different parameters unused; two micro-steps per step, so the
no-sync path runs too):
- under DDP and under FSDP: the same losses and the same final weights, bit for bit here (the
  test allows 1e-6): the reduced gradients are identical, a/2 + b/2 = (a + b)/2 in binary floating
  point, and AdamW runs elementwise on shards. The global gradient norms agree only to ~5e-6
  relative (FSDP sums squared norms shard by shard), so the recipe keeps clipping inactive
  (norms 0.05-0.08 < clip_grad 0.5): once clipping acts, that last-bit difference in the factor is
  amplified by Adam (eps 1e-6) in near-zero gradients (the logit scales' ~1e-7 gradients are
  differences of O(1) terms) to ~1e-4 in those weights after two steps. Active clipping of sharded
  gradients is checked directly instead: `clip_gradients` == `clip_grad_norm_` on the full,
  averaged gradients;
- under FSDP, stopped by SIGTERM at step 2 and resumed with resume="auto": ends bit-exact where the
  uninterrupted FSDP run ends;
- DDP's step-2 checkpoint resumed under FSDP ends where the DDP run ends (to rounding).
Then, in this process: the FSDP checkpoint has the DDP checkpoint's files and layout (full model
weights, index-keyed optimizer state) and resumes on ONE process; a bad `train.sharding` is one
clear error naming the key.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from uniperceiver.config import load_recipe, recipe_from_dict
from uniperceiver.engine import train_checkpoint as ckpt
from uniperceiver.engine.distributed import DistEnv, wrap_model
from uniperceiver.engine.runs import read_metrics
from uniperceiver.engine.trainer import train
from uniperceiver.errors import ConfigError
from uniperceiver.modeling.model_dir import load_state

sys.path.insert(0, str(Path(__file__).parent))
from _trainer_fixtures import mini_data, one_thread  # noqa: E402,F401  (shared fixtures)

REPO = Path(__file__).resolve().parents[1]


def raw_recipe(sharding: str) -> dict:
    return {
        "name": "fsdp-test", "model": {"size": "tiny", "overrides": {"depth": 2}},
        "optim": {"lr": 2e-3, "warmup_steps": 1, "weight_decay": 0.05, "min_lr": 1e-5, "clip_grad": 0.5},
        "train": {"max_steps": 3, "grad_accum": 2, "ckpt_every": 2, "log_every": 1, "seed": 3, "sharding": sharding},
        # the text-only MLM task (no patch embedding) is drawn rarely: its vocabulary encode is the slow part
        "tasks": [{"name": "mini-faces", "batch_size": 4},
                  {"name": "mini-news-mlm", "batch_size": 2, "sample_weight": 0.3, "options": {"max_len": 24}},
                  {"name": "mini-photos-retrieval", "batch_size": 4}],
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WORKER = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch, torch.distributed as dist
    from uniperceiver.config import recipe_from_dict
    from uniperceiver.engine.trainer import train
    from uniperceiver.modeling.model_dir import state_digest

    out, data = sys.argv[1], sys.argv[2]
    recipes = json.load(open(os.path.join(out, "recipes.json")))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    logs = []

    def run(name, sharding, **kw):
        r = train(recipe_from_dict(recipes[sharding]), output=os.path.join(out, name), data_dir=data,
                  log=logs.append, **kw)
        return {"step": r.step, "interrupted": r.interrupted, "digest": state_digest(r.model),
                "history": r.history, "plain": not any(type(p).__name__ == "DTensor" for p in r.model.parameters())}

    def stop_at_2(report):  # rank 0 only; the trainer agrees on the stop across ranks
        if report.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    # active clipping of FSDP-sharded gradients (and a replicated 0-dim parameter only rank 0 uses)
    # against torch's clip_grad_norm_ on the full gradients averaged over both ranks
    import copy
    from torch import nn
    from uniperceiver.engine.distributed import DistEnv, clip_gradients, finish_grads, wrap_model
    from uniperceiver.modeling import build_model

    class Enc(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids, scaled):
            f = self.m.encode_text(ids)
            return f * self.m.logit_scale("retrieve") if scaled else f

    env = DistEnv(rank, 2, rank, torch.device("cpu"), "gloo", dist.new_group(backend="gloo"))
    torch.manual_seed(0)
    ref = Enc(build_model("tiny", depth=1))
    enc = wrap_model(copy.deepcopy(ref), env, "fsdp")
    ids = [torch.randint(5, 900, (3, 7), generator=torch.Generator().manual_seed(r)) for r in range(2)]
    weight = torch.randn(3, ref.m.cfg.width, generator=torch.Generator().manual_seed(9))
    (enc(ids[rank], rank == 0) * weight).sum().backward()
    finish_grads(enc, env)
    params = [p for p in enc.parameters()]
    got_norm = float(clip_gradients(params, 0.05))
    got = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
           for n, p in enc.named_parameters() if p.grad is not None}
    for r in range(2):
        ((ref(ids[r], r == 0) * weight).sum() / 2).backward()
    want_norm = float(torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 0.05))
    want = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    clip = {"norm": [got_norm, want_norm], "names": sorted(got) == sorted(want),
            "worst": max(float((got[n] - want[n]).abs().max() / want[n].abs().max().clamp(min=1e-12)) for n in want),
            "scale_grad": float(got["m.head.logit_scales.retrieve"])}

    # which resumes read only this rank's shards of the weights (format v3 under FSDP)
    from uniperceiver.engine import train_checkpoint
    sharded_reads = []
    real_read = train_checkpoint.read_sharded_weights_into
    def counting_read(model, path, env):
        sharded_reads.append(os.path.basename(str(path)))
        return real_read(model, path, env)
    train_checkpoint.read_sharded_weights_into = counting_read

    res = {"clip": clip, "ddp": run("ddp", "ddp"), "fsdp": run("fsdp", "fsdp"),
           "cut": run("fsdp-cut", "fsdp", progress=stop_at_2)}
    res["resumed"] = run("fsdp-cut", "fsdp", resume="auto")
    res["cross"] = run("ddp-to-fsdp", "fsdp", resume=os.path.join(out, "ddp", "checkpoints", "step-000002"))
    res["logs"] = logs
    res["sharded_reads"] = sharded_reads
    json.dump(res, open(os.path.join(out, f"rank{rank}.json"), "w"))
    dist.destroy_process_group()
    """
)


def max_diff(a: Path, b: Path) -> float:
    x, y = load_state(a), load_state(b)  # final/ (safetensors) or a step folder (model.dcp/)
    assert x.keys() == y.keys()
    return max(float((x[k].double() - y[k].double()).abs().max()) for k in x)


@pytest.fixture(scope="module")
def runs(mini_data, tmp_path_factory) -> Iterator[tuple[Path, dict, dict]]:
    out = tmp_path_factory.mktemp("fsdp")
    script = out / "worker.py"
    script.write_text(WORKER)
    (out / "recipes.json").write_text(json.dumps({s: raw_recipe(s) for s in ("ddp", "fsdp")}))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("UPCTL_DEBUG", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), str(out), str(mini_data)]
    proc = subprocess.run(cmd, env=env, cwd=out, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in range(2))
    yield out, r0, r1
    shutil.rmtree(out, ignore_errors=True)  # module done: free its disk now, not at session end


def test_fsdp_matches_ddp_and_resumes_exactly(runs):
    out, r0, r1 = runs
    assert any("x 2 ranks (fsdp)" in line for line in r0["logs"])
    assert any("x 2 ranks (ddp)" in line for line in r0["logs"])
    for r in (r0, r1):
        assert r["ddp"]["step"] == r["fsdp"]["step"] == r["resumed"]["step"] == r["cross"]["step"] == 3
        assert r["cut"]["interrupted"] and r["cut"]["step"] == 2
        assert r["fsdp"]["plain"]  # the returned model holds full, unsharded weights
    # ranks trained different tasks in the same micro-steps (so each left parameters unused) ...
    pairs = list(zip(*([t for _, t, _ in r["fsdp"]["history"]] for r in (r0, r1))))
    assert any(a != b for a, b in pairs)
    assert any((a == "mini-news-mlm") != (b == "mini-news-mlm") for a, b in pairs)  # one rank text-only
    # ... and still end with the same weights on both ranks
    assert r0["fsdp"]["digest"] == r1["fsdp"]["digest"]
    assert r0["resumed"]["digest"] == r1["resumed"]["digest"]

    # (a) FSDP == DDP up to float rounding, in the losses of every micro-step and in the weights
    for r in (r0, r1):
        for (s1, t1, v1), (s2, t2, v2) in zip(r["ddp"]["history"], r["fsdp"]["history"], strict=True):
            assert (s1, t1) == (s2, t2) and v2 == pytest.approx(v1, rel=1e-5, abs=1e-6)
    norms = {run: [float(m["value"]) for m in read_metrics(out / run) if m["name"] == "grad_norm"]
             for run in ("ddp", "fsdp")}
    assert len(norms["ddp"]) == 3 and max(norms["ddp"]) < 0.5  # clipping computed but inactive (see above)
    assert norms["fsdp"] == pytest.approx(norms["ddp"], rel=1e-4)  # global: one rank's shards would be ~30% off
    for r in (r0, r1):  # active clipping of sharded gradients == clip_grad_norm_ of the full, averaged ones
        got, want = r["clip"]["norm"]
        assert want > 0.05 and got == pytest.approx(want, rel=1e-5)
        assert r["clip"]["names"] and r["clip"]["worst"] < 1e-5, r["clip"]
        assert r["clip"]["scale_grad"] != 0.0  # the replicated scalar got rank 0's gradient, averaged
    worst = max_diff(out / "ddp" / "final", out / "fsdp" / "final")
    assert worst <= 1e-6, worst
    assert max_diff(out / "ddp" / "final", out / "ddp" / "checkpoints" / "step-000002") > 1e-4  # training moved them

    # (b) SIGTERM at step 2 + resume="auto" ends exactly where the uninterrupted FSDP run ends
    assert r0["resumed"]["digest"] == r0["fsdp"]["digest"]
    assert max_diff(out / "fsdp" / "final", out / "fsdp-cut" / "final") == 0.0
    assert {s for s, _, _ in r0["resumed"]["history"]} == {3}  # only the step after the checkpoint ran
    # a DDP checkpoint resumed under FSDP continues the DDP run
    assert max_diff(out / "ddp" / "final", out / "ddp-to-fsdp" / "final") <= 1e-6
    # both resumes under FSDP read each rank's own shards of the weights (after wrapping), not the whole
    assert r0["sharded_reads"] == r1["sharded_reads"] == ["step-000002", "step-000002"]


def test_fsdp_checkpoint_is_the_ddp_format_and_resumes_on_one_process(runs, mini_data, tmp_path):
    out, _, _ = runs
    f_dir, d_dir = out / "fsdp" / "checkpoints" / "step-000002", out / "ddp" / "checkpoints" / "step-000002"
    f, d = ckpt.load_checkpoint(f_dir), ckpt.load_checkpoint(d_dir)
    assert sorted(p.name for p in f_dir.iterdir()) == sorted(p.name for p in d_dir.iterdir())
    assert sorted(p.name for p in (out / "fsdp" / "final").iterdir()) == sorted(
        p.name for p in (out / "ddp" / "final").iterdir())
    assert f.model_state.keys() == d.model_state.keys()
    # each rank wrote its own part of the weights and of the optimizer state (no gather on rank 0)
    for folder in ("model.dcp", "optim.dcp"):
        assert sorted(p.name for p in (f_dir / folder).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"], folder
    for k, v in d.model_state.items():
        assert torch.allclose(f.model_state[k], v, rtol=1e-5, atol=1e-6), k
    # the optimizer state: parameter-index keys, full tensors, same groups as DDP's
    assert f.optimizer.keys() == d.optimizer.keys() == {"state", "param_groups"}
    assert f.optimizer["state"].keys() == d.optimizer["state"].keys()
    assert f.optimizer["param_groups"] == d.optimizer["param_groups"]
    for i, st in d.optimizer["state"].items():
        assert st.keys() == f.optimizer["state"][i].keys()
        for k, v in st.items():
            assert f.optimizer["state"][i][k].shape == v.shape
            assert torch.allclose(f.optimizer["state"][i][k], v, rtol=1e-4, atol=1e-8), (i, k)
    # some parameter had no gradient on any rank yet (no AdamW state), exactly as under DDP
    n_params = sum(len(g["params"]) for g in d.optimizer["param_groups"])
    assert len(d.optimizer["state"]) < n_params

    # the FSDP checkpoint resumes on one process
    said: list[str] = []
    recipe = recipe_from_dict(raw_recipe("fsdp"))
    result = train(recipe, output=tmp_path / "single", resume=f_dir, data_dir=mini_data, log=said.append)
    assert result.step == 3 and result.resumed_from == f_dir
    assert any("resumed from" in line and "step 2" in line for line in said)
    assert (tmp_path / "single" / "final" / "model.safetensors").is_file()


def test_bad_sharding_is_one_clear_error_and_large_recipe_uses_fsdp():
    with pytest.raises(ConfigError) as err:
        load_recipe(REPO / "recipes" / "tiny.yaml", ["train.sharding=zero3"])
    msg = str(err.value)
    assert "train.sharding" in msg and "'zero3'" in msg and "ddp" in msg and "fsdp" in msg
    assert load_recipe(REPO / "recipes" / "tiny.yaml").train.sharding == "ddp"
    assert load_recipe(REPO / "recipes" / "large.yaml").train.sharding == "fsdp"
    # the library entry point checks too, and one process never wraps
    module = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="train.sharding"):
        wrap_model(module, DistEnv(), "zero3")
    assert wrap_model(module, DistEnv(), "fsdp") is module
    with pytest.raises(ConfigError, match="fp16"):
        wrap_model(module, DistEnv(0, 2), "fsdp", torch.float16)
