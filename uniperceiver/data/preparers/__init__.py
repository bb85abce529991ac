"""One preparer module per source dataset; `PREPARERS` maps the dataset name to its module path.

A plain dict (no registry machinery): adding a dataset is one module and one line here. Modules
are imported only when used, so `upctl prepare --help` stays fast.
"""

from __future__ import annotations

from uniperceiver.errors import UpctlError

_P = "uniperceiver.data.preparers"

PREPARERS: dict[str, str] = {
    "mini": f"{_P}.mini",
    # image classification
    "imagenet": f"{_P}.imagenet",
    "imagenet21k": f"{_P}.imagenet21k",
    # video classification
    "kinetics400": f"{_P}.kinetics400",
    "kinetics700": f"{_P}.kinetics700",
    "mit": f"{_P}.mit",
    # captioning / retrieval
    "coco": f"{_P}.coco",
    "flickr30k": f"{_P}.flickr30k",
    "msvd": f"{_P}.msvd",
    "msrvtt": f"{_P}.msrvtt",
    # image-text pairs (pre-training)
    "cc3m": f"{_P}.cc3m",
    "cc12m": f"{_P}.cc12m",
    "sbu": f"{_P}.sbu",
    "yfcc": f"{_P}.yfcc",
    "vg": f"{_P}.vg",
    # VQA
    "vqav2": f"{_P}.vqav2",
    # text
    "bookswiki": f"{_P}.bookswiki",
    "glue-cola": f"{_P}.glue_cola",
    "glue-sst2": f"{_P}.glue_sst2",
    "glue-mrpc": f"{_P}.glue_mrpc",
    "glue-qqp": f"{_P}.glue_qqp",
    "glue-stsb": f"{_P}.glue_stsb",
    "glue-mnli": f"{_P}.glue_mnli",
    "glue-qnli": f"{_P}.glue_qnli",
    "glue-rte": f"{_P}.glue_rte",
    "glue-wnli": f"{_P}.glue_wnli",
}


class UnknownDatasetError(UpctlError):
    """The dataset name has no preparer."""


def get_preparer(name: str) -> str:
    """The module path of `name`'s preparer, or an error listing the known dataset names."""
    try:
        return PREPARERS[name]
    except KeyError:
        raise UnknownDatasetError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(PREPARERS))}") from None
