"""Prompt tuning and fine-tuning through the commands: which parameters train, the few-shot split,
the default checkpoint (newest pre-training run), and one-line errors for bad input.

Prompt tuning must leave every frozen tensor bit-identical to the source checkpoint and change
the trainable ones (LayerNorms, deep prompts, SPE bias).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from uniperceiver.engine import train_checkpoint as ckpt
from uniperceiver.engine.runs import read_metrics
from uniperceiver.engine.tuning import is_prompt_trainable, layer_norm_params, setup_tuning
from uniperceiver.errors import ConfigError
from uniperceiver.modeling import build_model, save_model
from upctl.main import app

import sys as _sys
_sys.path.insert(0, str(Path(__file__).parent))
from _trainer_fixtures import mini_data, one_thread  # noqa: E402,F401  (shared fixtures)


@pytest.fixture()
def source(tmp_path) -> Path:
    """A saved tiny model (2 layers) standing in for a pre-trained checkpoint."""
    torch.manual_seed(0)
    return save_model(build_model("tiny", depth=2), tmp_path / "source-model")


def invoke(args: list[str]):
    """Run a command in-process; `output` is what a user sees (stdout and stderr mixed, Click >= 8.2)."""
    result = CliRunner().invoke(app, args)
    return result, result.output


def test_prompt_mode_trains_only_norms_prompts_spe_bias_and_prompt_head():
    model = build_model("tiny", prompt_tokens=3, spe_bias=True, cls_head_classes=4)
    info = setup_tuning(model, "prompt")
    norms = layer_norm_params(model)
    assert {"embed.norm.weight", "head.ln_post.bias", "encoder.blocks.3.norm2.weight"} <= norms
    expected = sorted(norms | {f"encoder.blocks.{i}.prompt" for i in range(4)}
                      | {"embed.spe_bias", "cls_head.weight", "cls_head.bias", "similarity_weight"})
    assert sorted(info.names) == expected
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == expected
    assert info.trainable == sum(p.numel() for n, p in model.named_parameters() if n in expected)
    assert 0 < info.share < 0.01 and f"{info.trainable:,}" in info.describe()
    assert not is_prompt_trainable("head.logit_scales.img_cls", norms)
    full = setup_tuning(model, "full")
    assert full.trainable == full.total and full.share == 1.0
    with pytest.raises(ConfigError, match="prompt_tokens"):
        setup_tuning(build_model("tiny", depth=1), "prompt")


def test_prompt_tune_command_changes_only_trainable_tensors(mini_data, source, tmp_path):
    out = tmp_path / "tuned"
    result, text = invoke(["prompt-tune", "--task", "mini-faces", "--fraction", "0.1", "--checkpoint", str(source),
                           "--max-steps", "3", "--data-dir", str(mini_data), "--output", str(out),
                           "--set", "optim.warmup_steps=1", "--set", "optim.lr=0.01"])
    assert result.exit_code == 0, text
    assert "prompt tuning on 0.1 of mini-faces" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("trainable:"))
    assert "trainable parameters of" in line and "%" in line

    before = load_file(str(source / "model.safetensors"))
    after = load_file(str(out / "final" / "model.safetensors"))
    assert {f"encoder.blocks.{i}.prompt" for i in range(2)} | {"embed.spe_bias"} <= set(after)
    norms = layer_norm_params(build_model("tiny", depth=2))
    frozen = [k for k in before if not is_prompt_trainable(k, norms)]
    trainable = [k for k in before if is_prompt_trainable(k, norms)]
    assert "embed.word.weight" in frozen and "head.logit_scales.img_cls" in frozen
    for k in frozen:
        assert torch.equal(before[k], after[k]), f"{k} changed but is frozen"
    assert sum(not torch.equal(before[k], after[k]) for k in trainable) >= len(trainable) // 2

    # the seeded few-shot split was used: 0.1 of mini-faces = int(0.1 * n_c) + 1 per class
    split = json.loads((mini_data / "mini-faces" / "splits" / "train-f0.1-s0.json").read_text())
    last = ckpt.find_valid_checkpoint(out / "checkpoints")
    data = ckpt.load_checkpoint(last).rank_state["data"]["samplers"]["mini-faces"]
    assert data["epoch"] * split["num_samples"] + data["cursor"] == 3 * 16  # batches of 16 over that subset
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["tune"]["mode"] == "prompt" and saved["tune"]["fraction"] == 0.1


def test_pretrain_then_finetune_with_the_default_checkpoint(mini_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "cli-tiny", "model": {"size": "tiny", "overrides": {"depth": 2}},
        "optim": {"lr": 1e-3, "warmup_steps": 1}, "train": {"max_steps": 2, "ckpt_every": 0, "eval_every": 2},
        "eval": {"limit": 6}, "tasks": [{"name": "mini-faces", "batch_size": 4}]}))
    result, text = invoke(["pretrain", str(recipe), "--data-dir", str(mini_data)])
    assert result.exit_code == 0, text
    assert text.splitlines()[0].startswith("pre-training: recipe 'cli-tiny', 1 task(s), 2 steps -> a new folder under ./runs")
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("pretrain-mini-faces-")
    pretrained = runs[0] / "final"
    assert "eval at step 2: mini-faces/top1" in text  # the periodic evaluation hook (harness)
    evals = [r for r in read_metrics(runs[0]) if r["phase"] == "eval"]
    assert {r["name"] for r in evals} >= {"mini-faces/top1"} and {r["step"] for r in evals} == {"2"}

    result, text = invoke(["finetune", "--task", "mini-faces", "--max-steps", "2", "--data-dir", str(mini_data),
                           "--set", "optim.warmup_steps=1", "--set", "optim.lr=0.01", "--set", "model.overrides.drop_path=0.0"])
    assert result.exit_code == 0, text
    assert f"using the newest pre-training run's weights {pretrained}" in text
    tuned = next(p for p in (tmp_path / "runs").iterdir() if p.name.startswith("finetune-mini-faces-"))
    before = load_file(str(pretrained / "model.safetensors"))
    after = load_file(str(tuned / "final" / "model.safetensors"))
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {"encoder.blocks.0.attn.qkv.weight", "encoder.blocks.1.fc1.weight", "embed.patch.weight"} <= changed


@pytest.mark.parametrize(
    "args, expected",
    [
        (["prompt-tune", "--task", "mini-facez"], "unknown task 'mini-facez'"),
        (["finetune", "--task", "mini-faces", "--set", "optim.lrr=1"], "optim.lrr: unknown key; did you mean 'lr'?"),
        (["prompt-tune", "--task", "mini-video", "--checkpoint", "{source}", "--data-dir", "{data}"],
         "run `upctl prepare mini` first"),
        (["pretrain", "{recipe}", "--data-dir", "{data}", "--set", "model.size=small",
          "--set", "model.checkpoint={source}"], "is a 'tiny' model"),
        (["pretrain", "{recipe}", "--data-dir", "{data}", "--resume", "{tmp}/nowhere"], "no such file or folder"),
    ],
)
def test_bad_input_is_one_clear_line(args, expected, mini_data, source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "bad", "tasks": [{"name": "mini-faces"}]}))
    fill = {"source": str(source), "data": str(mini_data), "recipe": str(recipe), "tmp": str(tmp_path)}
    result, text = invoke([a.format(**fill) for a in args])
    assert result.exit_code == 1, text
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in " ".join(text.split()), text
    assert not (tmp_path / "runs").exists()  # nothing was started


# -- separate deep prompts for targets (reference SHARE_DEEP_PROMPT False) ----------------------------


def _digit_images(n: int) -> torch.Tensor:
    """Real images: sklearn's handwritten digits at the tiny model's 64 px."""
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    imgs = torch.tensor(load_digits().images[:n], dtype=torch.float32) / 16.0
    return (F.interpolate(imgs[:, None], size=(64, 64), mode="nearest").repeat(1, 3, 1, 1) - 0.5) / 0.25


def _captions(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from uniperceiver.tokenizers.text import get_tokenizer

    names = ["zero", "one", "two", "three", "four", "five", "six", "seven"]
    return get_tokenizer().encode_batch([f"a handwritten digit {names[i]}" for i in range(n)], 16)


def _lively(model):
    with torch.no_grad():  # layer scale 1e-3 makes every block near-identity: make prompts count
        for b in model.encoder.blocks:
            b.gamma_1.fill_(1.0)
            b.gamma_2.fill_(1.0)
    return model.eval()


def test_unshared_targets_use_their_own_deep_prompts():
    from uniperceiver.modeling.model import VisualSegment

    torch.manual_seed(0)
    apart = _lively(build_model("tiny", depth=2, prompt_tokens=3, target_prompts=True))
    shared = _lively(build_model("tiny", depth=2, prompt_tokens=3))
    state = {k: v for k, v in apart.state_dict().items() if ".target." not in k}
    shared.load_state_dict(state)  # same weights, input prompts included; no target set
    assert {f"encoder.blocks.{i}.target.prompt" for i in range(2)} == set(apart.state_dict()) - set(state)
    images, (ids, valid) = _digit_images(3), _captions(3)
    with torch.no_grad():
        assert torch.equal(apart.encode([VisualSegment(images)]), shared.encode([VisualSegment(images)]))
        assert not torch.allclose(apart.encode_text(ids, valid), shared.encode_text(ids, valid), atol=1e-4)
        for b in apart.encoder.blocks:
            b.target.prompt.copy_(b.prompt)
        assert torch.allclose(apart.encode_text(ids, valid), shared.encode_text(ids, valid), atol=1e-6)


def test_unshared_prompts_both_get_gradients_in_prompt_tuning():
    import torch.nn.functional as F

    from uniperceiver.modeling.model import VisualSegment

    torch.manual_seed(0)
    model = _lively(build_model("tiny", depth=2, prompt_tokens=3, spe_bias=True, target_prompts=True)).train()
    info = setup_tuning(model, "prompt")
    assert {f"encoder.blocks.{i}.{p}" for i in range(2) for p in ("prompt", "target.prompt")} <= set(info.names)
    images, (ids, valid) = _digit_images(4), _captions(4)
    logits = model.logits(model.encode([VisualSegment(images)]), model.encode_text(ids, valid), "retrieve")
    labels = torch.arange(4)
    (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)).backward()
    for b in model.encoder.blocks:
        assert b.prompt.grad is not None and b.prompt.grad.abs().sum() > 0
        assert b.target.prompt.grad is not None and b.target.prompt.grad.abs().sum() > 0
    assert model.encoder.blocks[0].fc1.weight.grad is None  # frozen


def test_share_deep_prompt_option_builds_and_reloads_target_prompts(tmp_path):
    from uniperceiver.config.schema import TuneSection
    from uniperceiver.engine.tuning import load_for_tuning, tuning_overrides
    from uniperceiver.modeling import load_model
    from uniperceiver.modeling.convert import convert_checkpoint, ours_to_official

    assert tuning_overrides(TuneSection(mode="prompt"))["target_prompts"] is False
    apart = TuneSection(mode="prompt", share_deep_prompt=False, prompt_tokens=4)
    assert tuning_overrides(apart) == {"prompt_tokens": 4, "spe_bias": True, "target_prompts": True}
    assert "target_prompts" not in tuning_overrides(TuneSection(mode="full", share_deep_prompt=False))
    with pytest.raises(ConfigError, match="contradicts tune.share_deep_prompt"):
        tuning_overrides(apart, {"target_prompts": False})
    with pytest.raises(ConfigError, match="target_prompts"):
        build_model("tiny", target_prompts=True)  # no prompts to separate from

    torch.manual_seed(0)
    pretrained = save_model(build_model("tiny", depth=2), tmp_path / "pretrained")
    tuned = load_for_tuning(pretrained, apart)  # the checkpoint has no prompts: fresh ones
    assert tuned.cfg.target_prompts and tuned.encoder.blocks[1].target.prompt.shape == (4, 192)
    with torch.no_grad():
        for b in tuned.encoder.blocks:
            b.target.prompt.normal_()
    back = load_model(save_model(tuned, tmp_path / "tuned"))
    assert back.cfg.target_prompts
    for key, value in tuned.state_dict().items():
        assert torch.equal(value, back.state_dict()[key]), key

    official = ours_to_official(tuned)["model"]
    assert "fused_encoder.layers.1.deep_prompt_embedding.target_embedding.weight" in official
    torch.save({"model": official}, tmp_path / "official.pth")
    out, cfg, _ = convert_checkpoint(tmp_path / "official.pth", tmp_path / "converted", image_size=64)
    assert cfg.target_prompts and cfg.prompt_tokens == 4
    converted = load_model(out)
    for key, value in tuned.state_dict().items():
        assert torch.equal(value, converted.state_dict()[key]), key


def test_prompt_tune_command_with_unshared_target_prompts(mini_data, source, tmp_path):
    from uniperceiver.modeling import load_model

    out = tmp_path / "tuned-retrieval"
    result, text = invoke(["prompt-tune", "--task", "mini-digits-retrieval", "--fraction", "0.1", "--checkpoint",
                           str(source), "--max-steps", "2", "--data-dir", str(mini_data), "--output", str(out),
                           "--set", "tune.share_deep_prompt=false", "--set", "optim.warmup_steps=1"])
    assert result.exit_code == 0, text
    tuned = load_model(out / "final")
    assert tuned.cfg.target_prompts
    after = load_file(str(out / "final" / "model.safetensors"))
    assert {f"encoder.blocks.{i}.{p}" for i in range(2) for p in ("prompt", "target.prompt")} <= set(after)
    assert not torch.equal(after["encoder.blocks.0.prompt"], after["encoder.blocks.0.target.prompt"])
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["tune"]["share_deep_prompt"] is False
