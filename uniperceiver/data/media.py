"""Decoding of images (Pillow) and video (PyAV) into RGB arrays, with every failure as a MediaError.

Why this module exists: loaders must never crash on one bad file, and video must never be decoded
whole. Images come out as RGB PIL images with EXIF orientation applied; videos come out as
`uint8 [T, H, W, 3]` arrays holding only the frames a sampling rule asks for, decoded by seeking to
the key frame before each wanted frame and decoding forward from there.

Conventions:
- Transparency (RGBA, LA, PA, palette with a transparent colour) is composited on WHITE, as a
  viewer would show it; simply dropping alpha would expose whatever colour the encoder left under
  transparent pixels (often black).
- 16-bit grayscale ("I;16", "I") is scaled to 8 bits by dividing by 257; float ("F") images are
  clipped to 0..255.
- Video frame k is the k-th frame in presentation (decode output) order. Frames are located by
  their timestamps, `start_time + k / fps`, which is exact for constant-frame-rate files (all the
  datasets this project reads); for variable-frame-rate files it picks the frame shown at that time.
- Rotation metadata (a display matrix, or an old-style `rotate` tag) is honoured with `np.rot90`;
  flips inside a display matrix are ignored (they do not occur in camera files).
"""

from __future__ import annotations

import bisect
import io
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from uniperceiver.data.shards import read_member
from uniperceiver.errors import MediaError

MAX_SAMPLED_FRAMES = 1024
"""More frames than this in one request is a bug in the caller, not a sampling rule."""

MAX_VIDEO_SIDE = 16384
MAX_VIDEO_PIXELS = 8192 * 8192
"""A container claiming larger frames is treated as corrupt: we refuse before allocating."""

MAX_OUTPUT_BYTES = 2 * 1024**3
"""Upper bound of one returned frame array (frames x height x width x 3)."""

SampleMode = Literal["uniform", "stride"]


# --------------------------------------------------------------------------------------- images


def _check_file(path: Path) -> None:
    """Missing and zero-byte files get their own kinds so that loaders can count them apart."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise MediaError(path, "missing", "no such file") from None
    except OSError as exc:
        raise MediaError(path, "unreadable", str(exc)) from None
    if not path.is_file():
        raise MediaError(path, "bad_format", "not a regular file")
    if size == 0:
        raise MediaError(path, "empty", "zero bytes")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB, compositing transparency on white (see module docstring)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        if arr.max(initial=0) > 255:
            arr = arr / 257.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        arr = np.clip(np.rint(np.asarray(img, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L", "RGB") and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | os.PathLike[str], span: tuple[int, int] | None = None) -> Image.Image:
    """Read an image file as an RGB PIL image with its EXIF orientation applied.

    `span` = (offset, size): the image is a member of a webdataset tar shard and `path` its
    reference "<shard>.tar#<member>" (data/shards.py); those bytes are read and decoded alike.

    Raises MediaError: "missing" / "empty" for absent or zero-byte files, "bad_format" for files
    Pillow does not recognise or that exceed Pillow's decompression-bomb limit
    (`Image.MAX_IMAGE_PIXELS`), "unreadable" for truncated or corrupt image data.
    """
    p = Path(path)
    source: Path | io.BytesIO = p
    if span is None:
        _check_file(p)
    else:
        source = io.BytesIO(read_member(p, *span))
    try:
        with Image.open(source) as img:
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and img.width * img.height > limit:
                raise MediaError(p, "bad_format", f"{img.width}x{img.height} pixels exceeds the limit of {limit}")
            img.load()
            try:
                oriented = ImageOps.exif_transpose(img)
            except Exception:  # noqa: BLE001 - a malformed EXIF block must not lose a valid image
                oriented = img
            rgb = _to_rgb(oriented if oriented is not None else img)
            if rgb is img:  # detach from the file handle closed by the `with`
                rgb = img.copy()
            return rgb
    except MediaError:
        raise
    except Image.DecompressionBombError as exc:
        raise MediaError(p, "bad_format", f"decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise MediaError(p, "bad_format", "not an image Pillow can identify") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise MediaError(p, "unreadable", str(exc) or type(exc).__name__) from None


# ---------------------------------------------------------------------------------------- video


@dataclass(frozen=True)
class VideoInfo:
    """What a container says about its first video stream.

    `width`/`height` are the coded size; `rotation` is the counter-clockwise angle (0, 90, 180,
    270) the frames must be turned by for display, so displayed frames are `height x width` when
    rotation is 90 or 270.
    """

    num_frames: int
    fps: float
    duration: float
    width: int
    height: int
    rotation: int

    @property
    def display_size(self) -> tuple[int, int]:
        """(width, height) after rotation."""
        return (self.height, self.width) if self.rotation in (90, 270) else (self.width, self.height)


def _open_container(path: Path):  # -> av.container.InputContainer
    import av

    _check_file(path)
    try:
        container = av.open(str(path), mode="r")
    except av.error.InvalidDataError as exc:
        raise MediaError(path, "unreadable", f"invalid container data: {exc}") from None
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise MediaError(path, "unreadable", str(exc)) from None
    if not container.streams.video:
        container.close()
        raise MediaError(path, "bad_format", "no video stream")
    return container


def _normalise_rotation(angle: float) -> int:
    return int(round(angle / 90.0)) % 4 * 90


def _stream_facts(path: Path, container, stream) -> tuple[float, int, float, int, int, int]:
    """(fps, num_frames, duration, width, height, start_pts) with sanity checks."""
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    if not (0.0 < fps < 10000.0):
        raise MediaError(path, "bad_format", f"unusable frame rate {rate!r}")
    width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
    if width <= 0 or height <= 0:
        raise MediaError(path, "bad_format", f"frame size {width}x{height}")
    if width > MAX_VIDEO_SIDE or height > MAX_VIDEO_SIDE or width * height > MAX_VIDEO_PIXELS:
        raise MediaError(path, "bad_format", f"claims {width}x{height} frames, beyond the {MAX_VIDEO_SIDE} px limit")
    tb = stream.time_base
    if stream.duration is not None and tb:
        duration = float(stream.duration * tb)
    elif container.duration is not None:
        duration = container.duration / 1_000_000.0
    else:
        duration = 0.0
    num_frames = int(stream.frames or 0)
    if num_frames <= 0:
        num_frames = int(round(duration * fps))
    if num_frames <= 0:
        raise MediaError(path, "bad_format", "the container reports neither a frame count nor a duration")
    if duration <= 0:
        duration = num_frames / fps
    start_pts = int(stream.start_time or 0)
    return fps, num_frames, duration, width, height, start_pts


def _tag_rotation(stream) -> int | None:
    tag = stream.metadata.get("rotate") if stream.metadata else None
    if tag is None:
        return None
    try:
        # The legacy tag is a CLOCKWISE angle; we store counter-clockwise.
        return _normalise_rotation(-float(tag))
    except ValueError:
        return None


def probe_video(path: str | os.PathLike[str]) -> VideoInfo:
    """Read frame count, rate, duration, size and rotation (decodes at most one frame)."""
    p = Path(path)
    container = _open_container(p)
    try:
        stream = container.streams.video[0]
        fps, num_frames, duration, width, height, _ = _stream_facts(p, container, stream)
        rotation = _tag_rotation(stream)
        if rotation is None:
            rotation = 0
            try:
                for frame in container.decode(stream):
                    rotation = _normalise_rotation(frame.rotation)
                    break
            except Exception as exc:  # noqa: BLE001 - any decoder failure is a corrupt file
                raise MediaError(p, "unreadable", f"cannot decode a frame: {exc}") from None
        return VideoInfo(num_frames, fps, duration, width, height, rotation)
    finally:
        container.close()


def choose_frame_indices(
    num_available: int,
    num_frames: int,
    *,
    fps: float,
    mode: SampleMode = "uniform",
    stride: int | None = None,
    target_fps: float = 30.0,
    first: int = 0,
    last: int | None = None,
) -> list[int]:
    """Frame indices (into the whole clip) for one sample, always exactly `num_frames` of them.

    The window is frames `first .. last` inclusive. "uniform": the centre frame of each of
    `num_frames` equal segments of the window. "stride": the reference eval rule, frame
    `first + int(k * stride * fps / target_fps)`. Indices past the window repeat its last frame,
    so short clips still give `num_frames` frames.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    last = num_available - 1 if last is None else min(last, num_available - 1)
    first = max(0, min(first, last))
    span = last - first + 1
    if mode == "uniform":
        return [first + min(span - 1, int((k + 0.5) * span / num_frames)) for k in range(num_frames)]
    if mode == "stride":
        if stride is None or stride < 1:
            raise ValueError(f"mode 'stride' needs stride >= 1, got {stride!r}")
        return [min(last, first + int(k * stride * fps / target_fps)) for k in range(num_frames)]
    raise ValueError(f"unknown sampling mode {mode!r}; expected 'uniform' or 'stride'")


def _output_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """Decode size (coded orientation) so that the longer side is at most `max_side`."""
    if max_side is None or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, int(round(width * scale))), max(1, int(round(height * scale)))


class _SeekingReader:
    """Decodes requested frame indices of one stream, seeking only when a new key frame is nearer.

    `decoded` counts the frames the decoder produced, so tests can check that sampling a few
    frames does not decode the whole file.
    """

    def __init__(self, path: Path, container, stream, fps: float, start_pts: int) -> None:
        self.path = path
        self.container = container
        self.stream = stream
        self.fps = fps
        self.start_pts = start_pts
        self.tb = stream.time_base or Fraction(1, 1_000_000)
        self.ticks_per_frame = 1.0 / (fps * float(self.tb))
        self.decoded = 0
        self.rotation: int | None = None
        self._keyframes: list[int] | None = None  # read lazily: long files have large indexes
        self._iter = None
        self._last_pts: int | None = None

    def _target_pts(self, index: int) -> int:
        return self.start_pts + int(round(index * self.ticks_per_frame))

    @property
    def keyframes(self) -> list[int]:
        """Key-frame decode timestamps; a seek lands on the last key frame at or before its target."""
        if self._keyframes is None:
            entries = self.stream.index_entries
            self._keyframes = sorted(e.timestamp for e in entries if e.is_keyframe) if entries else []
        return self._keyframes

    def _should_seek(self, target: int) -> bool:
        """Seek when going backwards or when a key frame lies between the decoder and the target."""
        if self._iter is None or self._last_pts is None or target <= self._last_pts:
            return True
        if self.keyframes:
            return bisect.bisect_right(self.keyframes, target) != bisect.bisect_right(self.keyframes, self._last_pts)
        return target - self._last_pts > 30 * self.ticks_per_frame

    def _seek(self, pts: int) -> None:
        self.container.seek(max(pts, self.start_pts), stream=self.stream, backward=True, any_frame=False)
        self._iter = self.container.decode(self.stream)
        self._last_pts = None

    def _next(self):
        try:
            frame = next(self._iter)
        except StopIteration:
            return None
        except Exception as exc:  # noqa: BLE001 - decoder errors mean a corrupt stream
            raise MediaError(self.path, "unreadable", f"decoding failed: {exc}") from None
        self.decoded += 1
        if frame.pts is not None:
            self._last_pts = int(frame.pts)
        if self.rotation is None:
            self.rotation = _normalise_rotation(frame.rotation)
        return frame

    def read(self, index: int):
        """The decoded frame for `index`, or the last frame of the stream if it ends first."""
        target = self._target_pts(index)
        half = self.ticks_per_frame / 2.0
        seek_to = target
        for _attempt in range(8):
            if self._should_seek(target):
                self._seek(seek_to)
                first = self._next()
                if first is None:
                    return None
                if first.pts is not None and first.pts > target + half and seek_to > self.start_pts:
                    # Landed after the target (the key frame's decode time precedes its
                    # presentation time): step back a second and try again.
                    seek_to = int(seek_to - max(self.fps, 1.0) * self.ticks_per_frame)
                    self._iter = None
                    continue
                prev = first
            else:
                prev = None
            break
        else:
            raise MediaError(self.path, "unreadable", f"cannot seek to frame {index}")
        frame = prev
        while frame is None or frame.pts is None or frame.pts < target - half:
            nxt = self._next()
            if nxt is None:
                return frame
            frame = nxt
        return frame


def sample_video_frames_with_times(
    path: str | os.PathLike[str],
    num_frames: int,
    *,
    mode: SampleMode = "uniform",
    stride: int | None = None,
    target_fps: float = 30.0,
    start: float | None = None,
    end: float | None = None,
    max_side: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Like `sample_video_frames`, also returning each frame's presentation time in seconds."""
    frames, times, _ = _sample(path, num_frames, mode=mode, stride=stride, target_fps=target_fps,
                               start=start, end=end, max_side=max_side)
    return frames, times


def sample_video_frames(
    path: str | os.PathLike[str],
    num_frames: int,
    *,
    mode: SampleMode = "uniform",
    stride: int | None = None,
    target_fps: float = 30.0,
    start: float | None = None,
    end: float | None = None,
    max_side: int | None = None,
) -> np.ndarray:
    """Decode exactly `num_frames` frames of a video as `uint8 [num_frames, H, W, 3]` (RGB).

    `start`/`end` (seconds) restrict sampling to a window; `mode` picks the rule (see
    `choose_frame_indices`); `max_side` shrinks frames at decode time. Rotation metadata is
    applied, so H x W is the display size. Raises MediaError for missing, empty, corrupt or
    absurdly sized files and for requests of more than 1,024 frames.
    """
    frames, _, _ = _sample(path, num_frames, mode=mode, stride=stride, target_fps=target_fps,
                           start=start, end=end, max_side=max_side)
    return frames


def _sample(
    path: str | os.PathLike[str],
    num_frames: int,
    *,
    mode: SampleMode,
    stride: int | None,
    target_fps: float,
    start: float | None,
    end: float | None,
    max_side: int | None,
) -> tuple[np.ndarray, np.ndarray, int]:
    p = Path(path)
    if not 1 <= num_frames <= MAX_SAMPLED_FRAMES:
        raise MediaError(p, "bad_format", f"asked for {num_frames} frames; expected 1..{MAX_SAMPLED_FRAMES}")
    if mode == "stride" and (stride is None or stride < 1):
        raise MediaError(p, "bad_format", f"stride sampling needs stride >= 1, got {stride!r}")
    if mode not in ("uniform", "stride"):
        raise MediaError(p, "bad_format", f"unknown sampling mode {mode!r}; expected 'uniform' or 'stride'")
    if max_side is not None and max_side < 1:
        raise MediaError(p, "bad_format", f"max_side must be >= 1, got {max_side}")
    container = _open_container(p)
    try:
        stream = container.streams.video[0]
        fps, available, duration, width, height, start_pts = _stream_facts(p, container, stream)
        out_w, out_h = _output_size(width, height, max_side)
        if num_frames * out_w * out_h * 3 > MAX_OUTPUT_BYTES:
            raise MediaError(p, "bad_format", f"{num_frames} frames of {out_w}x{out_h} exceed {MAX_OUTPUT_BYTES} bytes")
        t0 = 0.0 if start is None else float(start)
        t1 = duration if end is None else float(end)
        if t0 >= duration + 1.0 / fps:
            raise MediaError(p, "bad_format", f"window start {t0:.3f}s is past the clip end {duration:.3f}s")
        if t0 < 0 or t1 <= t0 or not math.isfinite(t0) or not math.isfinite(t1):
            raise MediaError(p, "bad_format", f"window start={start} end={end} is not a valid interval")
        first = int(math.floor(t0 * fps + 1e-6))
        last = int(math.ceil(t1 * fps - 1e-6)) - 1
        indices = choose_frame_indices(available, num_frames, fps=fps, mode=mode, stride=stride,
                                       target_fps=target_fps, first=first, last=max(first, last))
        return _decode_indices(p, container, stream, indices, fps, start_pts, width, height, out_w, out_h)
    except MediaError:
        raise
    except Exception as exc:  # noqa: BLE001 - PyAV raises many types for corrupt data
        raise MediaError(p, "unreadable", f"{type(exc).__name__}: {exc}") from None
    finally:
        container.close()


def _decode_indices(
    p: Path, container, stream, indices: Sequence[int], fps: float, start_pts: int,
    width: int, height: int, out_w: int, out_h: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Decode `indices` (any order, repeats allowed) in one forward pass with seeks; rotate for display."""
    stream.thread_type = "AUTO"
    reader = _SeekingReader(p, container, stream, fps, start_pts)
    decoded: dict[int, tuple[np.ndarray, float]] = {}
    for idx in sorted(set(indices)):
        frame = reader.read(idx)
        if frame is None:
            if not decoded:
                raise MediaError(p, "unreadable", f"no frame could be decoded at or after frame {idx}")
            # The stream ended early (a container over-counting frames): repeat the last one.
            decoded[idx] = decoded[max(decoded)]
            continue
        if (out_w, out_h) != (width, height):
            arr = frame.to_ndarray(format="rgb24", width=out_w, height=out_h)
        else:
            arr = frame.to_ndarray(format="rgb24")
        tsec = float((frame.pts - start_pts) * reader.tb) if frame.pts is not None else idx / fps
        decoded[idx] = (arr, tsec)
    rotation = _tag_rotation(stream)
    if rotation is None:
        rotation = reader.rotation or 0
    stack = np.stack([decoded[i][0] for i in indices])
    if rotation:
        stack = np.rot90(stack, k=rotation // 90, axes=(1, 2))
    times = np.asarray([decoded[i][1] for i in indices], dtype=np.float64)
    return np.ascontiguousarray(stack), times, reader.decoded


def read_frames_at(
    path: str | os.PathLike[str], indices: Sequence[int], *, max_side: int | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """Decode the given frame indices -> (uint8 [len, H, W, 3], times in seconds, frames decoded).

    Indices past the end are clamped to the last frame. The third value counts the frames the
    decoder produced (seeking keeps it far below a full decode on files with several key frames).
    """
    p = Path(path)
    if not 1 <= len(indices) <= MAX_SAMPLED_FRAMES:
        raise MediaError(p, "bad_format", f"asked for {len(indices)} frames; expected 1..{MAX_SAMPLED_FRAMES}")
    if any(int(i) < 0 for i in indices):
        raise MediaError(p, "bad_format", f"negative frame index in {list(indices)[:10]}")
    container = _open_container(p)
    try:
        stream = container.streams.video[0]
        fps, available, _, width, height, start_pts = _stream_facts(p, container, stream)
        out_w, out_h = _output_size(width, height, max_side)
        if len(indices) * out_w * out_h * 3 > MAX_OUTPUT_BYTES:
            raise MediaError(p, "bad_format", f"{len(indices)} frames of {out_w}x{out_h} exceed {MAX_OUTPUT_BYTES} bytes")
        clamped = [min(int(i), available - 1) for i in indices]
        return _decode_indices(p, container, stream, clamped, fps, start_pts, width, height, out_w, out_h)
    except MediaError:
        raise
    except Exception as exc:  # noqa: BLE001 - PyAV raises many types for corrupt data
        raise MediaError(p, "unreadable", f"{type(exc).__name__}: {exc}") from None
    finally:
        container.close()
