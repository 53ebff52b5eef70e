"""Dataset registry: a dataset name and root become a :class:`tool.datasets.DatasetInfo`.

It sits above ``voc12/`` and ``coco14/``, each of which builds its own ``DatasetInfo``; the
scripts pick a dataset by name here.
"""
from __future__ import annotations

from coco14 import layout as coco_layout
from tool.datasets import DatasetInfo
from voc12 import layout as voc_layout

DATASET_NAMES: tuple[str, ...] = ("voc12", "coco14", "synthetic")


def get_dataset_info(name: str, root: str, list_dir: str | None = None) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name`` (one of ``DATASET_NAMES``) rooted at ``root``.

    ``list_dir`` is where the prepare step wrote the lists and ``cls_labels.npy`` (default root).
    """
    if name in voc_layout.VOC_LAYOUT_NAMES:
        return voc_layout.dataset_info(name, root, list_dir)
    if name == "coco14":
        return coco_layout.dataset_info(root, list_dir)
    raise ValueError(f"unknown dataset {name!r}; expected one of {DATASET_NAMES}")
