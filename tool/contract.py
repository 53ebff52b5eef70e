"""The contract between stages, written down once.

Every stage reads and writes through these names and helpers, so the folder layout,
the dict key conventions and the PNG palette cannot drift between scripts. The formats
are those of SEAM/PSA, so outputs can be mixed with their tools:

* CAM dict (``<out_cam>/<image_id>.npy``): ``{fg_class_index: float32 HxW}``, 0-based over
  foreground classes (VOC 0..19), values in [0, 1] at the original image size.
* CRF dict (``<out_crf>_<alpha>/<image_id>.npy``): the same but 1-based, key 0 = background.
  A method with its own background map (SIPE / AE-SIPE ``IS_CAM``) writes its CAM dict in this
  one-based layout, key 0 its background; IRN's ``sipe`` / ``ae_sipe`` variants read it so.
* Label maps: 8-bit palette PNG, 0 = background, c + 1 = foreground class c, 255 = ignore.
"""
from __future__ import annotations

import os

import numpy as np

IGNORE_LABEL = 255

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# MSA normalises with these for every dataset (its quirk Q1: the ImageNet branch is never taken).
MSA_MEAN = (0.471, 0.448, 0.408)
MSA_STD = (0.234, 0.239, 0.242)

# SEAM's defaults for the two CRF dicts that AffinityNet is trained from.
LOW_ALPHA = 4.0
HIGH_ALPHA = 24.0


def crf_dir(out_crf: str, alpha: float) -> str:
    """Folder of the CRF dicts for one background alpha: ``<out_crf>_4.0`` as in SEAM."""
    return f"{out_crf}_{float(alpha):.1f}"


def voc_palette(num_entries: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map as a flat uint8 array of 3 * 256 entries (index 255 is cream)."""
    palette = np.zeros((num_entries, 3), dtype=np.uint8)
    for index in range(num_entries):
        value, red, green, blue = index, 0, 0, 0
        for bit in range(8):
            red |= ((value >> 0) & 1) << (7 - bit)
            green |= ((value >> 1) & 1) << (7 - bit)
            blue |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette[index] = (red, green, blue)
    return palette.reshape(-1)


VOC_PALETTE = voc_palette()


def image_ids_in(folder: str, suffix: str) -> set[str]:
    """Ids of the files ``<id><suffix>`` already present in ``folder`` (for skip-existing resume)."""
    if not os.path.isdir(folder):
        return set()
    return {name[: -len(suffix)] for name in os.listdir(folder) if name.endswith(suffix)}
