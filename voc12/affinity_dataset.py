"""AffinityNet training samples from the images and the low/high-alpha CRF dicts (PSA ``VOC12AffDataset``).

Per sample: colour jitter (image only), normalise, one random crop box for the image and the
stacked la/ha scores (both padded with 0), a random horizontal flip of both, 8 x 8 mean
pooling of the scores, the la/ha fusion rule into a label (0 bg, 1..K fg in dict order,
255 unsure) and the radius pair labels of :mod:`tool.affinity`. The radius follows SEAM's rule
for small maps (:func:`tool.affinity.affinity_radius`), as :class:`network.affinity.AffinityNet`
does, so labels and network outputs always line up.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from tool import transforms as T
from tool.affinity import affinity_pair_labels, affinity_radius, fuse_crf_labels, pool_score_stack
from tool.datasets import DatasetInfo
from tool.fileio import DataError, load_score_dict, read_rgb_image, require_files
from voc12.data import _EpochSeeded, check_images

LABEL_STRIDE = 8


def crf_score_stack(la_dict: dict[int, np.ndarray], ha_dict: dict[int, np.ndarray], path: str) -> np.ndarray:
    """Stack la then ha scores (keys sorted, 0 = bg) into HxWx2K; both dicts need the same keys."""
    if sorted(la_dict) != sorted(ha_dict):
        raise DataError(f"{path}: low-alpha keys {sorted(la_dict)} differ from high-alpha keys {sorted(ha_dict)}")
    if 0 not in la_dict:
        raise DataError(f"{path}: CRF dict has no background key 0")
    keys = sorted(la_dict)
    return np.stack([la_dict[k] for k in keys] + [ha_dict[k] for k in keys], axis=-1)


def affinity_labels_from_crop(score_stack: np.ndarray, box: T.CropBox, crop_size: int, flip: bool,
                              radius: int) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Crop (zero padding), flip, pool by 8 and fuse an HxWx2K la/ha stack; pair labels at ``radius``.

    Returns the (crop/8)^2 label map and (bg_pos, fg_pos, neg) float32 (n_offsets, n_from).
    """
    cropped = T.apply_crop_box(score_stack, box, crop_size, 0.0)
    if flip:
        cropped = cropped[:, ::-1]
    pooled = pool_score_stack(cropped, LABEL_STRIDE)
    num_keys = score_stack.shape[-1] // 2
    label = fuse_crf_labels(pooled[..., :num_keys], pooled[..., num_keys:])
    return label, affinity_pair_labels(label, affinity_radius(*label.shape, radius))


class AffinityDataset(_EpochSeeded, Dataset):
    """``(image_id, float32 3 x crop x crop normalised image, (bg_pos, fg_pos, neg) float32 tensors)``.

    ``la_dir`` / ``ha_dir`` hold the CRF dicts ``<id>.npy`` (1-based keys, 0 = bg) of the low
    and high background alpha. ``augment=False``: no jitter, centre crop, no flip.
    """

    def __init__(self, info: DatasetInfo, ids: Sequence[str], la_dir: str, ha_dir: str, crop_size: int = 448,
                 radius: int = 5, seed: int = 0, augment: bool = True, source: str | None = None) -> None:
        if crop_size % LABEL_STRIDE:
            raise ValueError(f"crop_size must be a multiple of {LABEL_STRIDE}, got {crop_size}")
        self.info, self.ids, self.la_dir, self.ha_dir = info, list(ids), la_dir, ha_dir
        require_files([self.crf_path(folder, image_id) for folder in (la_dir, ha_dir) for image_id in self.ids],
                      "low/high-alpha CRF dicts", source=source or info.root)
        check_images(info, self.ids, source)
        self.crop_size, self.radius, self.seed, self.augment = crop_size, radius, seed, augment

    @staticmethod
    def crf_path(folder: str, image_id: str) -> str:
        return os.path.join(folder, image_id + ".npy")

    def __len__(self) -> int:
        return len(self.ids)

    def read_sample(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        """The uint8 image and its HxWx2K la/ha score stack; sizes must agree."""
        image_path = self.info.image_path(image_id)
        la_path, ha_path = self.crf_path(self.la_dir, image_id), self.crf_path(self.ha_dir, image_id)
        image = read_rgb_image(image_path)
        la_dict = load_score_dict(la_path, self.info.num_classes, one_based=True)
        ha_dict = load_score_dict(ha_path, self.info.num_classes, one_based=True)
        stack = crf_score_stack(la_dict, ha_dict, f"{la_path} / {ha_path}")
        if stack.shape[:2] != image.shape[:2]:
            raise DataError(f"{la_path} / {ha_path}: scores are {stack.shape[0]}x{stack.shape[1]}, image "
                            f"{image_path} is {image.shape[0]}x{image.shape[1]}")
        return image, stack

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        image_id = self.ids[index]
        image, stack = self.read_sample(image_id)
        height, width = image.shape[:2]
        if self.augment:
            rng = self.rng_for(index)
            image = T.color_jitter(image, rng)
            box = T.random_crop_box(height, width, self.crop_size, rng)
            flip = bool(rng.random() < 0.5)
        else:
            box, flip = T.center_crop_box(height, width, self.crop_size), False
        image = T.apply_crop_box(T.normalize(image), box, self.crop_size, 0.0)
        if flip:
            image = image[:, ::-1]
        _, pair_labels = affinity_labels_from_crop(stack, box, self.crop_size, flip, self.radius)
        return (image_id, torch.from_numpy(T.hwc_to_chw(image)),
                tuple(torch.from_numpy(labels) for labels in pair_labels))
