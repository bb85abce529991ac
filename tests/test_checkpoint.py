"""Model directories and the converter of released checkpoints (plain torch and DeepSpeed)."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from uniperceiver.errors import CheckpointError
from uniperceiver.modeling.model_dir import load_model, save_model
from uniperceiver.modeling.convert import convert_checkpoint, ours_to_official
from uniperceiver.modeling.model import TextSegment, VisualSegment, build_model

sys.path.insert(0, str(Path(__file__).parent))
from test_model import _digits_images, _model  # noqa: E402


def _features(m) -> torch.Tensor:
    img = _digits_images(2)
    clip = img[:, None].repeat(1, 3, 1, 1, 1)
    ids = torch.tensor([[320, 1125, 49410, 49407], [320, 2368, 49410, 49407]])
    m.eval()
    with torch.no_grad():
        return torch.cat(
            [m.encode([VisualSegment(img), TextSegment(ids)]), m.encode([VisualSegment(clip)]), m.encode_text(ids)]
        )


def test_save_and_load_model_dir(tmp_path: Path) -> None:
    m = _model()
    save_model(m, tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "model.safetensors"]
    back = load_model(tmp_path / "ckpt")
    assert torch.equal(_features(m), _features(back))


@pytest.mark.parametrize("fmt", ["torch", "deepspeed"])
def test_converter_round_trip(tmp_path: Path, fmt: str) -> None:
    m = _model(prompt_tokens=10, spe_bias=True, cls_head_classes=7)
    with torch.no_grad():
        for p in (m.embed.spe_bias, m.cls_head.weight):
            p.normal_()
    official = ours_to_official(m, fmt)
    if fmt == "deepspeed":
        (tmp_path / "ds").mkdir()
        src = tmp_path / "ds" / "mp_rank_00_model_states.pt"
        assert any(k.startswith("encoder.layers.0.attention.self.qkv_proj") for k in official["module"])
    else:
        src = tmp_path / "official.pth"
    torch.save(official, src)
    out, cfg, notes = convert_checkpoint(src.parent if fmt == "deepspeed" else src, tmp_path / "conv", image_size=64)
    assert cfg.prompt_tokens == 10 and cfg.spe_bias and cfg.cls_head_classes == 7
    assert any("shared LayerNorm" in n for n in notes)
    back = load_model(out)
    assert torch.equal(_features(m), _features(back))
    for key, value in m.state_dict().items():
        assert torch.equal(value, back.state_dict()[key]), key


def test_bare_state_dict_is_accepted(tmp_path: Path) -> None:
    m = _model()
    torch.save(ours_to_official(m)["model"], tmp_path / "bare.pth")
    out, _, _ = convert_checkpoint(tmp_path / "bare.pth", tmp_path / "conv", image_size=64)
    assert torch.equal(_features(m), _features(load_model(out)))


def test_deepspeed_type_embedding_is_folded_into_conv_bias(tmp_path: Path) -> None:
    m = _model()
    ds = ours_to_official(m, "deepspeed")
    type_row = torch.randn(1, m.cfg.width)
    ds["module"]["video_embed.embeddings_type.weight"] = type_row
    ds["module"]["video_embed.embeddings.bias"] = m.embed.patch.bias.detach() - type_row[0]
    ds["module"]["visual_embed.patch_embed.weight"] = torch.zeros(3)  # the dropped duplicate
    torch.save(ds, tmp_path / "mp_rank_00_model_states.pt")
    out, _, notes = convert_checkpoint(tmp_path, tmp_path / "conv", image_size=64)
    assert torch.allclose(load_model(out).embed.patch.bias, m.embed.patch.bias, atol=1e-6)
    assert any("folded" in n for n in notes) and any("visual_embed" in n for n in notes)


def test_extra_key_is_refused_by_name(tmp_path: Path) -> None:
    m = _model()
    sd = ours_to_official(m)
    sd["model"]["fused_encoder.layers.0.mystery.weight"] = torch.zeros(2)
    torch.save(sd, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="fused_encoder.layers.0.mystery.weight"):
        convert_checkpoint(tmp_path / "x.pth", tmp_path / "out", image_size=64)


def test_wrong_shape_is_refused_by_name(tmp_path: Path) -> None:
    m = _model()
    sd = ours_to_official(m)
    sd["model"]["loss_prepare.proj.weight"] = torch.zeros(192, 100)
    torch.save(sd, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match=r"head.proj.weight.*\(192, 100\)"):
        convert_checkpoint(tmp_path / "x.pth", tmp_path / "out", image_size=64)


def test_model_dir_with_other_size_is_refused(tmp_path: Path) -> None:
    save_model(_model(), tmp_path / "tiny")
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "tiny" / "model.safetensors")
    state["encoder.blocks.0.fc1.weight"] = torch.zeros(10, 10)
    save_file(state, tmp_path / "tiny" / "model.safetensors")
    # A consistent folder (checksum updated) whose weights do not fit the config: refused by key name.
    import hashlib
    import json

    cfg_path = tmp_path / "tiny" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["weights_sha256"] = hashlib.sha256((tmp_path / "tiny" / "model.safetensors").read_bytes()).hexdigest()
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="encoder.blocks.0.fc1.weight"):
        load_model(tmp_path / "tiny")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/upctl-pwned-by-pickle",))


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    marker = Path("/tmp/upctl-pwned-by-pickle")
    marker.unlink(missing_ok=True)
    with open(tmp_path / "evil.pth", "wb") as fh:
        pickle.dump({"model": {"x": _Evil()}}, fh)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        convert_checkpoint(tmp_path / "evil.pth", tmp_path / "out")
    assert not marker.exists()


def test_non_checkpoint_file_cli_one_line(tmp_path: Path) -> None:
    from upctl.main import app

    (tmp_path / "notes.txt").write_text("hello, not a checkpoint\n")
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "notes.txt"), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "not a loadable checkpoint" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_convert_cli_writes_model_dir(tmp_path: Path) -> None:
    from upctl.main import app

    m = _model()
    torch.save(ours_to_official(m), tmp_path / "official.pth")
    result = CliRunner().invoke(
        app, ["convert", str(tmp_path / "official.pth"), str(tmp_path / "out"), "--image-size", "64"]
    )
    assert result.exit_code == 0, result.output
    assert torch.equal(_features(m), _features(load_model(tmp_path / "out")))
    assert build_model  # the builder stays importable from the model module


# ------------------------------------------------ training step folders: streamed, hashed while written


def _trained_parts():
    """A small model and its AdamW with a full state (one real step on real features)."""
    from uniperceiver.config import recipe_from_dict
    from uniperceiver.engine.optim import build_optimizer, build_scheduler

    torch.manual_seed(0)
    m = build_model("tiny", depth=1, width=64, heads=2, mlp_dim=128)
    optim = recipe_from_dict({"name": "s", "tasks": ["mini-faces"], "optim": {"warmup_steps": 2}}).optim
    optimizer = build_optimizer(m, optim)
    scheduler = build_scheduler(optimizer, optim, 10)
    m.encode_text(torch.tensor([[320, 1125, 49410, 49407]])).pow(2).mean().backward()
    optimizer.step()
    scheduler.step()
    return m, optimizer, scheduler


def _write_step(root: Path, m, optimizer, scheduler, buffered: bool = False) -> Path:
    from uniperceiver.engine import train_checkpoint as ckpt
    from uniperceiver.engine.train_state import TrainState, capture_rng_state

    parts = ckpt.Trainables(m, optimizer, scheduler, torch.amp.GradScaler("cuda", enabled=False), None)
    state = TrainState(step=3, data={"draw": 3, "samplers": {}, "skipped": {}}, rng=capture_rng_state())
    tmp = ckpt.begin_checkpoint(root, state.step)
    digests = ckpt.write_main_state(tmp, parts, state.shared_dict(), buffered=buffered)
    digests.update(ckpt.write_rank_state(tmp, 0, state.rank_dict() or {}, buffered=buffered, algorithm="sha256"))
    return ckpt.commit_checkpoint(root, state.step, keep=2, digests=digests)


def test_a_streamed_checkpoint_is_hashed_while_written_never_re_read(tmp_path: Path, monkeypatch) -> None:
    from uniperceiver.engine import checkpoint_files
    from uniperceiver.engine import train_checkpoint as ckpt

    m, optimizer, scheduler = _trained_parts()

    def no_reread(path, *args, **kwargs):
        raise AssertionError(f"{path} was read back to be hashed")

    with monkeypatch.context() as mp:
        mp.setattr(checkpoint_files, "file_digest", no_reread)
        path = _write_step(tmp_path / "checkpoints", m, optimizer, scheduler)
    meta = ckpt.verify_checkpoint(path)  # the digests written while streaming are the files' sha256
    assert {"model.safetensors", "config.json", "optimizer.pt", "scheduler.pt", "trainer.pt", "rng-rank0.pt"} <= set(meta["files"])
    # the step folder is a model folder load_model reads (its own config.json checksum included)
    back = load_model(path)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), m.state_dict().values()))
    assert torch.allclose(_features(back), _features(m))
    saved = ckpt.load_checkpoint(path, verified=True)
    want = optimizer.state_dict()
    assert saved.optimizer["param_groups"] == want["param_groups"]
    for i, st in want["state"].items():
        assert all(torch.equal(saved.optimizer["state"][i][k], v) for k, v in st.items()), i
    assert saved.scheduler == scheduler.state_dict()
    # the first (buffered) writer stays callable and writes the same content
    old = _write_step(tmp_path / "old", m, optimizer, scheduler, buffered=True)
    ckpt.verify_checkpoint(old)
    assert torch.equal(ckpt.load_checkpoint(old).optimizer["state"][0]["exp_avg"], saved.optimizer["state"][0]["exp_avg"])


def test_resume_reads_the_weights_straight_into_the_model(tmp_path: Path) -> None:
    from uniperceiver.engine import train_checkpoint as ckpt

    m, optimizer, scheduler = _trained_parts()
    path = _write_step(tmp_path / "checkpoints", m, optimizer, scheduler)
    fresh = build_model("tiny", depth=1, width=64, heads=2, mlp_dim=128)
    params = {n: p.data_ptr() for n, p in fresh.named_parameters()}
    ckpt.read_weights_into(fresh, path)
    assert {n: p.data_ptr() for n, p in fresh.named_parameters()} == params  # filled in place
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), m.state_dict().values()))
    wider = build_model("tiny", depth=1, width=128, heads=2, mlp_dim=128)
    with pytest.raises(CheckpointError, match="model.safetensors.*key"):
        ckpt.read_weights_into(wider, path)
