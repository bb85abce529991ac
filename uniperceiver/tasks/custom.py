"""User-defined zero-shot tasks: rank your own candidates for your own images, videos or texts.

Why: the point of Uni-Perceiver is that a new task needs no new head, only inputs and candidate
targets. A small YAML file says which:

    name: pets                       # optional
    inputs: {images: photos/}        # or {videos: clips/} or {texts: sentences.txt}
    candidates: [cat, dog, rocket]   # class names / descriptions, or {images: examples/}
    template: "a photo of a {}"      # optional, applied to text candidates
    labels: {cat1.jpg: cat}          # optional; inputs inside class subfolders are labelled too
    top_k: 3                         # optional (default 5)

Relative paths are read relative to the YAML file. Candidates given as `{images: folder}` hold one
subfolder per class with example images; a class is represented by the L2-normalised mean of its
examples' normalised features (prototype classification). Each input gets its top-k candidates
with cosine scores and softmax probabilities; with labels, top-1 / top-k accuracy is reported.
`CustomTask` is a `Task`, so it runs through the same harness and target cache as catalog tasks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor

from uniperceiver.data.format import PreparedDataset
from uniperceiver.data.media import load_image, sample_video_frames
from uniperceiver.errors import ConfigError, DataError, MediaError
from uniperceiver.modeling.model import TextSegment, UniPerceiver, VisualSegment
from uniperceiver.modeling.model_config import ModelConfig
from uniperceiver.tasks.base import TargetSet, Task, TaskConfig, encode_targets, text_target_set
from uniperceiver.tasks.family_options import CustomOptions
from uniperceiver.tokenizers.text import ClipTokenizer
from uniperceiver.tokenizers.vision import image_eval_transform, video_eval_views

__all__ = [
    "IMAGE_EXTS",
    "VIDEO_EXTS",
    "CustomOptions",
    "CustomSpec",
    "CustomTask",
    "build_custom_task",
    "is_custom_task_file",
    "load_custom_spec",
    "parse_custom_spec",
    "single_input_spec",
]

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
_TOP_KEYS = ("name", "inputs", "candidates", "labels", "top_k", "template", "frames", "batch_size")
_MODALITY_KEYS = {"images": "image", "videos": "video", "texts": "text"}
_SCALES = {"image": "img_cls", "video": "video_cls", "text": "retrieve"}
INPUT_MAX_LEN = 128
CANDIDATE_MAX_LEN = 64


def is_custom_task_file(task: str) -> bool:
    """`--task my-task.yaml` names a custom task file rather than a catalog entry."""
    return task.lower().endswith((".yaml", ".yml"))


@dataclass
class CustomSpec:
    """A validated custom task: inputs, candidates and optional labels, all resolved."""

    name: str
    modality: str  # "image" | "video" | "text"
    #: One dict per input: {"id", "path" (media) or "text", "label" (class name or None)}.
    inputs: list[dict]
    #: Class names (what labels and predictions refer to).
    classes: list[str]
    #: Per class, example image paths when candidates are images; None for text candidates.
    class_images: list[list[Path]] | None = None
    template: str | None = None
    top_k: int = 5
    frames: int = 8
    batch_size: int = 16
    source: str = "<inline>"
    notes: list[str] = field(default_factory=list)

    @property
    def labelled(self) -> int:
        return sum(1 for s in self.inputs if s.get("label") is not None)


# ---------------------------------------------------------------------------------------- parsing


def load_custom_spec(path: str | Path) -> CustomSpec:
    """Read and validate a custom task YAML (yaml.safe_load); ConfigError names the bad key."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: custom task file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}{where}: invalid YAML ({getattr(exc, 'problem', None) or exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a UTF-8 text file") from None
    return parse_custom_spec(data, base_dir=p.parent.absolute(), source=str(p), default_name=p.stem)


def parse_custom_spec(data: Any, base_dir: Path, source: str = "<inline>", default_name: str = "custom") -> CustomSpec:
    """Validate the YAML mapping of a custom task (see the module docstring for the keys)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with keys {', '.join(_TOP_KEYS)}, got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; allowed: {', '.join(_TOP_KEYS)}")
    for key in ("inputs", "candidates"):
        if key not in data:
            raise ConfigError(f"{source}: missing key {key!r}")
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{source}: 'name' must be a non-empty string, got {name!r}")
    top_k = _positive_int(data.get("top_k", 5), "top_k", source)
    frames = _positive_int(data.get("frames", 8), "frames", source)
    batch_size = _positive_int(data.get("batch_size", 16), "batch_size", source)
    template = data.get("template")
    if template is not None and (not isinstance(template, str) or "{}" not in template):
        raise ConfigError(f"{source}: 'template' must be a string containing '{{}}', got {template!r}")

    modality, inputs = _parse_inputs(data["inputs"], base_dir, source)
    classes, class_images = _parse_candidates(data["candidates"], base_dir, source)
    if class_images is not None and template is not None:
        raise ConfigError(f"{source}: 'template' applies to text candidates only, not to candidates.images")
    _apply_labels(inputs, data.get("labels"), classes, source, modality)
    return CustomSpec(
        name=name.strip(), modality=modality, inputs=inputs, classes=classes, class_images=class_images,
        template=template, top_k=min(top_k, len(classes)), frames=frames, batch_size=batch_size, source=source,
    )


def single_input_spec(
    kind: str, value: str | Path, candidates: list[str], top_k: int = 5, frames: int = 8, template: str | None = None
) -> CustomSpec:
    """The spec behind `upctl predict --image/--video/--text`: one input, text candidates."""
    if kind not in ("image", "video", "text"):
        raise ConfigError(f"predict: input kind {kind!r} is unknown; expected image, video or text")
    classes = _clean_candidates(candidates, "--targets")
    if kind == "text":
        text = str(value)
        if not text.strip():
            raise ConfigError("--text: the input text is empty")
        inputs = [{"id": "text-1", "text": text, "label": None, "input": text}]
    else:
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(f"--{kind}: file {path} not found")
        inputs = [{"id": path.name, "path": str(path.absolute()), "label": None, "input": path.name}]
    if template is not None and "{}" not in template:
        raise ConfigError(f"--template must contain '{{}}', got {template!r}")
    return CustomSpec(
        name="predict", modality=kind, inputs=inputs, classes=classes, template=template,
        top_k=min(max(1, top_k), len(classes)), frames=frames, batch_size=1, source="command line",
    )


def _positive_int(value: Any, key: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{source}: {key!r} must be a positive integer, got {value!r}")
    return value


def _resolve(base_dir: Path, value: Any, key: str, source: str) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{source}: {key} must be a path string, got {value!r}")
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base_dir / p)


def _media_files(folder: Path, exts: tuple[str, ...]) -> list[tuple[str, Path, str | None]]:
    """(relative name, path, class subfolder or None): top-level files and one level of class folders."""
    found: list[tuple[str, Path, str | None]] = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix.lower() in exts:
            found.append((entry.name, entry, None))
        elif entry.is_dir():
            for sub in sorted(entry.iterdir()):
                if sub.is_file() and not sub.name.startswith(".") and sub.suffix.lower() in exts:
                    found.append((f"{entry.name}/{sub.name}", sub, entry.name))
    return found


def _parse_inputs(value: Any, base_dir: Path, source: str) -> tuple[str, list[dict]]:
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in _MODALITY_KEYS:
        raise ConfigError(
            f"{source}: 'inputs' must be exactly one of {{images: folder}}, {{videos: folder}}, "
            f"{{texts: file.txt}}, got {value!r}"
        )
    key, target = next(iter(value.items()))
    modality = _MODALITY_KEYS[key]
    if modality == "text":
        if isinstance(target, list):
            lines = [str(t) for t in target]
            where = f"{source}: inputs.texts"
        else:
            path = _resolve(base_dir, target, "inputs.texts", source)
            if not path.is_file():
                raise ConfigError(f"{source}: inputs.texts file {path} not found")
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            where = f"{path}"
        inputs = [
            {"id": f"line-{n}", "text": line.strip(), "label": None, "input": line.strip(), "line": n}
            for n, line in enumerate(lines, 1) if line.strip()
        ]
        if not inputs:
            raise ConfigError(f"{where}: no non-blank text lines to classify")
        return modality, inputs
    folder = _resolve(base_dir, target, f"inputs.{key}", source)
    if not folder.is_dir():
        raise ConfigError(f"{source}: inputs.{key} folder {folder} not found")
    exts = IMAGE_EXTS if modality == "image" else VIDEO_EXTS
    files = _media_files(folder, exts)
    if not files:
        raise ConfigError(f"{folder}: no {key} found (expected files ending in {', '.join(exts)})")
    inputs = [
        {"id": rel, "path": str(path.absolute()), "label": cls, "input": rel}
        for rel, path, cls in files
    ]
    return modality, inputs


def _clean_candidates(items: Any, where: str) -> list[str]:
    if isinstance(items, str):
        items = [c for c in items.split(",")]
    if not isinstance(items, list):
        raise ConfigError(f"{where}: expected a list of class names or descriptions, got {type(items).__name__}")
    out = [str(c).strip() for c in items if str(c).strip()]
    if not out:
        raise ConfigError(f"{where}: the candidate list is empty; give at least one class name")
    dup = sorted({c for c in out if out.count(c) > 1})
    if dup:
        raise ConfigError(f"{where}: duplicate candidate(s) {dup}")
    return out


def _parse_candidates(value: Any, base_dir: Path, source: str) -> tuple[list[str], list[list[Path]] | None]:
    if isinstance(value, dict):
        if set(value) != {"images"}:
            raise ConfigError(f"{source}: 'candidates' must be a list of names or {{images: folder}}, got keys {sorted(value)}")
        folder = _resolve(base_dir, value["images"], "candidates.images", source)
        if not folder.is_dir():
            raise ConfigError(f"{source}: candidates.images folder {folder} not found")
        classes: list[str] = []
        images: list[list[Path]] = []
        for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            files = [f for f in sorted(sub.iterdir()) if f.is_file() and f.suffix.lower() in IMAGE_EXTS]
            if not files:
                raise ConfigError(f"{sub}: class folder has no example images ({', '.join(IMAGE_EXTS)})")
            classes.append(sub.name)
            images.append(files)
        if not classes:
            raise ConfigError(f"{folder}: the candidate list is empty; expected one subfolder of example images per class")
        return classes, images
    return _clean_candidates(value, f"{source}: candidates"), None


def _apply_labels(inputs: list[dict], labels: Any, classes: list[str], source: str, modality: str) -> None:
    """Fill each input's label from `labels:` (file name / line -> class) over any class-folder label."""
    if labels is not None:
        if not isinstance(labels, dict):
            raise ConfigError(f"{source}: 'labels' must map input names to classes, got {type(labels).__name__}")
        by_key: dict[str, dict] = {}
        for s in inputs:
            by_key[str(s["input"])] = s
            if modality != "text":
                by_key.setdefault(Path(s["input"]).name, s)
            else:
                by_key[str(s["line"])] = s
        for key, cls in labels.items():
            sample = by_key.get(str(key))
            if sample is None:
                raise ConfigError(f"{source}: labels.{key}: no such input (expected a file name or text line number)")
            sample["label"] = str(cls)
    known = set(classes)
    for s in inputs:
        if s["label"] is not None and s["label"] not in known:
            raise ConfigError(
                f"{source}: label {s['label']!r} of input {s['input']!r} is not a candidate; candidates: {', '.join(classes)}"
            )


# ---------------------------------------------------------------------------------------- the task


class CustomTask(Task):
    """A zero-shot ranking task from a `CustomSpec` (evaluation only: no training loss)."""

    family = "custom"
    Options = CustomOptions
    opts: CustomOptions
    scale = "img_cls"
    modality = "image"

    def __init__(self, spec: CustomSpec, tokenizer: ClipTokenizer, model_cfg: ModelConfig) -> None:
        cfg = TaskConfig(
            name=spec.name, family="custom", dataset="custom", split="val", eval_split="val",
            batch_size=spec.batch_size, options={"top_k": spec.top_k, "frames": spec.frames},
        )
        root = Path(spec.source).parent if spec.source.endswith((".yaml", ".yml")) else Path.cwd()
        dataset = PreparedDataset(spec.name, root, {
            "raw_root": str(root), "splits": {"val": len(spec.inputs)}, "media_type": spec.modality,
            "targets": {"classes": list(spec.classes)},
        })
        super().__init__(cfg, dataset, tokenizer, model_cfg)
        self.spec = spec
        self.modality = spec.modality  # type: ignore[misc] - per instance: the inputs decide
        self.scale = _SCALES[spec.modality]  # type: ignore[misc]
        self.frames = min(self.opts.frames, model_cfg.max_frames)
        #: Candidate example images that could not be read, by reason (`evaluation_extras`).
        self.candidate_skipped: dict[str, int] = {}
        self._targets: TargetSet | None = None

    # -- data --------------------------------------------------------------------------------------
    def examples(self, split: str) -> list[dict]:
        return [dict(s) for s in self.spec.inputs]

    def _image_pixels(self, path: str | Path) -> Tensor:
        size = self.model_cfg.image_size
        # The classification convention: shorter side to size * 256/224, then a center crop.
        return image_eval_transform(load_image(path), size, resize_to=int(size * 256 / 224))

    def load(self, sample: dict, *, train: bool, rng: np.random.Generator) -> dict:
        item = {"id": sample["id"], "input": sample["input"], "label": sample.get("label")}
        if self.modality == "text":
            item["text"] = sample["text"]
        elif self.modality == "image":
            item["pixels"] = self._image_pixels(sample["path"])
        else:
            frames = sample_video_frames(sample["path"], self.frames, mode="uniform")
            item["pixels"] = video_eval_views(frames, self.model_cfg.image_size, spatial_views=1)[0]
        return item

    def collate(self, items: list[dict], *, train: bool, rng: np.random.Generator) -> dict[str, Any]:
        batch: dict[str, Any] = {k: [it[k] for it in items] for k in ("id", "input", "label")}
        if self.modality == "text":
            batch["ids"], batch["valid"] = self.tokenizer.encode_batch([it["text"] for it in items], INPUT_MAX_LEN)
        else:
            batch["pixels"] = torch.stack([it["pixels"] for it in items])
        return batch

    # -- targets -----------------------------------------------------------------------------------
    def target_set(self) -> TargetSet:
        if self._targets is None:
            self._targets = self._build_target_set()
        return self._targets

    def _build_target_set(self) -> TargetSet:
        spec = self.spec
        if spec.class_images is None:
            texts = [spec.template.format(c) if spec.template else c for c in spec.classes]
            ts = text_target_set(f"custom:{spec.name}", texts, self.tokenizer, max_len=CANDIDATE_MAX_LEN)
            ts.labels = list(spec.classes)
            return ts
        # Example images: the key covers every file's bytes and the preprocessing size, so the
        # cache recomputes when an example changes.
        h = hashlib.sha256(f"image-prototypes|{self.model_cfg.image_size}".encode())
        for cls, files in zip(spec.classes, spec.class_images):
            h.update(cls.encode() + b"\0")
            for f in files:
                h.update(f.name.encode() + b"\0")
                try:
                    h.update(hashlib.sha256(f.read_bytes()).digest())
                except OSError:
                    h.update(b"unreadable")
        n = len(spec.classes)
        ids = torch.zeros(n, 1, dtype=torch.long)
        valid = torch.ones_like(ids, dtype=torch.bool)
        return TargetSet(f"custom-images:{spec.name}", ids, valid, list(spec.classes), key=h.hexdigest()[:16])

    @property
    def targets_are_texts(self) -> bool:
        return self.spec.class_images is None

    def evaluation_extras(self) -> dict[str, Any]:
        """`candidate_skipped`: unreadable candidate example images by reason (only when some were)."""
        return {"candidate_skipped": dict(self.candidate_skipped)} if self.candidate_skipped else {}

    def encode_target_set(self, model: UniPerceiver, targets: TargetSet) -> Tensor:
        """Text candidates: the usual target encoding. Image candidates: per-class mean of the
        normalised image features, normalised again so scores stay cosines."""
        if self.spec.class_images is None:
            return encode_targets(model, targets)
        self.candidate_skipped = {}
        protos = []
        for cls, files in zip(self.spec.classes, self.spec.class_images):
            pixels = []
            for f in files:
                try:
                    pixels.append(self._image_pixels(f))
                except MediaError as exc:
                    reason = f"{exc.kind}_media"
                    self.candidate_skipped[reason] = self.candidate_skipped.get(reason, 0) + 1
            if not pixels:
                raise DataError(f"candidates.images: class {cls!r} has no readable example image ({len(files)} file(s) failed)")
            feats = []
            for start in range(0, len(pixels), self.spec.batch_size):
                chunk = torch.stack(pixels[start:start + self.spec.batch_size]).to(model.device)
                feats.append(model.encode([VisualSegment(chunk)]))
            protos.append(torch.nn.functional.normalize(torch.cat(feats).mean(0), dim=-1))
        return torch.stack(protos)

    # -- training / evaluation -----------------------------------------------------------------------
    def loss(self, model: UniPerceiver, batch: dict[str, Any], targets: Tensor | None) -> tuple[Tensor, dict[str, float]]:
        raise ConfigError(f"custom task {self.spec.name!r} is zero-shot only: it cannot be trained")

    def _encode_inputs(self, model: UniPerceiver, batch: dict[str, Any]) -> Tensor:
        if self.modality == "text":
            return model.encode([TextSegment(batch["ids"], batch["valid"])])
        return model.encode([VisualSegment(batch["pixels"])])

    def evaluate_batch(self, model: UniPerceiver, batch: dict[str, Any], targets: Tensor | None) -> list[dict]:
        if targets is None:
            raise ConfigError(f"custom task {self.spec.name!r}: no candidate features")
        feats = self._encode_inputs(model, batch)
        targets = targets.to(feats.device, feats.dtype)
        sims = feats @ targets.t()
        probs = (sims * model.logit_scale(self.scale)).softmax(-1)
        k = min(self.spec.top_k, len(self.spec.classes))
        # One stable order per input: the ranked list, the label's rank and accuracy all agree.
        order = torch.sort(sims.float().cpu(), dim=-1, descending=True, stable=True).indices
        sims_cpu, probs_cpu = sims.float().cpu(), probs.float().cpu()
        out = []
        for b in range(sims.shape[0]):
            row = order[b].tolist()
            ranked = [
                {"candidate": self.spec.classes[j], "score": float(sims_cpu[b, j]), "prob": float(probs_cpu[b, j])}
                for j in row[:k]
            ]
            label = batch["label"][b]
            pred: dict[str, Any] = {"id": batch["id"][b], "input": batch["input"][b], "ranked": ranked,
                                    "prediction": ranked[0]["candidate"], "label": label}
            if label is not None:
                pred["label_index"] = self.spec.classes.index(label)
                pred["label_rank"] = row.index(pred["label_index"]) + 1
                pred["correct"] = pred["label_rank"] == 1
            out.append(pred)
        return out

    def compute_metrics(self, predictions: list[dict]) -> dict[str, float]:
        """Top-1 / top-k accuracy (percent) over the labelled inputs; counts otherwise."""
        labelled = [p for p in predictions if p.get("label") is not None]
        out: dict[str, float] = {"inputs": float(len(predictions)), "labelled": float(len(labelled))}
        if labelled:
            k = self.spec.top_k
            out["top1"] = 100.0 * sum(p["label_rank"] == 1 for p in labelled) / len(labelled)
            if k > 1:
                out[f"top{k}"] = 100.0 * sum(p["label_rank"] <= k for p in labelled) / len(labelled)
        return out


def build_custom_task(spec: CustomSpec, tokenizer: ClipTokenizer, model_cfg: ModelConfig) -> CustomTask:
    """A `Task` for the harness from a validated spec."""
    return CustomTask(spec, tokenizer, model_cfg)
