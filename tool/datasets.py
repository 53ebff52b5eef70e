"""Dataset registry: a dataset name and root become a :class:`DatasetInfo`.

A ``DatasetInfo`` knows where an image, its ground-truth label PNG, the id lists and the
image-level labels (``cls_labels.npy``) live, so the stages never build paths themselves.
The lists and ``cls_labels.npy`` are written by the prepare step (``python -m voc12.prepare``
or ``python -m coco14.prepare``) into the dataset root unless another folder is given.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from coco14 import layout as coco_layout
from tool.fileio import DataError, load_npy_dict, read_id_list
from voc12 import layout as voc_layout

DATASET_NAMES: tuple[str, ...] = ("voc12", "coco14", "synthetic")
SPLITS: tuple[str, ...] = ("train", "val", "train_aug", "test")
CLS_LABELS_FILE = "cls_labels.npy"


@dataclass
class DatasetInfo:
    """Where the files of one dataset live, and its class names (background first).

    ``image_dir`` and ``label_dir`` are relative to ``root``; ``list_dir`` (default: ``root``)
    holds ``<split>.txt`` and ``cls_labels.npy``.
    """

    name: str
    root: str
    class_names: list[str]
    image_dir: str = voc_layout.IMAGE_DIR
    image_suffix: str = voc_layout.IMAGE_SUFFIX
    label_dir: str = voc_layout.LABEL_DIR
    list_dir: str | None = None
    prepare_command: str = field(default="", repr=False)

    @property
    def num_classes(self) -> int:
        """Number of foreground classes (VOC: 20)."""
        return len(self.class_names) - 1

    @property
    def num_labels(self) -> int:
        """Number of label values including background (VOC: 21), as evaluation counts them."""
        return len(self.class_names)

    def image_path(self, image_id: str) -> str:
        return os.path.join(self.root, self.image_dir, image_id + self.image_suffix)

    @property
    def label_folder(self) -> str:
        """The folder of the ground-truth label PNGs."""
        return os.path.join(self.root, self.label_dir)

    def gt_path(self, image_id: str) -> str:
        """The ground-truth label PNG of an image."""
        return os.path.join(self.label_folder, image_id + ".png")

    def list_path(self, split: str) -> str:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return os.path.join(self.list_dir or self.root, f"{split}.txt")

    @property
    def cls_labels_path(self) -> str:
        return os.path.join(self.list_dir or self.root, CLS_LABELS_FILE)

    def read_list(self, split: str) -> list[str]:
        """The ids of a split; a missing list names the file and the prepare command."""
        path = self.list_path(split)
        if not os.path.isfile(path):
            raise DataError(f"{path}: list file does not exist; write it with '{self.prepare_command}'")
        return read_id_list(path)

    def load_cls_labels(self) -> dict[str, np.ndarray]:
        """``{image_id: float32 multi-hot over the foreground classes}`` from ``cls_labels.npy``."""
        path = self.cls_labels_path
        if not os.path.isfile(path):
            raise DataError(f"{path}: image-level labels do not exist; write them with "
                            f"'{self.prepare_command}'")
        labels = load_npy_dict(path, "{image_id: multi-hot}")
        result: dict[str, np.ndarray] = {}
        for image_id, value in labels.items():
            value = np.asarray(value, dtype=np.float32)
            if value.shape != (self.num_classes,):
                raise DataError(f"{path}: label of {image_id} has shape {value.shape}; expected "
                                f"({self.num_classes},) for the {self.num_classes} foreground classes "
                                f"of {self.name}")
            result[str(image_id)] = value
        return result


@dataclass
class CocoDatasetInfo(DatasetInfo):
    """COCO 2014: the image folder (train2014 / val2014) is the split named in the id."""

    def image_path(self, image_id: str) -> str:
        return coco_layout.image_path(self.root, image_id)


def get_dataset_info(name: str, root: str, list_dir: str | None = None) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name`` (one of ``DATASET_NAMES``) rooted at ``root``.

    ``list_dir`` is where the prepare step wrote the lists and ``cls_labels.npy`` (default root).
    """
    if name == "voc12":
        return DatasetInfo(name=name, root=root, class_names=list(voc_layout.VOC_CLASS_NAMES),
                           label_dir=voc_layout.label_dir_name(root), list_dir=list_dir,
                           prepare_command=_prepare_command("voc12.prepare --voc12_root", root, list_dir))
    if name == "synthetic":
        return DatasetInfo(name=name, root=root, class_names=voc_layout.read_class_names(root),
                           label_dir=voc_layout.label_dir_name(root), list_dir=list_dir,
                           prepare_command=_prepare_command("voc12.prepare --dataset synthetic --voc12_root",
                                                            root, list_dir))
    if name == "coco14":
        return CocoDatasetInfo(name=name, root=root, class_names=list(coco_layout.COCO_CLASS_NAMES),
                               image_dir="", label_dir=coco_layout.LABEL_DIR, list_dir=list_dir,
                               prepare_command=_prepare_command("coco14.prepare --coco_root", root, list_dir))
    raise ValueError(f"unknown dataset {name!r}; expected one of {DATASET_NAMES}")


def _prepare_command(module_and_flag: str, root: str, list_dir: str | None) -> str:
    command = f"python -m {module_and_flag} {root}"
    return command + (f" --out_dir {list_dir}" if list_dir else "")
