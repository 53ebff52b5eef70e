"""Torch datasets over any :class:`tool.datasets.DatasetInfo` and a list of image ids.

Every dataset checks up front that all its files exist (one error listing the first missing
ones), so a bad list fails at start-up rather than hours into training. Random augmentations
draw from ``np.random.default_rng((seed, epoch, index))``: a sample does not depend on the
number of workers, and a run resumed at an epoch sees the same samples. Call ``set_epoch``
before each epoch (with ``persistent_workers=True`` the workers keep their own copy, so create
the loader's iterator after ``set_epoch``, or leave persistent workers off).
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from tool import transforms as T
from tool.contract import IGNORE_LABEL
from tool.datasets import DatasetInfo
from tool.fileio import IMAGE_CHECK_CACHE, DataError, check_images_decode, read_label_png, read_rgb_image, require_files


def check_images(info: DatasetInfo, ids: Sequence[str], source: str | None) -> None:
    """A non-empty list whose images all exist (one DataError naming the first ten missing)
    and all decode (checked once per file version, before the first step)."""
    if not ids:
        raise DataError(f"{source or info.root}: the image list is empty")
    paths = [info.image_path(image_id) for image_id in ids]
    require_files(paths, "images", source=source or info.root)
    check_images_decode(paths, os.path.join(info.root, IMAGE_CHECK_CACHE))


def _check_cls_labels(info: DatasetInfo, ids: Sequence[str], cls_labels: Mapping[str, np.ndarray]) -> None:
    """Every id needs a non-empty label of the right length (an empty one trains nothing)."""
    missing = [image_id for image_id in ids if image_id not in cls_labels]
    if missing:
        raise DataError(f"{info.cls_labels_path}: no class label for {len(missing)} images: "
                        f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    for image_id in ids:
        label = np.asarray(cls_labels[image_id])
        if label.shape != (info.num_classes,):
            raise DataError(f"{info.cls_labels_path}: class label of {image_id} has shape {label.shape}; "
                            f"expected ({info.num_classes},)")
        if not label.any():
            raise DataError(f"{info.image_path(image_id)}: empty class label (no foreground class) in "
                            f"{info.cls_labels_path}; remove the image from the list")


class _EpochSeeded:
    """Per-sample generators ``default_rng((seed, epoch, index))``."""

    seed: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rng_for(self, index: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, self.epoch, int(index)))


class ClassificationDataset(_EpochSeeded, Dataset):
    """``(image_id, float32 3 x crop x crop normalised image, float32 (num_classes,) label)``.

    SEAM's training augmentation: resize the long side to a random length in ``resize_long``
    (bicubic), colour jitter (0.3, 0.3, 0.3, 0.1), horizontal flip, normalise, random crop
    padded with 0 (the mean). With ``augment=False``: normalise and centre-crop / pad only.
    ``color_jitter=False``: SIPE's augmentation (no jitter). ``valid_mask=True`` adds a fourth
    item, the float32 crop x crop mask of image pixels (1) versus padding (0).
    """

    def __init__(self, info: DatasetInfo, ids: Sequence[str], cls_labels: Mapping[str, np.ndarray],
                 crop_size: int = 448, resize_long: tuple[int, int] | None = (448, 768), seed: int = 0,
                 augment: bool = True, source: str | None = None, color_jitter: bool = True,
                 valid_mask: bool = False) -> None:
        check_images(info, ids, source)
        _check_cls_labels(info, ids, cls_labels)
        self.info, self.ids = info, list(ids)
        self.cls_labels = {image_id: np.asarray(cls_labels[image_id], dtype=np.float32) for image_id in self.ids}
        self.crop_size, self.resize_long, self.seed, self.augment = crop_size, resize_long, seed, augment
        self.color_jitter, self.valid_mask = color_jitter, valid_mask

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple:
        image_id = self.ids[index]
        image = read_rgb_image(self.info.image_path(image_id))
        height, width = image.shape[:2]
        if self.augment:
            rng = self.rng_for(index)
            if self.resize_long is not None:
                image, _ = T.random_resize_long(image, rng, self.resize_long)
                height, width = image.shape[:2]
            if self.color_jitter:
                image = T.color_jitter(image, rng)
            image, _ = T.random_hflip(image, rng)
            image, _, box = T.random_crop(T.normalize(image), self.crop_size, rng)
        else:
            box = T.center_crop_box(height, width, self.crop_size)
            image = T.apply_crop_box(T.normalize(image), box, self.crop_size, 0.0)
        item = (image_id, torch.from_numpy(T.hwc_to_chw(image)), torch.from_numpy(self.cls_labels[image_id]))
        if self.valid_mask:
            valid = T.apply_crop_box(np.ones((height, width), np.float32), box, self.crop_size, 0.0)
            item += (torch.from_numpy(valid),)
        return item


class MultiScaleDataset(Dataset):
    """Inference views for multi-scale CAMs, as SEAM's ``VOC12ClsDatasetMSF``.

    Item: ``{"id", "image" (uint8 HxWx3), "views": [float32 tensor (2, 3, h_s, w_s) per scale:
    the normalised image resized with PIL bicubic to (round(W*s), round(H*s)) and its mirror],
    "label": float32 (num_classes,)}``. Use :func:`collate_single` with ``batch_size=1``.
    """

    def __init__(self, info: DatasetInfo, ids: Sequence[str], cls_labels: Mapping[str, np.ndarray],
                 scales: Sequence[float] = (0.5, 1.0, 1.5, 2.0), source: str | None = None) -> None:
        check_images(info, ids, source)
        _check_cls_labels(info, ids, cls_labels)
        self.info, self.ids, self.scales = info, list(ids), tuple(scales)
        self.cls_labels = {image_id: np.asarray(cls_labels[image_id], dtype=np.float32) for image_id in self.ids}

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = self.ids[index]
        image = read_rgb_image(self.info.image_path(image_id))
        views = []
        for scale in self.scales:
            scaled = T.hwc_to_chw(T.normalize(T.resize_image(image, T.scaled_size(*image.shape[:2], scale))))
            views.append(torch.from_numpy(np.stack([scaled, scaled[:, :, ::-1]])))
        return {"id": image_id, "image": image, "views": views,
                "label": torch.from_numpy(self.cls_labels[image_id])}


class CamDictDataset(Dataset):
    """Base of the datasets that pair each listed image with its CAM dict in ``cam_dir``: every
    image must exist and decode, every CAM dict exist, before the first item (subclasses build
    the items)."""

    def __init__(self, info: DatasetInfo, ids: Sequence[str], cam_dir: str, source: str | None = None) -> None:
        self.info, self.ids, self.cam_dir = info, list(ids), cam_dir
        check_images(info, self.ids, source)
        require_files((self.cam_path(image_id) for image_id in self.ids), f"CAM dicts in {cam_dir}",
                      source=source or info.root)

    def cam_path(self, image_id: str) -> str:
        return os.path.join(self.cam_dir, f"{image_id}.npy")

    def __len__(self) -> int:
        return len(self.ids)


def collate_single(batch: list[Any]) -> Any:
    """Collate for ``batch_size=1``: the item itself (views of different sizes cannot stack)."""
    if len(batch) != 1:
        raise ValueError(f"collate_single needs batch_size=1, got a batch of {len(batch)}")
    return batch[0]


class SegmentationDataset(_EpochSeeded, Dataset):
    """``(image_id, float32 3xHxW normalised image, int64 HxW label with 255 = ignore)``.

    Labels come from the ground truth (``label_dir=None``) or from a folder of pseudo-mask
    PNGs ``<label_dir>/<id>.png``. Training augmentation (DeepLabV1 codebase): random rescale
    in ``scale_range`` (bicubic image, nearest label), HSV jitter, flip, normalise, random crop
    (label padded with 255). With ``scale_choices`` (DeepLabV2) the factor is one of them
    instead and the image is resized bilinearly. ``augment=False`` returns the whole image and label.
    """

    def __init__(self, info: DatasetInfo, ids: Sequence[str], label_dir: str | None = None, crop_size: int = 448,
                 scale_range: tuple[float, float] = (0.5, 1.5), seed: int = 0, augment: bool = True,
                 hsv_shift: tuple[int, int, int] | None = (10, 10, 10), source: str | None = None,
                 scale_choices: tuple[float, ...] | None = None) -> None:
        check_images(info, ids, source)
        self.info, self.ids, self.label_dir = info, list(ids), label_dir
        require_files((self.label_path(image_id) for image_id in self.ids), "label maps", source=source or info.root)
        self.crop_size, self.scale_range, self.seed, self.augment = crop_size, scale_range, seed, augment
        self.hsv_shift, self.scale_choices = hsv_shift, scale_choices

    def label_path(self, image_id: str) -> str:
        if self.label_dir is None:
            return self.info.gt_path(image_id)
        return os.path.join(self.label_dir, image_id + ".png")

    def __len__(self) -> int:
        return len(self.ids)

    def read_pair(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Image and label of one id; a size mismatch or an unknown label value raises DataError."""
        image_path, label_path = self.info.image_path(image_id), self.label_path(image_id)
        image = read_rgb_image(image_path)
        label = read_label_png(label_path)
        if label.shape != image.shape[:2]:
            raise DataError(f"{label_path}: label size {label.shape[0]}x{label.shape[1]} does not match "
                            f"image {image_path} size {image.shape[0]}x{image.shape[1]}")
        if int(label[label != IGNORE_LABEL].max(initial=0)) > self.info.num_classes:
            raise DataError(f"{label_path}: label values exceed the {self.info.num_classes} classes of "
                            f"{self.info.name} (only 0..{self.info.num_classes} and 255 are valid)")
        return image, label

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor, torch.Tensor]:
        image_id = self.ids[index]
        image, label = self.read_pair(image_id)
        if self.augment:
            rng = self.rng_for(index)
            if self.scale_choices is not None:
                image, label = T.random_rescale_choice(image, rng, self.scale_choices, label)
            else:
                image, label = T.random_rescale(image, rng, self.scale_range, label, resample="bicubic")
            if self.hsv_shift is not None:
                image = T.hsv_jitter(image, rng, *self.hsv_shift)
            image, label = T.random_hflip(image, rng, label)
            image, label, _ = T.random_crop(T.normalize(image), self.crop_size, rng, label)
        else:
            image = T.normalize(image)
        return (image_id, torch.from_numpy(T.hwc_to_chw(image)),
                torch.from_numpy(label.astype(np.int64)))
