"""SBU Captions image-text pairs (pre-training captioning / retrieval).

The official release is a URL list (SBU_captioned_photo_dataset_urls.txt + _captions.txt); fetch the images with img2dataset and point
--root at its output. Accepted layouts are described in `_pairs.py`:

    <root>/train/00000/000000012.jpg + 000000012.txt   (img2dataset --output_format files)
    <root>/train.tsv  with columns filepath<TAB>caption  (paths relative to the raw root)
    <root>/train.json [{"image": path, "caption": text}]

and the same for a "val" split when present.
"""

from uniperceiver.data.preparers._pairs import PAIRS_LAYOUT as LAYOUT
from uniperceiver.data.preparers._pairs import PAIRS_OPTIONS as OPTIONS
from uniperceiver.data.preparers._pairs import pair_preparer

DESCRIPTION = "SBU Captions image-text pairs (pre-training)"
prepare = pair_preparer("sbu")

__all__ = ["DESCRIPTION", "LAYOUT", "OPTIONS", "prepare"]
