"""Model directories: `config.json` + `model.safetensors` (no pickle anywhere).

A model directory is what `upctl convert` writes and what every stage reads with `--checkpoint`.
`load_model` checks that every key is known and every shape fits before touching the weights.

A training step folder is a model directory too, with its weights in a DCP folder instead of one
safetensors file (each rank of the run wrote its own part): its config.json names that folder and
the digest of each of its files (`"weights": {"dcp": "model.dcp", "digest": ..., "files": {...}}`).
`load_model`, `load_state` and `weights_digest` read both kinds; `final/` and `upctl convert` write
the safetensors kind.
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch
from safetensors.torch import load_file, save

from uniperceiver.errors import CheckpointError, ConfigError
from uniperceiver.modeling.model import UniPerceiver
from uniperceiver.modeling.model_config import ModelConfig
from uniperceiver.utils.digests import file_digest
from uniperceiver.utils.files import atomic_write, atomic_write_json, sha256_file

if torch.distributed.is_available() and not torch.distributed.is_initialized():
    # torch.distributed.nn's collectives take `group=group.WORLD` as a default argument, evaluated when
    # the module is first imported. torch.distributed.checkpoint imports it; imported only after a
    # process group exists (a script that joins a group, then loads a step folder), those defaults
    # keep the gloo group alive past destroy_process_group, and its destruction at interpreter exit
    # aborts the process ("terminate called without an active exception", about half of 2-rank runs).
    # Imported here, before any group exists, the defaults are None (~2 ms). Not once a group
    # exists: then importing it is what does the harm.
    import torch.distributed.nn  # noqa: F401

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
#: The weights folder of a training step folder (torch.distributed.checkpoint, one file per writer).
MODEL_DCP = "model.dcp"
#: DCP's metadata file in it (as `utils.dcp_read.DCP_METADATA`; named here so that finding a model
#: folder imports no torch.distributed.checkpoint).
DCP_METADATA = ".metadata"
MODEL_FORMAT = "uniperceiver-model-v1"


def save_model(model: UniPerceiver, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write the config and the weights atomically; returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    data = save(state)
    atomic_write(out / WEIGHTS_NAME, lambda fh: fh.write(data))
    # The checksum lets load_model refuse a truncated or bit-flipped weights file.
    payload = {"model": model.cfg.to_dict(), "format": MODEL_FORMAT,
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


def dcp_weights_config(cfg: ModelConfig, algorithm: str, files: dict[str, str],
                       extra: dict | None = None) -> dict:
    """config.json of a model directory whose weights are the DCP folder MODEL_DCP (`files`: the
    digest of each file in it, by name)."""
    payload = {"model": cfg.to_dict(), "format": MODEL_FORMAT,
               "weights": {"dcp": MODEL_DCP, "digest": algorithm, "files": dict(sorted(files.items()))}}
    if extra:
        payload["extra"] = extra
    return payload


def _config_payload(model_dir: Path) -> dict:
    try:
        payload = json.loads((model_dir / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return payload if isinstance(payload, dict) else {}


def _recorded_sha256(model_dir: Path) -> str | None:
    return _config_payload(model_dir).get("weights_sha256")


def _dcp_weights(model_dir: Path) -> dict | None:
    """config.json's description of DCP weights ({"dcp", "digest", "files"}), None for safetensors."""
    weights = _config_payload(model_dir).get("weights")
    if not isinstance(weights, dict) or weights.get("dcp") != MODEL_DCP:
        return None
    if not isinstance(weights.get("files"), dict) or not isinstance(weights.get("digest"), str):
        raise CheckpointError(f"{Path(model_dir) / CONFIG_NAME}: 'weights' names {MODEL_DCP} "
                              "without its files' digests")
    return weights


def has_weights(model_dir: str | Path) -> bool:
    """Whether `model_dir` holds weights `load_model` can read (a safetensors file or a DCP folder)."""
    path = Path(model_dir)
    return (path / WEIGHTS_NAME).is_file() or (
        (path / CONFIG_NAME).is_file() and (path / MODEL_DCP / DCP_METADATA).is_file()
        and _dcp_weights_or_none(path) is not None)


def _dcp_weights_or_none(path: Path) -> dict | None:
    try:
        return _dcp_weights(path)
    except CheckpointError:
        return None


def verify_dcp_weights(model_dir: str | Path) -> Path:
    """Check every file of a DCP weights folder against config.json; returns the folder."""
    path = Path(model_dir)
    weights = _dcp_weights(path)
    if weights is None:
        raise CheckpointError(f"{path}: no {WEIGHTS_NAME} and no {MODEL_DCP} weights named in {CONFIG_NAME}")
    folder = path / MODEL_DCP
    for name, expected in sorted(weights["files"].items()):
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise CheckpointError(f"{path / CONFIG_NAME}: file name {name!r} points outside {MODEL_DCP}")
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name}: missing")
        actual = file_digest(folder / name, weights["digest"])
        if actual != expected:
            raise CheckpointError(
                f"{folder / name}: {weights['digest']} checksum {actual[:12]}... does not match {CONFIG_NAME} "
                f"({str(expected)[:12]}...): the weights file is truncated or corrupt"
            )
    return folder


def load_state(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a model directory as a state dict on the CPU, checksums checked first."""
    if not (Path(model_dir) / WEIGHTS_NAME).is_file() and _dcp_weights(Path(model_dir)) is not None:
        return _dcp_read().read_state_dict(verify_dcp_weights(model_dir))
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
    check_shapes_fit(model, {k: tuple(v.shape) for k, v in state.items()}, source)


def check_shapes_fit(model: UniPerceiver, shapes: dict[str, tuple[int, ...]], source: str,
                     optional: Callable[[str], bool] = lambda key: False) -> None:
    """`check_state_fits` from the saved shapes alone (what a DCP folder's metadata holds);
    keys for which `optional(key)` holds may be missing."""
    expected = model.state_dict()
    for key, shape in shapes.items():
        if key not in expected:
            raise CheckpointError(f"{source}: unexpected key {key!r} (shape {tuple(shape)}) for this model")
        if tuple(expected[key].shape) != tuple(shape):
            raise CheckpointError(
                f"{source}: key {key!r} has shape {tuple(shape)}, the model expects {tuple(expected[key].shape)}"
                f" (model size {model.cfg.size!r}, width {model.cfg.width})"
            )
    missing = sorted(k for k in set(expected) - set(shapes) if not optional(k))
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
    if not (Path(model_dir) / WEIGHTS_NAME).is_file() and _dcp_weights(Path(model_dir)) is not None:
        read_dcp_weights_into(model, verify_dcp_weights(model_dir), optional=_is_tuning_extra)
        return model
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


def read_dcp_weights_into(model: UniPerceiver, folder: Path, *,
                          optional: Callable[[str], bool] = lambda key: False, no_dist: bool = True) -> None:
    """Read a DCP weights folder straight into `model`'s parameters and buffers (no second copy).

    Names and shapes are checked against the folder's metadata first (one line naming the first
    key that is unknown, missing or of the wrong shape); keys for which `optional(key)` holds may be
    absent (prompt-tuning extras keep their fresh values). `no_dist`: read on this rank alone,
    even inside a distributed job (every rank reads the whole weights before sharding them).
    """
    saved = check_dcp_weights_fit(model, folder, optional)
    targets = {k: v for k, v in model.state_dict().items() if k in saved}
    with torch.no_grad():
        _dcp_read().load_tensors(folder, targets, no_dist=no_dist)


def check_dcp_weights_fit(model: torch.nn.Module, folder: Path,
                          optional: Callable[[str], bool] = lambda key: False) -> set[str]:
    """`check_shapes_fit` against a DCP weights folder's metadata (nothing else is read); returns
    the saved keys. `model` may be sharded: its state dict gives the global shapes."""
    meta = _dcp_read().read_metadata(folder)
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata  # (loaded by _dcp_read)

    saved = {k: tuple(md.size) for k, md in meta.state_dict_metadata.items() if isinstance(md, TensorStorageMetadata)}
    check_shapes_fit(model, saved, str(folder), optional)  # type: ignore[arg-type]
    return set(saved)


def _dcp_read() -> ModuleType:
    """`utils.dcp_read`, imported when a DCP folder is read: torch.distributed.checkpoint pulls in some
    700 modules (~1 s), which a process that only reads safetensors model folders never needs.

    A process that joined its group before importing uniperceiver gets one warning: importing
    torch.distributed.nn now (see the top of this module) may make it abort at exit."""
    if ("torch.distributed.nn" not in sys.modules and torch.distributed.is_available()
            and torch.distributed.is_initialized()):
        warnings.warn("reading a DCP folder imports torch.distributed.nn after the process group was created, "
                      "which can make the process abort at exit ('terminate called without an active "
                      "exception'); import uniperceiver before calling init_process_group", RuntimeWarning,
                      stacklevel=3)
    from uniperceiver.utils import dcp_read

    return dcp_read


def weights_digest(model_dir: str | Path) -> str:
    """A short digest of the weights: keys caches of encoded target sets to one checkpoint."""
    weights = _dcp_weights_or_none(Path(model_dir))
    if weights is not None and not (Path(model_dir) / WEIGHTS_NAME).is_file():
        payload = json.dumps([weights["digest"], weights["files"]], sort_keys=True)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
    return (_recorded_sha256(Path(model_dir)) or sha256_file(Path(model_dir) / WEIGHTS_NAME))[:16]


def state_digest(model: UniPerceiver) -> str:
    """The same idea for an in-memory model (tests, freshly initialised models)."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


__all__ = [
    "MODEL_DCP",
    "MODEL_FORMAT",
    "dcp_weights_config",
    "has_weights",
    "read_dcp_weights_into",
    "verify_dcp_weights",
    "save_model",
    "load_model",
    "read_config",
    "load_state",
    "check_dcp_weights_fit",
    "check_shapes_fit",
    "check_state_fits",
    "weights_digest",
    "state_digest",
]
