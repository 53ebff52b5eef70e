"""Training datasets of MSA: the superpixel FCN's (image + LAB target) and the classifier's
(image + label, optionally a saliency map), with the reference augmentations.

Both: long side resized to a random length in ``resize_long`` (bicubic; masks nearest),
horizontal flip, normalisation, random crop padded with 0 (the normalised mean, which the
IPC loss detects as padding). SpixelFCN normalises with the ImageNet statistics, the MSA
classifier with its own constants (the reference's quirk Q1, for every dataset).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from tool import transforms as T
from tool.contract import MSA_MEAN, MSA_STD
from tool.datasets import DatasetInfo
from tool.fileio import read_rgb_image, require_files
from voc12.data import _check_cls_labels, _EpochSeeded, check_images
from voc12.saliency import read_saliency_png, saliency_path


class SpixelDataset(_EpochSeeded, Dataset):
    """``(image_id, float32 3 x crop x crop ImageNet-normalised image, uint8 crop x crop x 3 LAB)``.

    The LAB target is computed from the resized, flipped RGB crop, padding black (LAB
    (0, 128, 128), as the reference pads). The reference resizes its LAB copy with nearest
    neighbour while the image is bicubic, so its target is not exactly the input's colour;
    here both come from the same resized image.
    """

    def __init__(self, info: DatasetInfo, ids: Sequence[str], crop_size: int = 512,
                 resize_long: tuple[int, int] | None = (320, 640), seed: int = 0, source: str | None = None) -> None:
        check_images(info, ids, source)
        self.info, self.ids = info, list(ids)
        self.crop_size, self.resize_long, self.seed = crop_size, resize_long, seed

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor, torch.Tensor]:
        image_id = self.ids[index]
        rng = self.rng_for(index)
        image = read_rgb_image(self.info.image_path(image_id))
        if self.resize_long is not None:
            image, _ = T.random_resize_long(image, rng, self.resize_long)
        image, _ = T.random_hflip(image, rng)
        box = T.random_crop_box(image.shape[0], image.shape[1], self.crop_size, rng)
        normalised = T.apply_crop_box(T.normalize(image), box, self.crop_size, 0.0)
        lab = T.rgb_to_lab_uint8(T.apply_crop_box(image, box, self.crop_size, 0))
        return image_id, torch.from_numpy(T.hwc_to_chw(normalised)), torch.from_numpy(lab)


class MSAClassificationDataset(_EpochSeeded, Dataset):
    """``(image_id, float32 3 x crop x crop image, float32 (C,) label, float32 1 x crop x crop saliency)``.

    Saliency (with ``sal_dir``) is the PNG / 255, resized and cropped with the image; the crop
    pads it with 0 when its maximum exceeds 100 and with 255 otherwise (the reference's
    rule). Without ``sal_dir`` the saliency tensor is empty (1 x 0 x 0).
    """

    def __init__(self, info: DatasetInfo, ids: Sequence[str], cls_labels: Mapping[str, np.ndarray],
                 crop_size: int = 480, resize_long: tuple[int, int] | None = (320, 640), seed: int = 0,
                 sal_dir: str | None = None, source: str | None = None) -> None:
        check_images(info, ids, source)
        _check_cls_labels(info, ids, cls_labels)
        if sal_dir is not None:
            require_files((saliency_path(sal_dir, image_id) for image_id in ids), "saliency maps", source=sal_dir)
        self.info, self.ids, self.sal_dir = info, list(ids), sal_dir
        self.cls_labels = {image_id: np.asarray(cls_labels[image_id], dtype=np.float32) for image_id in self.ids}
        self.crop_size, self.resize_long, self.seed = crop_size, resize_long, seed

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]:
        image_id = self.ids[index]
        rng = self.rng_for(index)
        image = read_rgb_image(self.info.image_path(image_id))
        saliency = None
        if self.sal_dir is not None:
            saliency = read_saliency_png(saliency_path(self.sal_dir, image_id), image.shape[:2])
        if self.resize_long is not None:
            image, saliency = T.random_resize_long(image, rng, self.resize_long, saliency)
        image, saliency = T.random_hflip(image, rng, saliency)
        box = T.random_crop_box(image.shape[0], image.shape[1], self.crop_size, rng)
        image = T.apply_crop_box(T.normalize(image, MSA_MEAN, MSA_STD), box, self.crop_size, 0.0)
        if saliency is None:
            sal = torch.zeros(1, 0, 0)
        else:
            fill = 0 if saliency.max() > 100 else 255
            sal = torch.from_numpy(T.apply_crop_box(saliency, box, self.crop_size, fill)[None].astype(np.float32) / 255.0)
        return image_id, torch.from_numpy(T.hwc_to_chw(image)), torch.from_numpy(self.cls_labels[image_id]), sal
