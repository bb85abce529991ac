"""The built-in `mini` datasets: small, real, offline data from PyPI packages, for demos and tests.

`upctl prepare mini` writes SIX prepared datasets side by side under the data directory (one per
task shape, so every catalog task opens exactly one dataset):

| dataset          | media  | splits (train/val[/test]) | task shape                                   |
|------------------|--------|---------------------------|----------------------------------------------|
| `mini-digits`    | image  | 1,258 / 269 / 270         | 10-way classification; captions for retrieval |
| `mini-photos`    | image  | 16 / 8                    | image-text retrieval and captioning           |
| `mini-faces`     | image  | 100 / 100                 | "a face" vs "not a face" (held-out task)      |
| `mini-video`     | video  | 29 / 9 windows of 4 clips | 3-way video classification; video-text        |
| `mini-sentiment` | text   | 100 / 100                 | SST-2-style cloze, classes bad / wonderful    |
| `mini-news`      | text   | 2,438 / 246 sentences     | masked language modelling corpus              |

Sources (all shipped inside the packages of the `mini` extra, nothing is downloaded):
scikit-learn `load_digits()` (8x8 digits, written as 32x32 grayscale PNGs, dark ink on white) and
`load_sample_images()` (china.jpg, flower.jpg); scikit-image's bundled photos (copied byte for byte)
with captions written from their docstring titles, and `lfw_subset()` (25x25 faces / non-faces);
scikit-video's h264 clips (copied), cut into 1-second windows every 0.5 s, the last 30% of each
clip's time going to `val` so that train and val windows never overlap; gensim's
`pang_lee_polarity.cor` (Windows-1252 text: latin-1 plus 0x97 as an em dash) and
`lee_background.cor` (one news article per line, split into sentences).

Media go under the raw root (`--root`, default `<data_dir>/raw/mini`) and the manifests refer to
them relatively. Splits are seeded (`--option seed=N`, default 0) and stratified by class. Re-runs
write byte-identical manifests and leave unchanged media files untouched.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import io
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from PIL import Image

from uniperceiver.data.format import ManifestWriter, PrepareSummary, write_meta
from uniperceiver.data.media import load_image, probe_video
from uniperceiver.errors import ConfigError, UpctlError
from uniperceiver.utils.progress import Progress

SUBSETS = ("digits", "photos", "faces", "video", "sentiment", "news")
DIGIT_CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FACE_CLASSES = ["not a face", "a face"]
SENTIMENT_CLASSES = ["bad", "wonderful"]

# (file in skimage's data folder, skimage.data function whose docstring title is a caption or
# None when the title does not describe the picture, a caption written from looking at it)
SKIMAGE_PHOTOS: list[tuple[str, str | None, str]] = [
    ("astronaut.png", "astronaut", "the astronaut Eileen Collins in an orange flight suit"),
    ("brick.png", "brick", "a brick wall seen at an angle"),
    ("camera.png", None, "a man looking through a camera on a tripod"),
    ("chelsea.png", "chelsea", "a close-up of a tabby cat's face"),
    ("clock_motion.png", "clock", "a blurred wall clock"),
    ("coffee.png", "coffee", "a cup of coffee on a red saucer with a spoon"),
    ("coins.png", "coins", "rows of old coins on a dark background"),
    ("grass.png", "grass", "a close-up of grass"),
    ("gravel.png", "gravel", "a close-up of small stones"),
    ("horse.png", "horse", "a black horse drawn on white"),
    ("hubble_deep_field.jpg", "hubble_deep_field", "many distant galaxies in a dark sky"),
    ("ihc.png", "immunohistochemistry", "tissue stained brown and blue under a microscope"),
    ("logo.png", "logo", "the scikit-image logo with a snake"),
    ("microaneurysms.png", None, "a gray close-up of blood vessels in a retina"),
    ("moon.png", "moon", "craters on the surface of the moon"),
    ("page.png", None, "a scanned page of printed text"),
    ("retina.jpg", "retina", "a photo of the back of a human eye"),
    ("rocket.jpg", "rocket", "a rocket on a launch pad at night"),
    ("text.png", None, "handwritten equations on paper"),
    ("cell.png", "cell", "a bright round cell on a gray background"),
    ("color.png", "colorwheel", "a circular color wheel on black"),
    ("motorcycle_left.png", None, "a red motorcycle parked in a garage"),
]
SKLEARN_PHOTOS: list[tuple[str, str]] = [
    ("china.jpg", "a chinese pagoda above a lake"),
    ("flower.jpg", "an orange dahlia flower"),
]

# (skvideo file, class index, caption)
VIDEO_CLASSES = ["a cartoon rabbit", "a city street", "a man in a car"]
VIDEO_CLIPS: list[tuple[str, int, str]] = [
    ("bigbuckbunny.mp4", 0, "a big cartoon rabbit stretches on a grassy hill"),
    ("bikes.mp4", 1, "a man in a suit walks past cars and bicycles on a city street"),
    ("carphone_pristine.mp4", 2, "a man in a suit and bow tie talks in the back of a car"),
    ("carphone_distorted.mp4", 2, "a man in a suit and bow tie talks in the back of a car"),
]
VIDEO_WINDOW_S = 1.0
VIDEO_HOP_S = 0.5
VIDEO_VAL_FRACTION = 0.3

DESCRIPTION = "built-in real mini datasets from installed packages (no download): digits, photos, faces, video, sentiment, news"
LAYOUT = "nothing to download: media are written under the raw root (default <data-dir>/raw/mini)"
OPTIONS = {
    "seed": "seed of the stratified splits (default 0)",
    "only": "comma-separated subsets to build (default all): " + ",".join(SUBSETS),
}

_PIP_NAMES = {"sklearn": "scikit-learn", "skimage": "scikit-image", "skvideo": "scikit-video", "gensim": "gensim"}


def _need(module: str) -> Any:
    """Import an optional `mini` dependency or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = (getattr(exc, "name", None) or module).split(".")[0]
        pip_name = _PIP_NAMES.get(top, top)
        raise UpctlError(
            f"the mini datasets need the module {top!r} (pip package {pip_name}): "
            f"install the mini extra: pip install 'uniperceiver[mini]'"
        ) from None


def clean_title(doc: str | None) -> str:
    """A docstring's first line as a caption: no quotes, no 'image of', no trailing period."""
    line = (doc or "").strip().splitlines()[0].strip() if (doc or "").strip() else ""
    line = line.replace('"', "").rstrip(".").strip()
    line = re.sub(r",\s*an? RGBA image$", "", line)
    line = re.sub(r"^(Color image of|Gray-level)\s+", "", line)
    return re.sub(r"\s+image$", "", line)


def _write_if_changed(path: Path, data: bytes) -> None:
    """Atomic write that leaves an identical existing file untouched (idempotent re-runs)."""
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _copy_if_changed(src: Path, dst: Path) -> None:
    if not src.is_file():
        raise UpctlError(f"{src}: packaged file missing; reinstall the mini extra: pip install 'uniperceiver[mini]'")
    _write_if_changed(dst, src.read_bytes())


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _stratified_split(labels: Iterable[int], fractions: dict[str, float], seed: int) -> dict[str, list[int]]:
    """Indices per split; within each class a seeded permutation is cut by `fractions` (last split takes the rest)."""
    labels = np.asarray(list(labels))
    rng = np.random.default_rng(seed)
    names = list(fractions)
    out: dict[str, list[int]] = {n: [] for n in names}
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(len(idx))]
        start = 0
        for n in names[:-1]:
            k = int(round(fractions[n] * len(idx)))
            out[n].extend(int(i) for i in idx[start:start + k])
            start += k
        out[names[-1]].extend(int(i) for i in idx[start:])
    return {n: sorted(v) for n, v in out.items()}


class _Dataset:
    """Collects one prepared dataset: its splits' samples, then writes manifests and meta."""

    def __init__(self, name: str, media_type: str, source: str, tasks: list[str], targets: dict | None = None) -> None:
        self.name, self.media_type, self.source, self.tasks = name, media_type, source, tasks
        self.targets = targets or {}
        self.splits: dict[str, list[dict]] = {}

    def write(self, data_dir: Path, raw_root: Path, options: dict) -> list[ManifestWriter]:
        out = data_dir / self.name
        writers = []
        for split, samples in self.splits.items():
            with ManifestWriter(out, split) as w:
                for s in samples:
                    w.add(s)
            writers.append(w)
        write_meta(out, {
            "dataset": self.name,
            "source": self.source,
            "raw_root": str(raw_root),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "splits": {w.split: w.count for w in writers},
            "targets": self.targets,
            "options": options,
            "skipped": {w.split: dict(w.skipped) for w in writers if w.skipped},
            "media_type": self.media_type,
            "tasks": self.tasks,
        })
        for stale in out.glob("*.jsonl"):
            if stale.stem not in self.splits:
                stale.unlink()
        return writers


def _digits(raw: Path, seed: int) -> _Dataset:
    datasets = _need("sklearn.datasets")
    digits = datasets.load_digits()
    ds = _Dataset("mini-digits", "image", "sklearn.datasets.load_digits (UCI optical digits, 8x8)",
                  ["mini-digits", "mini-digits-retrieval", "mini-digits-caption"], {"classes": DIGIT_CLASSES})
    split_idx = _stratified_split(digits.target, {"train": 0.7, "val": 0.15, "test": 0.15}, seed)
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        ink = np.rint(np.asarray(img, dtype=np.float64) * 255.0 / 16.0).astype(np.uint8)
        big = np.kron(255 - ink, np.ones((4, 4), dtype=np.uint8))  # nearest upscale to 32x32
        _write_if_changed(raw / "digits" / f"{i:04d}.png", _png_bytes(big))
    for split, idx in split_idx.items():
        ds.splits[split] = [{
            "id": f"digit-{i:04d}", "media": f"digits/{i:04d}.png", "media_type": "image",
            "label": int(digits.target[i]), "texts": [f"a handwritten digit {DIGIT_CLASSES[int(digits.target[i])]}"],
        } for i in idx]
    return ds


def _photos(raw: Path, seed: int) -> _Dataset:
    skdata = _need("skimage.data")
    datasets = _need("sklearn.datasets")
    sk_dir = Path(skdata.__file__).parent
    items: list[tuple[str, list[str], str]] = []
    for fname, fn, caption in SKIMAGE_PHOTOS:
        texts = [caption]
        if fn is not None:
            title = clean_title(getattr(skdata, fn).__doc__)
            if title and title.lower() != caption.lower():
                texts.append(title)
        _copy_if_changed(sk_dir / fname, raw / "photos" / fname)
        items.append((fname, texts, "skimage"))
    sk_images = {Path(p).name: Path(p) for p in datasets.load_sample_images().filenames}
    for fname, caption in SKLEARN_PHOTOS:
        if fname not in sk_images:
            raise UpctlError(f"sklearn sample image {fname!r} not found; reinstall scikit-learn")
        _copy_if_changed(sk_images[fname], raw / "photos" / fname)
        items.append((fname, [caption], "sklearn"))
    order = np.random.default_rng(seed).permutation(len(items))
    n_val = len(items) // 3
    val = set(int(i) for i in order[:n_val])
    ds = _Dataset("mini-photos", "image", "scikit-image bundled photos (CC0) + sklearn load_sample_images (CC BY 2.0)",
                  ["mini-photos-retrieval", "mini-photos-caption"])
    for split in ("train", "val"):
        ds.splits[split] = [{
            "id": f"photo-{Path(f).stem}", "media": f"photos/{f}", "media_type": "image", "texts": texts,
            "source": src,
        } for i, (f, texts, src) in enumerate(items) if (i in val) == (split == "val")]
    return ds


def _faces(raw: Path, seed: int) -> _Dataset:
    skdata = _need("skimage.data")
    images = np.asarray(skdata.lfw_subset())  # first 100 faces, then 100 non-faces
    labels = [1] * 100 + [0] * (len(images) - 100)
    for i, img in enumerate(images):
        _write_if_changed(raw / "faces" / f"{i:03d}.png", _png_bytes(np.rint(np.clip(img, 0, 1) * 255).astype(np.uint8)))
    ds = _Dataset("mini-faces", "image", "skimage.data.lfw_subset (LFW crops, 25x25)", ["mini-faces"],
                  {"classes": FACE_CLASSES})
    for split, idx in _stratified_split(labels, {"train": 0.5, "val": 0.5}, seed).items():
        ds.splits[split] = [{"id": f"face-{i:03d}", "media": f"faces/{i:03d}.png", "media_type": "image",
                             "label": labels[i]} for i in idx]
    return ds


def _video(raw: Path, seed: int) -> _Dataset:
    skvideo_datasets = _need("skvideo.datasets")
    src_dir = Path(skvideo_datasets.__file__).parent / "data"
    ds = _Dataset("mini-video", "video", "scikit-video bundled clips (h264)", ["mini-video", "mini-video-retrieval"],
                  {"classes": VIDEO_CLASSES})
    ds.splits = {"train": [], "val": []}
    for fname, label, caption in VIDEO_CLIPS:
        dst = raw / "video" / fname
        _copy_if_changed(src_dir / fname, dst)
        duration = probe_video(dst).duration
        boundary = round(duration * (1.0 - VIDEO_VAL_FRACTION) / VIDEO_HOP_S) * VIDEO_HOP_S
        for split, lo, hi in (("train", 0.0, boundary), ("val", boundary, duration)):
            start = lo
            while start + VIDEO_WINDOW_S <= hi + 1e-9:
                ds.splits[split].append({
                    "id": f"{Path(fname).stem}-{int(round(start * 1000)):05d}", "media": f"video/{fname}",
                    "media_type": "video", "start": round(start, 3), "end": round(start + VIDEO_WINDOW_S, 3),
                    "label": label, "texts": [caption],
                })
                start += VIDEO_HOP_S
    return ds


def _read_polarity(path: Path) -> list[tuple[str, int]]:
    """`__label__pos|neg sentence` lines; the file is Windows-1252 (0x97 is an em dash)."""
    out = []
    for lineno, raw_line in enumerate(path.read_bytes().split(b"\n"), 1):
        if not raw_line.strip():
            continue
        try:
            line = raw_line.decode("cp1252")
        except UnicodeDecodeError:
            line = raw_line.decode("latin-1")
        tag, _, text = line.strip().partition(" ")
        if tag not in ("__label__neg", "__label__pos") or not text.strip():
            raise UpctlError(f"{path}:{lineno}: expected '__label__pos|__label__neg <sentence>', got {line[:60]!r}")
        out.append((text.strip(), 1 if tag == "__label__pos" else 0))
    return out


def _sentiment(raw: Path, seed: int) -> _Dataset:
    utils = _need("gensim.test.utils")
    src = Path(utils.datapath("pang_lee_polarity.cor"))
    rows = _read_polarity(src)
    ds = _Dataset("mini-sentiment", "text", "gensim test data pang_lee_polarity.cor (Pang & Lee sentence polarity)",
                  ["mini-sentiment"], {"classes": SENTIMENT_CLASSES})
    for split, idx in _stratified_split([r[1] for r in rows], {"train": 0.5, "val": 0.5}, seed).items():
        ds.splits[split] = [{"id": f"polarity-{i:03d}", "text": rows[i][0], "label": rows[i][1]} for i in idx]
    return ds


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"']?\s+(?=[\"'A-Z])")


def _news(raw: Path, seed: int) -> _Dataset:
    utils = _need("gensim.test.utils")
    src = Path(utils.datapath("lee_background.cor"))
    docs = [d.strip() for d in src.read_text(encoding="utf-8", errors="replace").splitlines() if d.strip()]
    n_val = max(1, len(docs) // 10)
    ds = _Dataset("mini-news", "text", "gensim test data lee_background.cor (Lee news corpus)", ["mini-mlm"])
    ds.splits = {"train": [], "val": []}
    for d, doc in enumerate(docs):
        split = "val" if d >= len(docs) - n_val else "train"
        for s, sent in enumerate(_SENTENCE_END.split(doc)):
            sent = " ".join(sent.split())
            if len(sent.split()) >= 3:
                ds.splits[split].append({"id": f"lee-{d:03d}-{s:03d}", "text": sent})
    return ds


_BUILDERS: dict[str, Callable[[Path, int], _Dataset]] = {
    "digits": _digits, "photos": _photos, "faces": _faces, "video": _video, "sentiment": _sentiment, "news": _news,
}


def _parse_options(options: dict) -> tuple[int, list[str]]:
    from uniperceiver.data.preparers._common import Options

    opts = Options("mini", options, OPTIONS)
    seed = opts.int("seed", 0, minimum=0)
    only = opts.str("only")
    if only is None:
        return seed, list(SUBSETS)
    chosen = [s.strip().removeprefix("mini-") for s in only.split(",") if s.strip()]
    bad = [s for s in chosen if s not in SUBSETS]
    if bad or not chosen:
        raise ConfigError(f"option only={only!r} for mini: unknown subset(s) {bad}; expected some of {', '.join(SUBSETS)}")
    return seed, [s for s in SUBSETS if s in chosen]


def prepare(raw_root: Path | None, out_dir: Path, *, download: bool = False, progress: Progress | None = None,
            options: dict | None = None) -> PrepareSummary:
    """Write the mini datasets as siblings of `out_dir` (`<data_dir>/mini-*`), media under `raw_root`.

    `download` is accepted and ignored: everything comes from installed packages. The summary's
    `splits` maps "mini-<subset>/<split>" to its sample count.
    """
    options = dict(options or {})
    seed, subsets = _parse_options(options)
    data_dir = Path(out_dir).absolute().parent
    raw = Path(raw_root).absolute() if raw_root is not None else data_dir / "raw" / "mini"
    summary = PrepareSummary(dataset="mini", out_dir=str(data_dir),
                             source="scikit-learn, scikit-image, scikit-video and gensim package data")
    for k, name in enumerate(subsets):
        if progress is not None:
            progress(k, len(subsets), f"mini-{name}")
        ds = _BUILDERS[name](raw, seed)
        for w in ds.write(data_dir, raw, {"seed": seed}):
            summary.splits[f"{ds.name}/{w.split}"] = w.count
            if w.skipped:
                summary.skipped[f"{ds.name}/{w.split}"] = dict(w.skipped)
    if progress is not None:
        progress(len(subsets), len(subsets), "mini")
    return summary


def verify_media(data_dir: Path, names: Iterable[str] | None = None) -> dict[str, int]:
    """Decode every image (load_image) and probe every video of the mini datasets; counts per dataset."""
    from uniperceiver.data.format import open_dataset

    counts: dict[str, int] = {}
    for name in names or [f"mini-{s}" for s in SUBSETS]:
        ds = open_dataset(name, data_dir)
        seen: set[Path] = set()
        for split in ds.splits:
            for sample in ds.samples(split):
                if "media" not in sample:
                    continue
                path = ds.media_path(sample)
                if path in seen:
                    continue
                seen.add(path)
                (load_image if sample["media_type"] == "image" else probe_video)(path)
        counts[name] = len(seen)
    return counts


__all__ = ["prepare", "verify_media", "clean_title", "DESCRIPTION", "LAYOUT", "OPTIONS", "SUBSETS",
           "DIGIT_CLASSES", "FACE_CLASSES", "SENTIMENT_CLASSES", "VIDEO_CLASSES"]
