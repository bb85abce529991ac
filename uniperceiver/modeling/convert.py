"""Convert released Uni-Perceiver checkpoints (plain torch or DeepSpeed) into a model directory.

Every source key is accounted for: mapped to one of ours, or dropped for a stated reason. Any other
key, or a shape that does not fit, is an error naming the key. Loading never unpickles code
(`torch.load(weights_only=True)`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from uniperceiver.errors import CheckpointError
from uniperceiver.modeling.model_dir import check_state_fits, save_model
from uniperceiver.modeling.model_config import LOGIT_SCALE_NAMES, ModelConfig, model_config
from uniperceiver.modeling.model import UniPerceiver

# Official (plain torch) name -> ours, for keys outside the per-layer blocks.
_GLOBAL_KEYS: dict[str, str] = {
    "token_embed.embeddings.weight": "embed.word.weight",
    "token_embed.embeddings_norm.weight": "embed.norm.weight",
    "token_embed.embeddings_norm.bias": "embed.norm.bias",
    "token_embed.embeddings_pos.position_embeddings.weight": "embed.text_pos.weight",
    "token_embed.embeddings_token_type.weight": "embed.token_type.weight",
    "video_embed.embeddings.weight": "embed.patch.weight",
    "video_embed.embeddings.bias": "embed.patch.bias",
    "video_embed.embeddings_st_pos.spatial_pos_embed.weight": "embed.spatial_pos",
    "video_embed.embeddings_st_pos.temporal_pos_embed.weight": "embed.temporal_pos.weight",
    "loss_prepare.ln_post.weight": "head.ln_post.weight",
    "loss_prepare.ln_post.bias": "head.ln_post.bias",
    "loss_prepare.proj.weight": "head.proj.weight",
    "loss_prepare.proj.bias": "head.proj.bias",
    "s_token_bias": "embed.spe_bias",
    "fc_prompt.weight": "cls_head.weight",
    "fc_prompt.bias": "cls_head.bias",
    "similarity_weight": "similarity_weight",
}
for _name in LOGIT_SCALE_NAMES:
    _GLOBAL_KEYS[f"loss_prepare.logit_scale_{_name}"] = f"head.logit_scales.{_name}"

# Per-layer suffixes: official -> ours.
_LAYER_KEYS: dict[str, str] = {
    "self_attn.in_proj_weight": "attn.qkv.weight",
    "self_attn.in_proj_bias": "attn.qkv.bias",
    "self_attn.out_proj.weight": "attn.out.weight",
    "self_attn.out_proj.bias": "attn.out.bias",
    "linear1.weight": "fc1.weight",
    "linear1.bias": "fc1.bias",
    "linear2.weight": "fc2.weight",
    "linear2.bias": "fc2.bias",
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "gamma_1": "gamma_1",
    "gamma_2": "gamma_2",
    "deep_prompt_embedding.embedding.weight": "prompt",
    "deep_prompt_embedding.target_embedding.weight": "target.prompt",  # SHARE_DEEP_PROMPT False
}

# DeepSpeed-format renames, applied to a key before the plain mapping.
_DEEPSPEED_RENAMES: list[tuple[str, str]] = [
    ("encoder.", "fused_encoder."),
    ("attention.self.qkv_proj.weight", "self_attn.in_proj_weight"),
    ("attention.self.qkv_proj.bias", "self_attn.in_proj_bias"),
    ("attention.output.dense.", "self_attn.out_proj."),
    ("ffn.dense2.", "linear2."),
    ("ffn.dense.", "linear1."),
    ("LayerNormModules.0.", "norm1."),
    ("LayerNormModules.1.", "norm2."),
    ("attention_output.residual_scale", "gamma_1"),
    ("ffn_output.residual_scale", "gamma_2"),
    ("predictor.", "loss_prepare."),
]

_LAYER_RE = re.compile(r"^fused_encoder\.layers\.(\d+)\.(.+)$")


def load_official(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """Read a released checkpoint safely. Returns (state dict, "torch" | "deepspeed")."""
    path = Path(path)
    if path.is_dir():
        candidate = path / "mp_rank_00_model_states.pt"
        if not candidate.is_file():
            raise CheckpointError(f"{path}: a folder without mp_rank_00_model_states.pt is not a DeepSpeed checkpoint")
        path = candidate
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors come in many types; all mean "not a safe checkpoint"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: not a loadable checkpoint (refused or unreadable with weights_only=True: {first[:200]})"
        ) from None
    if isinstance(obj, dict) and "module" in obj and isinstance(obj["module"], dict):
        return _tensors_only(obj["module"], path), "deepspeed"
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        return _tensors_only(obj["model"], path), "torch"
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj), "torch"
    raise CheckpointError(f"{path}: not a Uni-Perceiver checkpoint (expected {{'model': state_dict}}, a state dict or a DeepSpeed file)")


def _tensors_only(state: dict, path: Path) -> dict[str, torch.Tensor]:
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entry {bad[0]!r} of the state dict is not a tensor")
    return dict(state)


def _deepspeed_to_torch(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in state.items():
        if key.startswith("visual_embed."):
            dropped.append(f"{key} (DeepSpeed duplicate visual embedding, unused)")
            continue
        new = key
        for old, rep in _DEEPSPEED_RENAMES:
            if old == "encoder.":
                if new.startswith("encoder."):
                    new = "fused_encoder." + new[len("encoder."):]
            else:
                new = new.replace(old, rep)
        out[new] = value
    # The DeepSpeed checkpoints still carry the video type embedding separately: fold it into the conv bias.
    if "video_embed.embeddings_type.weight" in out and "video_embed.embeddings.bias" in out:
        out["video_embed.embeddings.bias"] = out["video_embed.embeddings.bias"] + out.pop(
            "video_embed.embeddings_type.weight"
        )[0]
        dropped.append("video_embed.embeddings_type.weight (folded into the patch conv bias)")
    return out, dropped


def infer_config(state: dict[str, torch.Tensor], image_size: int = 224) -> ModelConfig:
    """Read width, depth, heads, prompts and heads-extras off an official state dict."""
    try:
        vocab, width = state["token_embed.embeddings.weight"].shape
    except KeyError:
        raise CheckpointError("checkpoint has no token_embed.embeddings.weight: not a Uni-Perceiver checkpoint") from None
    layers = {int(m.group(1)) for k in state if (m := _LAYER_RE.match(k))}
    depth = max(layers) + 1 if layers else 0
    known = {768: "base", 1024: "large", 384: "small", 192: "tiny"}
    size = known.get(width)
    heads = {768: 12, 1024: 16, 384: 6, 192: 3}.get(width, max(1, width // 64))
    mlp = state.get("fused_encoder.layers.0.linear1.weight")
    prompt = state.get("fused_encoder.layers.0.deep_prompt_embedding.embedding.weight")
    fc = state.get("fc_prompt.weight")
    temporal = state.get("video_embed.embeddings_st_pos.temporal_pos_embed.weight")
    text_pos = state.get("token_embed.embeddings_pos.position_embeddings.weight")
    patch = state.get("video_embed.embeddings.weight")
    base = dict(model_config(size).to_dict()) if size else {}
    base.update(
        width=width,
        depth=depth,
        heads=heads,
        mlp_dim=int(mlp.shape[0]) if mlp is not None else 4 * width,
        vocab_size=int(vocab),
        max_text_len=int(text_pos.shape[0]) if text_pos is not None else 512,
        max_frames=int(temporal.shape[0]) if temporal is not None else 8,
        patch_size=int(patch.shape[-1]) if patch is not None else 16,
        image_size=image_size,
        pos_base_size=160,
        prompt_tokens=int(prompt.shape[0]) if prompt is not None else 0,
        spe_bias="s_token_bias" in state,
        target_prompts="fused_encoder.layers.0.deep_prompt_embedding.target_embedding.weight" in state,
        cls_head_classes=int(fc.shape[0]) if fc is not None else 0,
        size=size or "custom",
    )
    return ModelConfig.from_dict(base)


def official_to_ours(
    state: dict[str, torch.Tensor], cfg: ModelConfig, fmt: str = "torch"
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map every key; returns (our state dict without non-persistent parts, notes on dropped keys)."""
    notes: list[str] = []
    if fmt == "deepspeed":
        state, dropped = _deepspeed_to_torch(state)
        notes.extend(dropped)
    ours: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in _GLOBAL_KEYS:
            ours[_GLOBAL_KEYS[key]] = value
            continue
        m = _LAYER_RE.match(key)
        if m and m.group(2) in _LAYER_KEYS:
            ours[f"encoder.blocks.{m.group(1)}.{_LAYER_KEYS[m.group(2)]}"] = value
            continue
        if key.startswith("video_embed.embeddings_norm."):
            twin = key.replace("video_embed.embeddings_norm.", "token_embed.embeddings_norm.")
            if twin in state and not torch.equal(state[twin], value):
                raise CheckpointError(f"{key} differs from {twin}: the reference shares this LayerNorm")
            notes.append(f"{key} (the shared LayerNorm, same tensor as {twin})")
            continue
        if key == "video_embed.embeddings_type.weight":
            notes.append(f"{key} (already folded into the patch conv bias; adding it again counts it twice)")
            continue
        raise CheckpointError(f"unexpected key {key!r} (shape {tuple(value.shape)}): neither mapped nor known to drop")
    # Scalars may be stored as [] or [1].
    for name in list(ours):
        if name.startswith("head.logit_scales.") or name == "similarity_weight":
            ours[name] = ours[name].reshape(())
    if "embed.spatial_pos" in ours:
        g = cfg.grid_size
        if ours["embed.spatial_pos"].shape != (g * g, cfg.width):
            notes.append("spatial position table of another size skipped (the model's own sin-cos table is kept)")
            del ours["embed.spatial_pos"]
    tp = ours.get("embed.temporal_pos.weight")
    if tp is not None and tp.shape[0] != cfg.max_frames:
        ours["embed.temporal_pos.weight"] = (
            F.interpolate(tp.t()[None].float(), size=cfg.max_frames, mode="linear", align_corners=False)[0].t()
        )
        notes.append(f"temporal table interpolated from {tp.shape[0]} to {cfg.max_frames} frames")
    return ours, notes


def ours_to_official(model: UniPerceiver, fmt: str = "torch") -> dict:
    """Export our weights in the released layout (for round-trip tests and for sharing)."""
    inv_global = {v: k for k, v in _GLOBAL_KEYS.items()}
    inv_layer = {v: k for k, v in _LAYER_KEYS.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        value = value.detach().clone()
        if key in inv_global:
            out[inv_global[key]] = value.reshape(1) if key.startswith("head.logit_scales.") else value
        elif key.startswith("encoder.blocks."):
            _, _, idx, rest = key.split(".", 3)
            out[f"fused_encoder.layers.{idx}.{inv_layer[rest]}"] = value
        else:
            raise CheckpointError(f"no official name for {key!r}")
    out["video_embed.embeddings_norm.weight"] = out["token_embed.embeddings_norm.weight"].clone()
    out["video_embed.embeddings_norm.bias"] = out["token_embed.embeddings_norm.bias"].clone()
    out["video_embed.embeddings_type.weight"] = torch.zeros(1, model.cfg.width)
    if fmt == "torch":
        return {"model": out}
    renamed: dict[str, torch.Tensor] = {}
    for key, value in out.items():
        new = key
        if new.startswith("fused_encoder."):
            new = "encoder." + new[len("fused_encoder."):]
        for old, rep in reversed(_DEEPSPEED_RENAMES[1:]):
            new = new.replace(rep, old)
        renamed[new] = value
    # The DeepSpeed files keep the type embedding unfolded: export bias - type so conversion folds it back.
    return {"module": renamed}


def convert_checkpoint(
    source: str | Path,
    out_dir: str | Path,
    image_size: int = 224,
    log: Callable[[str], None] | None = None,
) -> tuple[Path, ModelConfig, list[str]]:
    """`upctl convert`: read, map, check every key and shape, save a model directory."""
    state, fmt = load_official(source)
    probe = _deepspeed_to_torch(state)[0] if fmt == "deepspeed" else state
    cfg = infer_config(probe, image_size=image_size)
    ours, notes = official_to_ours(state, cfg, fmt)
    model = UniPerceiver(cfg)
    full = model.state_dict()
    if "embed.spatial_pos" not in ours:
        ours["embed.spatial_pos"] = full["embed.spatial_pos"]
    check_state_fits(model, ours, str(source))
    model.load_state_dict(ours)
    out = save_model(model, out_dir, extra={"converted_from": str(source), "source_format": fmt, "notes": notes})
    if log:
        for note in notes:
            log(f"dropped: {note}")
    return out, cfg, notes
