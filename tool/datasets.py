"""Where the files of a dataset live: :class:`DatasetInfo`, generic over every dataset.

A ``DatasetInfo`` knows where an image, its ground-truth label PNG, the id lists and the
image-level labels (``cls_labels.npy``) live, so the stages never build paths themselves.
The lists and ``cls_labels.npy`` are written by the prepare step (``python -m voc12.prepare``
or ``python -m coco14.prepare``) into the dataset root unless another folder is given.
Each dataset package builds its own ``DatasetInfo`` (``voc12.layout.dataset_info``,
``coco14.layout.dataset_info``); the registry from a name is ``workflow.datasets``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from tool.fileio import DataError, load_npy_dict, read_id_list

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
    image_dir: str
    image_suffix: str
    label_dir: str
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


def prepare_command(module_and_flag: str, root: str, list_dir: str | None) -> str:
    """The command line that writes the lists of ``root`` (named in the missing-file errors)."""
    command = f"python -m {module_and_flag} {root}"
    return command + (f" --out_dir {list_dir}" if list_dir else "")
