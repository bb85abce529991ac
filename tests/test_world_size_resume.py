"""Resuming on another world size (or another per-rank batch size): the data cursors are re-derived
so that no sample of the epoch in progress is repeated or skipped; proved by the sampler state.

The samplers are the real ones (`ResumableBatchSampler`), driven the way the loader drives them;
the last test resumes a 2-rank gloo run on 1 rank and back through the trainer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from uniperceiver.engine.sampler import BatchSamplerState, ResumableBatchSampler, rederive_states

sys.path.insert(0, str(Path(__file__).parent))
from _trainer_fixtures import mini_data, one_thread  # noqa: E402,F401  (shared fixtures)

REPO = Path(__file__).resolve().parents[1]


def _samplers(n: int, batch: int, world: int, states=None) -> list[ResumableBatchSampler]:
    return [ResumableBatchSampler(n, batch, seed=3, key="task", rank=r, world_size=world,
                                  state=None if states is None else states[r]) for r in range(world)]


def _read(samplers: list[ResumableBatchSampler], draws: list[int]) -> list[tuple[int, int]]:
    """Each rank takes its number of batches (ranks draw tasks independently: their cursors differ)."""
    out = []
    for s, k in zip(samplers, draws):
        for _ in range(k):
            out += s.next_batch()[0]
    return out


def _read_until_epoch(samplers: list[ResumableBatchSampler], epoch: int) -> list[tuple[int, int]]:
    """Read on every rank until its regular stream has reached `epoch` (pending read first)."""
    out = []
    for s in samplers:
        while s.state.pending or s.state.epoch < epoch:
            out += s.next_batch()[0]
    return [(e, i) for e, i in out if e < epoch]


@pytest.mark.parametrize("old,new,n,batch,draws", [
    (2, 1, 37, 4, [3, 5]),      # ranks at different cursors of the same epoch
    (1, 2, 37, 4, [6]),
    (2, 3, 50, 7, [9, 2]),      # one rank already in the next epoch
    (4, 2, 29, 3, [1, 4, 11, 0]),
    (3, 3, 40, 5, [2, 2, 3]),   # same world size: re-deriving is harmless
])
def test_every_sample_of_the_epochs_in_progress_is_read_exactly_once(old, new, n, batch, draws):
    before = _samplers(n, batch, old)
    seen = _read(before, draws)
    states = rederive_states([s.state for s in before], n, new)
    after = _samplers(n, batch, new, states)
    last = max(s.state.epoch for s in before)
    seen += _read_until_epoch(after, last + 1)
    per_epoch = Counter(e for e, _ in seen)
    for epoch in range(last + 1):
        samples = Counter(i for e, i in seen if e == epoch)
        assert sorted(samples) == list(range(n)), f"epoch {epoch}: skipped {set(range(n)) - set(samples)}"
        assert max(samples.values()) == 1, f"epoch {epoch}: repeated {[i for i, c in samples.items() if c > 1]}"
    assert set(per_epoch) <= set(range(last + 1))
    # afterwards every new rank reads its regular shard of the next epoch from its start
    assert all(s.state == BatchSamplerState(last + 1, s.state.cursor) for s in after)


def test_re_deriving_twice_still_reads_every_sample_once():
    n, batch = 41, 3
    a = _samplers(n, batch, 2)
    seen = _read(a, [2, 5])
    b = _samplers(n, batch, 3, rederive_states([s.state for s in a], n, 3))
    seen += _read(b, [1, 0, 2])  # part of the pending segments only
    c = _samplers(n, batch, 2, rederive_states([s.state for s in b], n, 2))
    last = max(s.state.epoch for s in c) - 1
    seen += _read_until_epoch(c, last + 1)
    for epoch in range(last + 1):
        assert sorted(i for e, i in seen if e == epoch) == list(range(n)), epoch


def test_a_batch_size_change_is_exact_because_cursors_count_samples():
    n = 30
    one = _samplers(n, 4, 1)[0]
    first = _read([one], [3])
    other = ResumableBatchSampler(n, 7, seed=3, key="task", state=one.state)
    rest = _read_until_epoch([other], 1)
    assert sorted(i for _, i in first + rest) == list(range(n))


def test_the_pending_state_round_trips_through_a_checkpoint_dict():
    states = rederive_states([BatchSamplerState(0, 3), BatchSamplerState(1, 1)], 20, 3)
    s = ResumableBatchSampler(20, 2, seed=0, key="t", rank=1, world_size=3)
    s.load_state_dict(states[1].to_dict())
    assert s.state == states[1] and s.state.pending
    assert BatchSamplerState(0, 5).to_dict() == {"epoch": 0, "cursor": 5}  # the common case reads as before


# -------------------------------------------------- through the trainer: 2 gloo ranks -> 1 -> 2

WORKER = """
import os
import sys
from uniperceiver.config import recipe_from_dict
from uniperceiver.engine import train_checkpoint
from uniperceiver.engine.trainer import train
import json
raw, out, data, steps, resume = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
if os.environ.get("FORCE_ASYNC_SAVE"):  # as on a GPU: DCP files written in the background
    import torch
    train_checkpoint.wants_async = lambda model: True
    save_groups = train_checkpoint._save_groups

    def recording_groups(parts, env, background):  # note the timeout of the groups the saves use
        groups = save_groups(parts, env, background)
        with open(out + f".group-timeouts-{env.rank}", "a") as fh:
            for g in groups:
                print(g._get_backend(torch.device("cpu")).options._timeout.total_seconds(), file=fh)
        return groups

    train_checkpoint._save_groups = recording_groups
log = open(out + f".log", "a")
train(recipe_from_dict(raw), output=out, data_dir=data, max_steps=steps, resume=resume or None,
      log=lambda m: print(m, file=log, flush=True))
"""

RAW = {
    "name": "world-size", "stage": "pretrain",
    "model": {"size": "tiny", "overrides": {"depth": 1, "width": 64, "heads": 2, "mlp_dim": 128, "drop_path": 0.0}},
    "optim": {"lr": 1e-3, "warmup_steps": 1},
    "train": {"max_steps": 9, "ckpt_every": 3, "log_every": 1, "seed": 1, "keep_checkpoints": 10,
              "collective_timeout_s": 321},
    "tasks": [{"name": "mini-faces", "batch_size": 5}],
}


def _torchrun(tmp: Path, out: Path, data: Path, steps: int, resume: str = "", *, asynchronous: bool = False) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    if asynchronous:
        env["FORCE_ASYNC_SAVE"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), str(script), json.dumps(RAW), str(out),
           str(data), str(steps), resume]
    proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _states(step_dir: Path, world: int) -> list[BatchSamplerState]:
    out = []
    for r in range(world):
        data = torch.load(step_dir / f"rng-rank{r}.pt", weights_only=True)["data"]
        assert data["draw"] > 0
        s = data["samplers"]["mini-faces"]
        out.append(BatchSamplerState(s["epoch"], s["cursor"], tuple(s.get("pending", ()))))
    return out


def _replay(before: list[BatchSamplerState], saved_after: list[BatchSamplerState], batches: int, n: int,
            seen: list[tuple[int, int]]) -> list[ResumableBatchSampler]:
    """Re-derive `before` for len(saved_after) ranks, read `batches` batches on each: the trainer's
    saved states must be exactly where that leaves the samplers."""
    new = _samplers(n, RAW["tasks"][0]["batch_size"], len(saved_after), rederive_states(before, n, len(saved_after)))
    seen += _read(new, [batches] * len(new))
    assert [s.state for s in new] == saved_after
    return new


def test_a_2_rank_run_resumes_on_1_rank_and_back_with_every_sample_read_once(mini_data, tmp_path):
    from uniperceiver.config import recipe_from_dict
    from uniperceiver.data.format import open_dataset
    from uniperceiver.engine.trainer import train

    n = len(list(open_dataset("mini-faces", mini_data).samples("train")))
    out = tmp_path / "run"
    root = out / "checkpoints"
    _torchrun(tmp_path, out, mini_data, 3)                    # 2 ranks: steps 1-3
    said: list[str] = []
    result = train(recipe_from_dict(RAW), output=out, data_dir=mini_data, max_steps=6,  # 1 rank: steps 4-6
                   resume=str(root / "step-000003"), log=said.append)
    assert result.step == 6
    assert any("2-rank checkpoint on 1 rank(s)" in m and "re-derived" in m for m in said), said
    _torchrun(tmp_path, out, mini_data, 9, str(root / "step-000006"))   # 2 ranks again: steps 7-9
    assert "1-rank checkpoint on 2 rank(s)" in (tmp_path / "run.log").read_text()

    at3 = _states(root / "step-000003", 2)
    seen = _read(_samplers(n, 5, 2), [3, 3])                  # what the first run read (fresh start)
    assert [s.state for s in _samplers(n, 5, 2, at3)] == at3
    one = _replay(at3, _states(root / "step-000006", 1), 3, n, seen)
    two = _replay([s.state for s in one], _states(root / "step-000009", 2), 3, n, seen)
    last = max(s.state.epoch for s in two)
    seen += _read_until_epoch(two, last + 1)
    for epoch in range(last + 1):
        counts = Counter(i for e, i in seen if e == epoch)
        assert sorted(counts) == list(range(n)) and max(counts.values()) == 1, f"epoch {epoch}: {counts}"

    # every step folder holds the optimizer state through DCP, written by the ranks of its run
    from uniperceiver.engine import train_checkpoint as ckpt

    for name, world in (("step-000003", 2), ("step-000006", 1), ("step-000009", 2)):
        meta = ckpt.verify_checkpoint(root / name)
        assert meta["format"] == ckpt.FORMAT, name
        writers = {n.split("/")[1].split("_")[2] for n in meta["files"] if n.endswith(".distcp")}
        assert writers == {str(r) for r in range(world)}, (name, sorted(meta["files"]))

    # one rank's DCP shard of the newest checkpoint damaged: the previous one is used, the warning names both
    shard = sorted((root / "step-000009" / ckpt.SHARDED_DIR).glob("__1_*.distcp"))[0]
    good = shard.read_bytes()
    _flip_middle(shard)
    warnings: list[str] = []
    assert ckpt.find_valid_checkpoint(root, warn=warnings.append) == root / "step-000006"
    assert len(warnings) == 1 and "step-000009" in warnings[0] and shard.name in warnings[0], warnings
    assert "step-000006" in warnings[0]
    shard.write_bytes(good)

    # one rank's state file of the newest checkpoint damaged: the same

    shard = root / "step-000009" / "rng-rank1.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    warnings: list[str] = []
    assert ckpt.find_valid_checkpoint(root, warn=warnings.append) == root / "step-000006"
    assert len(warnings) == 1 and "step-000009" in warnings[0] and "rng-rank1.pt" in warnings[0], warnings
    assert "step-000006" in warnings[0]


def test_asynchronous_saves_on_2_ranks_publish_exactly_what_synchronous_saves_write(mini_data, tmp_path):
    """Two gloo ranks, DCP files written by background threads (each DCP folder on its own gloo
    group): the step published by the next save, and the last one, hold the same weights and
    optimizer state, written by both ranks, as the synchronous run's."""
    from uniperceiver.engine import train_checkpoint as ckpt

    _torchrun(tmp_path, tmp_path / "sync", mini_data, 6)
    _torchrun(tmp_path, tmp_path / "async", mini_data, 6, asynchronous=True)
    for name in ("step-000003", "step-000006"):
        a, b = tmp_path / "async" / "checkpoints" / name, tmp_path / "sync" / "checkpoints" / name
        meta = ckpt.verify_checkpoint(a)
        assert meta["format"] == ckpt.FORMAT
        for folder in ("model.dcp", ckpt.SHARDED_DIR):
            writers = {n.split("/")[1].split("_")[2] for n in meta["files"] if n.startswith(folder + "/__")}
            assert writers == {"0", "1"}, (name, folder)
        x, y = ckpt.load_checkpoint(a), ckpt.load_checkpoint(b)
        assert all(torch.equal(x.model_state[k], v) for k, v in y.model_state.items()), name
        for i, st in y.optimizer["state"].items():
            assert all(torch.equal(x.optimizer["state"][i][k], v) for k, v in st.items()), (name, i)
    assert not list((tmp_path / "async" / "checkpoints").glob(".tmp-*"))
    for rank in range(2):  # the background saves' gloo groups wait train.collective_timeout_s, not 30 min
        timeouts = Path(f"{tmp_path / 'async'}.group-timeouts-{rank}").read_text().split()
        assert timeouts and set(timeouts) == {"321.0"}, timeouts
    from safetensors.torch import load_file

    x, y = load_file(str(tmp_path / "async" / "final" / "model.safetensors")), load_file(
        str(tmp_path / "sync" / "final" / "model.safetensors"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in y)

    # a 2-rank --resume auto verifies with both ranks hashing a share: a file of rank 1's share damaged
    from uniperceiver.engine.shared_hashing import assign_shares

    run = tmp_path / "sync"
    step = run / "checkpoints" / "step-000006"
    shares = assign_shares(step, list(ckpt.verify_checkpoint(step)["files"]), 2)
    assert shares[0] and shares[1] and sorted(shares[0] + shares[1]) == sorted(ckpt.verify_checkpoint(step)["files"])
    damaged = step / shares[1][0]
    _flip_middle(damaged)
    _torchrun(tmp_path, run, mini_data, 7, "auto")
    log = Path(f"{run}.log").read_text()
    assert f"checkpoint {step} is corrupt ({damaged}:" in log, log[-2000:]
    assert f"resumed from {run / 'checkpoints' / 'step-000003'} at step 3" in log, log[-2000:]


def _flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_too_few_samples_for_the_ranks_is_refused_in_one_line(mini_data):
    """Below one sample per rank, ranks share samples: no exact re-derivation exists, so it is refused."""
    from uniperceiver.engine.loader import MultiTaskLoader
    from uniperceiver.engine.train_state import rederive_loader_state
    from uniperceiver.errors import CheckpointError
    from uniperceiver.modeling import build_model
    from uniperceiver.tasks.catalog import build_task, task_config

    task = build_task(task_config("mini-faces"), mini_data, build_model("tiny", depth=1).cfg)
    few = list(task.examples("train"))[:2]
    loader = MultiTaskLoader([task], [few], weights=[1.0], batch_sizes=[2], seed=0, rank=0, world_size=3)
    peers = [{"draw": 1, "samplers": {"mini-faces": {"epoch": 0, "cursor": 1}}, "skipped": {}}] * 2
    with pytest.raises(CheckpointError) as err:
        rederive_loader_state(peers, loader, 3)
    message = str(err.value)
    assert "\n" not in message and "'mini-faces'" in message and "2 training sample(s)" in message
    assert "resume with 2 rank(s)" in message
