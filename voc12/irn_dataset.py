"""IRN training samples from the images and their IR labels (IRN ``VOC12AffinityDataset``).

Per sample: one random scale in 0.5..1.5 for image (bicubic) and IR label (nearest), normalise,
a random horizontal flip of both, a random crop (image padded with 0 = the mean colour, label
with 255), the label sampled at the centre of each 4 x 4 cell (``label[2::4, 2::4]``, what IRN's
PIL nearest reduction gives) and the radius-10 pair labels of :mod:`tool.path_index`.
The draws come from ``default_rng((seed, epoch, index))`` like every dataset here, not from
Python's ``random`` (the maths of each draw is the reference's).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from tool import transforms as T
from tool.contract import IGNORE_LABEL
from tool.datasets import DatasetInfo
from tool.fileio import DataError, read_label_png, read_rgb_image, require_files
from tool.path_index import TRAIN_RADIUS, PathIndex, path_pair_labels
from voc12.data import _EpochSeeded, check_images

LABEL_STRIDE = 4
SCALE_RANGE = (0.5, 1.5)


def irn_crop(image: np.ndarray, label: np.ndarray, scale: float, flip: bool, box: T.CropBox,
             crop_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference's transform with given draws: normalised float32 crop (HxWx3) and uint8 label."""
    size_wh = T.scaled_size(image.shape[0], image.shape[1], scale)
    image, label = T.resize_joint(image, size_wh, label, resample="bicubic")
    image = T.normalize(image)
    if flip:
        image, label = T.hflip(image, label)
    return (T.apply_crop_box(image, box, crop_size, 0.0), T.apply_crop_box(label, box, crop_size, IGNORE_LABEL))


def reduce_label(label: np.ndarray) -> np.ndarray:
    """The stride-4 label: the centre pixel of each 4 x 4 cell."""
    return np.ascontiguousarray(label[LABEL_STRIDE // 2::LABEL_STRIDE, LABEL_STRIDE // 2::LABEL_STRIDE])


class IrLabelDataset(_EpochSeeded, Dataset):
    """``(image_id, float32 3 x crop x crop image, (bg_pos, fg_pos, neg) float32 (n_dirs, n_src))``.

    ``ir_label_dir`` holds the IR labels ``<id>.png`` (``make_ir_labels.py``).
    """

    def __init__(self, info: DatasetInfo, ids: Sequence[str], ir_label_dir: str, crop_size: int = 512,
                 radius: int = TRAIN_RADIUS, seed: int = 0, source: str | None = None) -> None:
        if crop_size % LABEL_STRIDE:
            raise ValueError(f"crop_size must be a multiple of {LABEL_STRIDE}, got {crop_size}")
        self.path_index = PathIndex(radius, crop_size // LABEL_STRIDE, crop_size // LABEL_STRIDE)
        self.info, self.ids, self.ir_label_dir = info, list(ids), ir_label_dir
        check_images(info, self.ids, source)
        require_files((self.label_path(image_id) for image_id in self.ids), f"IR labels in {ir_label_dir}",
                      source=source or info.root)
        self.crop_size, self.seed = crop_size, seed

    def label_path(self, image_id: str) -> str:
        return os.path.join(self.ir_label_dir, image_id + ".png")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor, tuple[torch.Tensor, ...]]:
        image_id = self.ids[index]
        image = read_rgb_image(self.info.image_path(image_id))
        label = read_label_png(self.label_path(image_id))
        if label.shape != image.shape[:2]:
            raise DataError(f"{self.label_path(image_id)}: IR label is {label.shape[0]}x{label.shape[1]}, "
                            f"the image is {image.shape[0]}x{image.shape[1]}")
        rng = self.rng_for(index)
        scale = float(rng.uniform(*SCALE_RANGE))
        flip = bool(rng.random() < 0.5)
        width, height = T.scaled_size(image.shape[0], image.shape[1], scale)
        box = T.random_crop_box(height, width, self.crop_size, rng)
        crop, crop_label = irn_crop(image, label, scale, flip, box, self.crop_size)
        pair_labels = path_pair_labels(reduce_label(crop_label), self.path_index)
        return image_id, torch.from_numpy(T.hwc_to_chw(crop)), tuple(torch.from_numpy(p) for p in pair_labels)


class TopLeftCropDataset(Dataset):
    """``(image_id, float32 3 x crop x crop)``: the normalised image cropped/padded (0) at the top
    left, as IRN's displacement-mean pass reads its list."""

    def __init__(self, info: DatasetInfo, ids: Sequence[str], crop_size: int, source: str | None = None) -> None:
        check_images(info, ids, source)
        self.info, self.ids, self.crop_size = info, list(ids), crop_size

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor]:
        image = T.normalize(read_rgb_image(self.info.image_path(self.ids[index])))
        height, width = image.shape[:2]
        box = T.CropBox(0, 0, 0, 0, min(height, self.crop_size), min(width, self.crop_size))
        return self.ids[index], torch.from_numpy(T.hwc_to_chw(T.apply_crop_box(image, box, self.crop_size, 0.0)))
