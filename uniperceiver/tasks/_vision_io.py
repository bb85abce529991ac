"""Shared image / video loading for the vision task families (classification, retrieval, captioning).

Why one module: the three families read media the same way, and the published numbers depend on
the exact evaluation pixels (reference-conventions.md, "Image and video transforms"). Options are the
fields of `MediaOptions` (tasks/family_options.py), which the vision families' options extend:

- `image_size` (default: the model's image_size): crop size of images and video frames.
- `eval_resize` (images): shorter side before the center crop at evaluation. Default: classification
  `int(image_size * 256 / 224)` (256 for 224, the ImageNet rule), captioning / retrieval `image_size`.
- `frames` (video, default 8, at most the model's `max_frames`), `stride` (default 32, in frames at
  `target_fps` 30), `sampling` "stride" (reference rule) or "uniform" (centre of equal segments of
  the sample's window: for short clips such as the mini video windows).
- `hflip` (default true): random horizontal flips in training (images and video). Off for inputs whose
  meaning a mirror changes (handwritten digits, text in images).
- `crop_scale` (classification training, default [0.08, 1.0], the ImageNet rule): the area range of the
  random resized crop. Small or centred images (32-px digits) need a narrower range such as [0.6, 1.0];
  [1.0, 1.0] keeps the whole image.
- `views` (video evaluation): "TxS" = temporal x spatial views, e.g. "4x3" for Kinetics-400,
  or [T, S]. Default 1 temporal x 3 spatial for classification
  (the reference always takes 3 crops) and 1 x 1 (center crop) for captioning / retrieval.
An option the task's media never reads (a video option on images, an image one on video) is refused
by name when the task is built (`MediaOptions.check_media`) instead of being ignored.

Frame rules (reference `VideoDataSet`):
- training, "stride": rate r = stride * fps / 30; a random offset in [0, n - int(r (F - 1) + 1));
  frame i = (offset + int(i r)) mod n.
- evaluation, "stride", T temporal views: the reference reads F*T frames at stride `int(stride / T)`
  from the window start and deals them out round-robin, so view j gets frames
  `int((T k + j) * int(stride / T) * fps / 30) mod n`, k = 0..F-1 (T = 1: `int(k * stride * fps / 30)`).
Indices wrap around the window (the reference's `% total_frames`) rather than repeating the last
frame. Every random choice comes from the `np.random.Generator` the caller passes, so a seed fixes
the augmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from uniperceiver.data.format import PreparedDataset
from uniperceiver.data.media import load_image, probe_video, read_frames_at
from uniperceiver.data.shards import member_span
from uniperceiver.errors import ConfigError, MediaError
from uniperceiver.modeling.model_config import ModelConfig
from uniperceiver.tasks.family_options import MediaOptions, parse_views  # noqa: F401 (parse_views: re-exported)
from uniperceiver.tasks.options import FieldError
from uniperceiver.tokenizers.vision import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    _normalise,
    image_eval_transform,
    image_train_transform,
    pil_to_tensor,
    short_side_size,
    video_eval_views,
    video_train_transform,
)


@dataclass(frozen=True)
class VisionOptions:
    """How one task turns media into pixels (see the module docstring for every field)."""

    image_size: int
    eval_resize: int
    frames: int
    stride: int
    sampling: str
    target_fps: float
    temporal_views: int
    spatial_views: int
    #: "cls": random-resized-crop training (ImageNet style); "pair": resize + random crop + flip
    #: (the reference `clip_transforms` used by captioning and retrieval).
    train_style: str
    hflip: bool = True
    crop_scale: tuple[float, float] = (0.08, 1.0)

    @property
    def views(self) -> int:
        return self.temporal_views * self.spatial_views


def vision_options(opts: MediaOptions, model_cfg: ModelConfig, *, purpose: str, media: str,
                   task: str) -> VisionOptions:
    """Resolve a task's media options for `model_cfg`. purpose: "cls" (classification) or "pair"
    (caption / retrieval); media: "image" or "video", what the task reads (an option the other media
    needs is refused, naming `task`). The options were checked already (`MediaOptions.check_model`)."""
    if purpose not in ("cls", "pair"):
        raise ValueError(f"purpose must be 'cls' or 'pair', got {purpose!r}")
    try:
        opts.check_media(media)
    except FieldError as exc:
        raise exc.under(f"task {task!r}: options") from None
    size = opts.image_size or model_cfg.image_size
    eval_resize = opts.eval_resize or (int(size * 256 / 224) if purpose == "cls" else size)
    frames = opts.frames or min(8, model_cfg.max_frames)
    t_views, s_views = opts.views or ((1, 3) if purpose == "cls" else (1, 1))
    return VisionOptions(size, eval_resize, frames, opts.stride, opts.sampling, opts.target_fps, t_views, s_views,
                         purpose, opts.hflip, opts.crop_scale)


def torch_generator(rng: np.random.Generator) -> torch.Generator:
    """A torch generator seeded from the numpy generator (the transforms draw from torch)."""
    return torch.Generator().manual_seed(int(rng.integers(0, 2**62)))


# ------------------------------------------------------------------------------------------ images


def pair_train_transform(img: Image.Image, size: int, rng: torch.Generator, hflip: bool = True) -> Tensor:
    """Reference caption / retrieval training transform: bicubic short side -> size, random size crop, flip 0.5."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    new_w, new_h = short_side_size(img.width, img.height, size)
    img = img.resize((new_w, new_h), Image.BICUBIC)
    top = int(torch.randint(0, new_h - size + 1, (1,), generator=rng).item())
    left = int(torch.randint(0, new_w - size + 1, (1,), generator=rng).item())
    img = img.crop((left, top, left + size, top + size))
    if hflip and torch.rand(1, generator=rng).item() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return _normalise(pil_to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)


def image_pixels(path: str | Path, opts: VisionOptions, *, train: bool, rng: np.random.Generator,
                 span: tuple[int, int] | None = None) -> Tensor:
    """One image -> float [3, S, S] (train: the family's augmentation; eval: the reference transform).

    `span`: (offset, size) of a webdataset shard member (`load_image`)."""
    img = load_image(path, span)
    if not train:
        return image_eval_transform(img, opts.image_size, opts.eval_resize)
    gen = torch_generator(rng)
    if opts.train_style == "cls":
        return image_train_transform(img, opts.image_size, rng=gen, hflip=opts.hflip, scale=opts.crop_scale)[0]
    return pair_train_transform(img, opts.image_size, gen, hflip=opts.hflip)


# ------------------------------------------------------------------------------------------- video


def window_frames(num_available: int, fps: float, start: float | None, end: float | None) -> tuple[int, int]:
    """(first, last) frame indices (inclusive) of a sample's [start, end) window in seconds."""
    first = 0 if start is None else int(math.floor(float(start) * fps + 1e-6))
    last = num_available - 1 if end is None else int(math.ceil(float(end) * fps - 1e-6)) - 1
    last = min(last, num_available - 1)
    first = max(0, min(first, last))
    return first, max(first, last)


def train_frame_indices(first: int, last: int, fps: float, opts: VisionOptions, rng: np.random.Generator) -> list[int]:
    """One training clip's frames (reference `random_clip` for "stride"; jittered segments for "uniform")."""
    n = last - first + 1
    f = opts.frames
    if opts.sampling == "uniform":
        jitter = rng.random(f)
        return [first + min(n - 1, int((k + jitter[k]) * n / f)) for k in range(f)]
    rate = opts.stride * fps / opts.target_fps
    highest = n - int(rate * (f - 1) + 1)
    offset = int(rng.integers(0, highest)) if highest > 0 else 0
    return [first + (offset + int(i * rate)) % n for i in range(f)]


def eval_frame_indices(first: int, last: int, fps: float, opts: VisionOptions) -> list[list[int]]:
    """Frames of every temporal view at evaluation: [temporal_views][frames] (module docstring)."""
    n = last - first + 1
    f, tv = opts.frames, opts.temporal_views
    views = []
    for j in range(tv):
        if opts.sampling == "uniform":
            views.append([first + min(n - 1, int((k + (j + 0.5) / tv) * n / f)) for k in range(f)])
        else:
            interval = opts.stride // tv if tv > 1 else opts.stride
            views.append([first + int((tv * k + j) * interval * fps / opts.target_fps) % n for k in range(f)])
    return views


def video_pixels(
    path: str | Path,
    opts: VisionOptions,
    *,
    train: bool,
    rng: np.random.Generator,
    start: float | None = None,
    end: float | None = None,
) -> Tensor:
    """A clip -> train: float [F, 3, S, S]; eval: [temporal_views * spatial_views, F, 3, S, S].

    Eval views are ordered temporal-major (view = t * spatial_views + s).
    """
    info = probe_video(path)
    first, last = window_frames(info.num_frames, info.fps, start, end)
    if train:
        idx = train_frame_indices(first, last, info.fps, opts, rng)
        frames, _, _ = read_frames_at(path, idx)
        return video_train_transform(frames, opts.image_size, torch_generator(rng), hflip=opts.hflip)
    groups = eval_frame_indices(first, last, info.fps, opts)
    flat = [i for g in groups for i in g]
    frames, _, _ = read_frames_at(path, flat)
    out = []
    for t in range(len(groups)):
        clip = frames[t * opts.frames : (t + 1) * opts.frames]
        out.append(video_eval_views(clip, opts.image_size, opts.spatial_views))  # [S, F, 3, H, W]
    return torch.cat(out, dim=0)


# ------------------------------------------------------------------------------------------ samples


def sample_media_type(dataset: PreparedDataset, sample: dict) -> str:
    """"image" or "video": the sample's own media_type, else the dataset's."""
    kind = sample.get("media_type") or dataset.media_type
    if kind not in ("image", "video"):
        raise MediaError(dataset.root / "manifest", "bad_format", f"sample {sample.get('id')!r} has media_type {kind!r}; expected image or video")
    return kind


def load_visual(
    dataset: PreparedDataset, sample: dict, opts: VisionOptions, *, train: bool, rng: np.random.Generator
) -> Tensor:
    """Pixels of a manifest sample.

    image: [3, S, S]. video: train [F, 3, S, S]; eval [V, F, 3, S, S] (V = temporal x spatial views).
    Raises MediaError for unreadable media (callers count and skip).
    """
    path = dataset.media_path(sample)
    if sample_media_type(dataset, sample) == "image":
        return image_pixels(path, opts, train=train, rng=rng, span=member_span(sample))
    return video_pixels(path, opts, train=train, rng=rng, start=sample.get("start"), end=sample.get("end"))


def stack_pixels(items: list[dict], key: str = "pixels") -> Tensor:
    """Stack per-sample pixels into a batch; every sample must have the same shape."""
    shapes = {tuple(it[key].shape) for it in items}
    if len(shapes) != 1:
        raise ConfigError(f"cannot batch samples with different pixel shapes {sorted(shapes)}; mix of images and videos?")
    return torch.stack([it[key] for it in items])

