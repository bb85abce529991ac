"""ImageNet class lists and the names the reference classifies against.

- The 1,000 ImageNet-1k WordNet ids, sorted, come from timm (`timm.data.ImageNetInfo`), so a
  partial layout (a subset of the class folders) still maps every folder to its own name.
- ImageNet-1k names are imagenet-simple-labels as revised by CLIP, vendored beside this module
  (imagenet_simple_labels.json + LICENSE-imagenet-simple-labels): the list the reference
  tokenizes for zero-shot and prompt tuning (fundamentalvision/Uni-Perceiver,
  tools/generate_target_sets.ipynb, cell "ImageNet 1k class names").
- ImageNet-21k: "the ImageNet 1k class names as the first 1000 categories, and the WordNet
  synonyms for the remaining categories" (the same notebook, cell "ImageNet 22k class names"):
  the 1k classes come first in 1k order, then the others in sorted-wnid order -- the layout of
  timm's imagenet-22k-ms synset list, whose first 1,000 entries are the 1k list.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

from uniperceiver.errors import DataError

_NAMES_FILE = "imagenet_simple_labels.json"


@lru_cache(maxsize=1)
def imagenet1k_wnids() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k WordNet ids in class order (sorted), from timm's synset list."""
    from timm.data import ImageNetInfo  # imported here: timm takes seconds to import

    wnids = tuple(ImageNetInfo("imagenet-1k").label_names())
    if len(wnids) != 1000 or list(wnids) != sorted(wnids):
        raise DataError(f"timm's ImageNet-1k synset list has {len(wnids)} ids (expected 1000, sorted); "
                        "reinstall timm")
    return wnids


@lru_cache(maxsize=1)
def simple_labels() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k names, index = class index."""
    text = resources.files("uniperceiver.data").joinpath(_NAMES_FILE).read_text(encoding="utf-8")
    names = json.loads(text)
    if not isinstance(names, list) or len(names) != 1000:
        raise DataError(f"uniperceiver/data/{_NAMES_FILE}: expected a JSON list of 1000 names; reinstall the package")
    return tuple(str(n) for n in names)


def imagenet1k_names() -> dict[str, str]:
    """wnid -> the reference's ImageNet-1k class name."""
    return dict(zip(imagenet1k_wnids(), simple_labels()))


@lru_cache(maxsize=1)
def _lemmas() -> dict[str, str]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-22k")
    return {w: info.label_name_to_description(w) for w in info.label_names()}


def wordnet_synonyms(wnid: str) -> list[str] | None:
    """WordNet's lemmas of `wnid` ("tabby, tabby cat" -> ["tabby", "tabby cat"]) from timm's
    ImageNet-22k list; None for an id it does not know."""
    lemma = _lemmas().get(wnid)
    return [s.strip() for s in lemma.split(",") if s.strip()] if lemma else None


def imagenet21k_order(wnids: list[str]) -> list[str]:
    """`wnids` in the reference's 21k class order: the ImageNet-1k ones first (1k order), then the rest sorted."""
    k1 = {w: i for i, w in enumerate(imagenet1k_wnids())}
    return sorted((w for w in wnids if w in k1), key=k1.__getitem__) + sorted(w for w in wnids if w not in k1)


__all__ = ["imagenet1k_names", "imagenet1k_wnids", "imagenet21k_order", "simple_labels", "wordnet_synonyms"]
