"""Image and video preprocessing into the model's normalised tensors.

The evaluation transforms reproduce the reference exactly (see reference-conventions.md, "Image
and video transforms"), because published zero-shot numbers depend on the exact pixels:
- images: PIL bicubic resize of the shorter side (to 256 for ImageNet classification, to 224 for
  captioning/retrieval/VQA), center crop with offset `int(round((s - size) / 2))` (Python's round,
  i.e. half to even), /255, ImageNet mean/std;
- video: torch bilinear interpolation (align_corners=False, no antialias) of the short side to
  `size`, long side `floor(long / short * size)`, crops along the long side at offsets 0,
  `ceil((L - size) / 2)` and `L - size`, mean 0.5, std 0.5.
Training transforms are the usual random-resized-crop / random-scale-crop plus horizontal flip,
drawn from an explicit `torch.Generator` so that a seed fixes every augmentation.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
VIDEO_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
VIDEO_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)


def _normalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """x: float [..., 3, H, W] in 0..1."""
    m = torch.tensor(mean, dtype=x.dtype).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(3, 1, 1)
    return (x - m) / s


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float [3, H, W] in 0..1 (like torchvision's ToTensor)."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def short_side_size(width: int, height: int, short: int) -> tuple[int, int]:
    """(new_width, new_height) with the shorter side `short` and the long side `int(short * long / short_side)`."""
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """PIL crop box (left, top, right, bottom) of the reference center crop."""
    if width < size or height < size:
        raise ValueError(f"cannot center-crop {size} px from a {width}x{height} image")
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return left, top, left + size, top + size


def image_eval_transform(
    img: Image.Image,
    size: int = 224,
    resize_to: int | None = None,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Reference eval preprocessing of one RGB image -> float [3, size, size].

    `resize_to` is the shorter-side size before the crop: 256 for ImageNet-style classification,
    224 (= `size`, the default) for captioning, retrieval and VQA.
    """
    resize_to = size if resize_to is None else resize_to
    if resize_to < size:
        raise ValueError(f"resize_to ({resize_to}) must be >= the crop size ({size})")
    if img.mode != "RGB":
        img = img.convert("RGB")
    new_w, new_h = short_side_size(img.width, img.height, resize_to)
    resized = img.resize((new_w, new_h), Image.BICUBIC)
    cropped = resized.crop(center_crop_box(new_w, new_h, size))
    return _normalise(pil_to_tensor(cropped), mean, std)


def _uniform(rng: torch.Generator, low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=rng).item())


def _randint(rng: torch.Generator, low: int, high_inclusive: int) -> int:
    return int(torch.randint(low, high_inclusive + 1, (1,), generator=rng).item())


def random_resized_crop_box(
    width: int,
    height: int,
    rng: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box rule (10 tries, then a ratio-clamped center crop)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(rng, scale[0], scale[1])
        aspect = math.exp(_uniform(rng, log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = _randint(rng, 0, height - h)
            left = _randint(rng, 0, width - w)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def image_train_transform(
    img: Image.Image,
    size: int = 224,
    *,
    rng: torch.Generator,
    hflip: bool = True,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> tuple[torch.Tensor, bool]:
    """Random resized crop (bicubic) + optional horizontal flip -> (float [3, size, size], flipped).

    `flipped` is returned so that VQA can swap "left" and "right" in the question.
    """
    if img.mode != "RGB":
        img = img.convert("RGB")
    box = random_resized_crop_box(img.width, img.height, rng, scale, ratio)
    out = img.crop(box).resize((size, size), Image.BICUBIC)
    flipped = bool(hflip and torch.rand(1, generator=rng).item() < 0.5)
    if flipped:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return _normalise(pil_to_tensor(out), mean, std), flipped


def _frames_to_float(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [T, 3, H, W] in 0..1."""
    t = torch.as_tensor(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    if t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"expected video frames shaped [T, H, W, 3], got {tuple(t.shape)}")
    return t.permute(0, 3, 1, 2).float().div_(255.0)


def _video_resize_short(x: torch.Tensor, short: int) -> torch.Tensor:
    """Bilinear (align_corners=False, no antialias) short side -> `short`, long side floor(long/short*short)."""
    h, w = x.shape[-2:]
    if h <= w:
        new_h, new_w = short, int(math.floor(w / h * short))
    else:
        new_h, new_w = int(math.floor(h / w * short)), short
    return F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=False)


def video_crop_offsets(long_side: int, size: int, views: int) -> list[int]:
    """Offsets of `views` crops along the long side; for 3 views: 0, ceil((L - size) / 2), L - size."""
    if views < 1:
        raise ValueError(f"spatial_views must be >= 1, got {views}")
    span = long_side - size
    if views == 1:
        return [int(math.ceil(span / 2))]
    return [int(math.ceil(i * span / (views - 1))) for i in range(views)]


def video_eval_views(
    frames: np.ndarray | torch.Tensor,
    size: int = 224,
    spatial_views: int = 3,
    *,
    mean: Sequence[float] = VIDEO_MEAN,
    std: Sequence[float] = VIDEO_STD,
) -> torch.Tensor:
    """Reference video eval preprocessing: uint8 [T, H, W, 3] -> float [V, T, 3, size, size]."""
    x = _video_resize_short(_frames_to_float(frames), size)
    h, w = x.shape[-2:]
    views = []
    for off in video_crop_offsets(max(h, w), size, spatial_views):
        crop = x[..., :, off:off + size] if w >= h else x[..., off:off + size, :]
        views.append(_normalise(crop, mean, std))
    return torch.stack(views)


def video_train_transform(
    frames: np.ndarray | torch.Tensor,
    size: int,
    rng: torch.Generator,
    *,
    short_side_range: tuple[int, int] | None = None,
    hflip: bool = True,
    mean: Sequence[float] = VIDEO_MEAN,
    std: Sequence[float] = VIDEO_STD,
) -> torch.Tensor:
    """Random short-side scale, random `size` crop, horizontal flip -> float [T, 3, size, size].

    The same scale, crop and flip apply to every frame of the clip. The default scale range is
    `[size * 8/7, size * 10/7]`, i.e. 256..320 for 224 (the common Kinetics recipe).
    """
    lo, hi = short_side_range or (size * 8 // 7, size * 10 // 7)
    if lo < size or hi < lo:
        raise ValueError(f"short_side_range {lo}..{hi} must satisfy size ({size}) <= low <= high")
    x = _video_resize_short(_frames_to_float(frames), _randint(rng, lo, hi))
    h, w = x.shape[-2:]
    top, left = _randint(rng, 0, h - size), _randint(rng, 0, w - size)
    x = x[..., top:top + size, left:left + size]
    if hflip and torch.rand(1, generator=rng).item() < 0.5:
        x = x.flip(-1)
    return _normalise(x.contiguous(), mean, std)
