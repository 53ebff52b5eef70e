"""MS COCO 2014 layout for semantic segmentation, class names and category-id mapping.

The layout, relative to the dataset root::

    train2014/<id>.jpg                   e.g. COCO_train2014_000000000009.jpg
    val2014/<id>.jpg                     e.g. COCO_val2014_000000000042.jpg
    SegmentationClass/<id>.png           values 0 (background), 1..80, 255 (ignore)

The image folder is the split named inside the id (``COCO_<split>_<number>``). Label PNGs
use contiguous class indices; ``COCO_CATEGORY_IDS`` maps the sparse COCO category ids
(1..90 with gaps) onto them, for converting instance annotations into label maps.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from tool.datasets import DatasetInfo, prepare_command
from tool.fileio import DataError

COCO_CLASS_NAMES: tuple[str, ...] = (
    "background",
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
)

# COCO category id (instances_*.json "category_id") -> contiguous label index (1..80).
COCO_CATEGORY_IDS: dict[int, int] = {
    1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 7: 7, 8: 8, 9: 9, 10: 10, 11: 11,          # person..fire hydrant
    13: 12, 14: 13, 15: 14, 16: 15, 17: 16, 18: 17, 19: 18, 20: 19, 21: 20,         # stop sign..cow
    22: 21, 23: 22, 24: 23, 25: 24,                                                 # elephant..giraffe
    27: 25, 28: 26, 31: 27, 32: 28, 33: 29,                                         # backpack..suitcase
    34: 30, 35: 31, 36: 32, 37: 33, 38: 34, 39: 35, 40: 36, 41: 37, 42: 38, 43: 39,  # frisbee..tennis racket
    44: 40, 46: 41, 47: 42, 48: 43, 49: 44, 50: 45, 51: 46,                         # bottle..bowl
    52: 47, 53: 48, 54: 49, 55: 50, 56: 51, 57: 52, 58: 53, 59: 54, 60: 55, 61: 56,  # banana..cake
    62: 57, 63: 58, 64: 59, 65: 60, 67: 61, 70: 62,                                 # chair..toilet
    72: 63, 73: 64, 74: 65, 75: 66, 76: 67, 77: 68, 78: 69, 79: 70, 80: 71, 81: 72,  # tv..sink
    82: 73, 84: 74, 85: 75, 86: 76, 87: 77, 88: 78, 89: 79, 90: 80,                 # refrigerator..toothbrush
}

SPLITS = ("train2014", "val2014")
IMAGE_SUFFIX = ".jpg"
LABEL_DIR = "SegmentationClass"


def split_of_id(image_id: str) -> str:
    """``COCO_train2014_000000000009`` -> ``train2014``; DataError for an id of another form."""
    parts = image_id.split("_")
    if len(parts) != 3 or parts[0] != "COCO" or parts[1] not in SPLITS:
        raise DataError(f"{image_id!r} is not a COCO 2014 image id (expected COCO_train2014_<n> "
                        f"or COCO_val2014_<n>)")
    return parts[1]


def image_path(root: str, image_id: str) -> str:
    return os.path.join(root, split_of_id(image_id), image_id + IMAGE_SUFFIX)


@dataclass
class CocoDatasetInfo(DatasetInfo):
    """COCO 2014: the image folder (train2014 / val2014) is the split named in the id."""

    def image_path(self, image_id: str) -> str:
        return image_path(self.root, image_id)


def dataset_info(root: str, list_dir: str | None = None) -> CocoDatasetInfo:
    """The :class:`DatasetInfo` of COCO 2014 at ``root`` (lists in ``list_dir``, default root)."""
    return CocoDatasetInfo(name="coco14", root=root, class_names=list(COCO_CLASS_NAMES), image_dir="",
                           image_suffix=IMAGE_SUFFIX, label_dir=LABEL_DIR, list_dir=list_dir,
                           prepare_command=prepare_command("coco14.prepare --coco_root", root, list_dir))
