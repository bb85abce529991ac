"""The preparers: `PREPARERS` maps each dataset name to (module, variant), one row per dataset.

A dataset with a reader of its own has a module (`coco`, `msvd`, `vqav2`, ...) whose
`prepare(raw_root, out_dir, *, download, progress, options)` does the work; a family of datasets
sharing one reader (Karpathy-split captions, web image-text pairs, GLUE tasks, Kinetics sizes) is one module whose
`prepare(variant, raw_root, out_dir, ...)` takes the row's variant. Modules are imported only when
used, so `upctl prepare --help` stays fast.
"""

from __future__ import annotations

import importlib
from functools import partial
from typing import Callable

from uniperceiver.errors import UpctlError

_P = "uniperceiver.data.preparers"

#: dataset name -> (module under uniperceiver.data.preparers, variant for a family module or None)
PREPARERS: dict[str, tuple[str, str | None]] = {
    "mini": ("mini", None),
    # image classification
    "imagenet": ("imagenet", None),
    "imagenet21k": ("imagenet21k", None),
    # video classification
    "kinetics400": ("_kinetics", "kinetics400"),
    "kinetics700": ("_kinetics", "kinetics700"),
    "mit": ("mit", None),
    # captioning / retrieval
    "coco": ("_karpathy", "coco"),
    "flickr30k": ("_karpathy", "flickr30k"),
    "msvd": ("msvd", None),
    "msrvtt": ("msrvtt", None),
    # image-text pairs (pre-training)
    "cc3m": ("_pairs", "cc3m"),
    "cc12m": ("_pairs", "cc12m"),
    "sbu": ("_pairs", "sbu"),
    "yfcc": ("_pairs", "yfcc"),
    "vg": ("vg", None),
    # VQA
    "vqav2": ("vqav2", None),
    # text
    "bookswiki": ("bookswiki", None),
    "glue-cola": ("_glue", "cola"),
    "glue-sst2": ("_glue", "sst2"),
    "glue-mrpc": ("_glue", "mrpc"),
    "glue-qqp": ("_glue", "qqp"),
    "glue-stsb": ("_glue", "stsb"),
    "glue-mnli": ("_glue", "mnli"),
    "glue-qnli": ("_glue", "qnli"),
    "glue-rte": ("_glue", "rte"),
    "glue-wnli": ("_glue", "wnli"),
    # a user's own data (`--name NAME` names the prepared dataset and its task; see _own.py)
    "imagefolder": ("own_imagefolder", None),
    "captions": ("own_captions", None),
    "textcls": ("own_textcls", None),
}

#: The preparers of a user's own files: they need `--name`, and write `<data_dir>/NAME`.
OWN_DATA: tuple[str, ...] = ("imagefolder", "captions", "textcls")

PrepareFn = Callable[..., object]  # (raw_root, out_dir, *, download, progress, options) -> PrepareSummary


class UnknownDatasetError(UpctlError):
    """The dataset name has no preparer."""


def preparer_module(name: str) -> str:
    """The dotted path of the module that prepares `name`, or an error listing the known names."""
    try:
        module, _variant = PREPARERS[name]
    except KeyError:
        raise UnknownDatasetError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(PREPARERS))}") from None
    return f"{_P}.{module}"


def get_preparer(name: str) -> PrepareFn:
    """`prepare(raw_root, out_dir, *, download, progress, options)` of `name` (its module imported now)."""
    module = importlib.import_module(preparer_module(name))
    variant = PREPARERS[name][1]
    return module.prepare if variant is None else partial(module.prepare, variant)


__all__ = ["OWN_DATA", "PREPARERS", "PrepareFn", "UnknownDatasetError", "get_preparer", "preparer_module"]
