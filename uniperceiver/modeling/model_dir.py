"""Model directories: `config.json` + `model.safetensors` (no pickle anywhere).

A model directory is what `upctl convert` writes and what every stage reads with `--checkpoint`.
`load_model` checks that every key is known and every shape fits before touching the weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from uniperceiver.errors import CheckpointError, ConfigError
from uniperceiver.modeling.model_config import ModelConfig
from uniperceiver.modeling.model import UniPerceiver
from uniperceiver.utils.files import atomic_write, atomic_write_json, sha256_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_model(model: UniPerceiver, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write the config and the weights atomically; returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    data = save(state)
    atomic_write(out / WEIGHTS_NAME, lambda fh: fh.write(data))
    # The checksum lets load_model refuse a truncated or bit-flipped weights file.
    payload = {"model": model.cfg.to_dict(), "format": "uniperceiver-model-v1",
               "weights_sha256": hashlib.sha256(data).hexdigest()}
    if extra:
        payload["extra"] = extra
    atomic_write_json(out / CONFIG_NAME, payload)
    return out


def read_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{model_dir}: not a model directory (no {CONFIG_NAME}); convert one with `upctl convert`")
    try:
        payload = json.loads(path.read_text())
        return ModelConfig.from_dict(payload["model"])
    except (json.JSONDecodeError, KeyError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"{path}: invalid model config ({exc})") from None


def _recorded_sha256(model_dir: Path) -> str | None:
    try:
        return json.loads((model_dir / CONFIG_NAME).read_text()).get("weights_sha256")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def load_state(model_dir: str | Path) -> dict[str, torch.Tensor]:
    path = Path(model_dir) / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{model_dir}: no {WEIGHTS_NAME}")
    expected = _recorded_sha256(Path(model_dir))
    if expected is not None:
        actual = sha256_file(path)
        if actual != expected:
            raise CheckpointError(
                f"{path}: sha256 {actual[:12]}... does not match config.json ({expected[:12]}...): "
                "the weights file is truncated or corrupt"
            )
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from None


def check_state_fits(model: UniPerceiver, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise naming the first key that is unknown, missing or of the wrong shape."""
    expected = model.state_dict()
    for key, value in state.items():
        if key not in expected:
            raise CheckpointError(f"{source}: unexpected key {key!r} (shape {tuple(value.shape)}) for this model")
        if tuple(expected[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"{source}: key {key!r} has shape {tuple(value.shape)}, the model expects {tuple(expected[key].shape)}"
                f" (model size {model.cfg.size!r}, width {model.cfg.width})"
            )
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{source}: missing key(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def load_model(model_dir: str | Path, **overrides) -> UniPerceiver:
    """Build the model from `config.json` (with optional config overrides) and load its weights.

    Overrides may add prompt-tuning parameters (prompt_tokens, spe_bias, cls_head_classes) that the
    checkpoint lacks: those keep their fresh initialisation; every other key must match exactly.
    """
    cfg = read_config(model_dir)
    if overrides:
        cfg = cfg.replace(**overrides)
    model = UniPerceiver(cfg)
    state = load_state(model_dir)
    fresh = model.state_dict()
    optional = {k for k in fresh if _is_tuning_extra(k)}
    for key in optional - set(state):
        state[key] = fresh[key]
    check_state_fits(model, state, str(model_dir))
    model.load_state_dict(state)
    return model


def _is_tuning_extra(key: str) -> bool:
    return key.endswith(".prompt") or key in {"embed.spe_bias", "cls_head.weight", "cls_head.bias", "similarity_weight"}


def weights_digest(model_dir: str | Path) -> str:
    """A short sha256 of the weights file: keys caches of encoded target sets to one checkpoint."""
    return (_recorded_sha256(Path(model_dir)) or sha256_file(Path(model_dir) / WEIGHTS_NAME))[:16]


def state_digest(model: UniPerceiver) -> str:
    """The same idea for an in-memory model (tests, freshly initialised models)."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


__all__ = [
    "save_model",
    "load_model",
    "read_config",
    "load_state",
    "check_state_fits",
    "weights_digest",
    "state_digest",
]
