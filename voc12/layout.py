"""PASCAL VOC 2012 (+ SBD augmentation) folder layout and class names.

The layout, relative to the dataset root (``VOCdevkit/VOC2012``)::

    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png          VOC ground truth (train + val)
    SegmentationClassAug/<id>.png       SBD-augmented labels (10582 train_aug + val)
    ImageSets/Segmentation/{train,val,test}.txt

The synthetic dataset (``voc12.synthetic``) uses the same layout plus ``class_names.txt``.
"""
from __future__ import annotations

import os
from typing import Sequence

from tool.datasets import DatasetInfo, prepare_command
from tool.fileio import DataError

VOC_CLASS_NAMES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)

IMAGE_DIR = "JPEGImages"
IMAGE_SUFFIX = ".jpg"
LABEL_DIR = "SegmentationClass"
AUG_LABEL_DIR = "SegmentationClassAug"
SPLIT_LIST_DIR = os.path.join("ImageSets", "Segmentation")
# The dataset names of the VOC layout (the generated set included).
VOC_LAYOUT_NAMES: tuple[str, ...] = ("voc12", "synthetic")
# Written by the synthetic generator: one class name per line, background first.
CLASS_NAMES_FILE = "class_names.txt"


def label_dir_name(root: str) -> str:
    """``SegmentationClassAug`` when that folder exists under ``root``, else ``SegmentationClass``."""
    return AUG_LABEL_DIR if os.path.isdir(os.path.join(root, AUG_LABEL_DIR)) else LABEL_DIR


def image_path(root: str, image_id: str) -> str:
    return os.path.join(root, IMAGE_DIR, image_id + IMAGE_SUFFIX)


def gt_path(root: str, image_id: str) -> str:
    """Ground-truth label PNG, from SegmentationClassAug when the root has it."""
    return os.path.join(root, label_dir_name(root), image_id + ".png")


def split_list_path(root: str, split: str) -> str:
    """The official list ``ImageSets/Segmentation/<split>.txt`` (the input of ``voc12.prepare``)."""
    return os.path.join(root, SPLIT_LIST_DIR, split + ".txt")


def read_class_names(root: str) -> list[str]:
    """Class names from ``<root>/class_names.txt`` (background first), as the generator writes them."""
    path = os.path.join(root, CLASS_NAMES_FILE)
    if not os.path.isfile(path):
        raise DataError(f"{path}: class name file does not exist (write it with "
                        f"'python -m voc12.synthetic --out {root}')")
    with open(path, encoding="utf-8") as handle:
        names = [line.strip() for line in handle if line.strip()]
    if len(names) < 2 or names[0] != "background":
        raise DataError(f"{path}: expected 'background' on the first line and at least one "
                        f"foreground class, got {names[:3]}")
    if len(set(names)) != len(names):
        raise DataError(f"{path}: class names are not unique")
    return names


def dataset_info(name: str, root: str, list_dir: str | None = None,
                 class_names: Sequence[str] | None = None) -> DatasetInfo:
    """The :class:`DatasetInfo` of a VOC-layout dataset (``voc12`` or ``synthetic``) at ``root``.

    ``list_dir`` is where the prepare step wrote the lists and ``cls_labels.npy`` (default root).
    The synthetic class names come from ``class_names.txt`` unless ``class_names`` gives them.
    """
    if name == "voc12":
        names = list(class_names) if class_names is not None else list(VOC_CLASS_NAMES)
        command = prepare_command("voc12.prepare --voc12_root", root, list_dir)
    elif name == "synthetic":
        names = list(class_names) if class_names is not None else read_class_names(root)
        command = prepare_command("voc12.prepare --dataset synthetic --voc12_root", root, list_dir)
    else:
        raise ValueError(f"unknown VOC-layout dataset {name!r}; expected one of {VOC_LAYOUT_NAMES}")
    return DatasetInfo(name=name, root=root, class_names=names, image_dir=IMAGE_DIR, image_suffix=IMAGE_SUFFIX,
                       label_dir=label_dir_name(root), list_dir=list_dir, prepare_command=command)
