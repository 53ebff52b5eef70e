"""IR labels (IRN ``cam_to_ir_label``, SIPE ``cam2ir``, AE-SIPE ``cam2ir_bg_subpress``): the
confident regions the boundary network trains from.

Two CRFs on hard labels: one from a generous background (confident foreground), one from a
stingy background (confident background). A pixel keeps its foreground class where the first
CRF says foreground, becomes 0 where both say background, and 255 (unknown) elsewhere.

The variants differ only in where the two backgrounds come from:

* ``irn``: a constant background channel, 0.30 for the foreground CRF, 0.05 for the background one
  (works on any method's CAM dict).
* ``sipe`` / ``ae_sipe``: the method's own background map as is (foreground CRF) and scaled by
  0.5 / 0.8 (background CRF). Such a method writes its CAM dict one-based with key 0 its
  background (SIPE's ``IS_CAM`` layout, the format of a CRF dict).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from tool.contract import IGNORE_LABEL
from tool.crf import IR_LABEL_CRF, CrfParams, crf_label_inference
from tool.fileio import DataError


@dataclass(frozen=True)
class IrLabelVariant:
    """Where the two backgrounds come from: constant thresholds, or the CAM's own background
    (``own_background``) scaled by ``bg_scale`` for the background CRF."""

    name: str
    fg_threshold: float = 0.30
    bg_threshold: float = 0.05
    own_background: bool = False
    bg_scale: float = 1.0


IR_LABEL_VARIANTS: dict[str, IrLabelVariant] = {
    "irn": IrLabelVariant("irn"),
    "sipe": IrLabelVariant("sipe", own_background=True, bg_scale=0.5),
    "ae_sipe": IrLabelVariant("ae_sipe", own_background=True, bg_scale=0.8),
}


def get_ir_variant(name: str) -> IrLabelVariant:
    try:
        return IR_LABEL_VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown IR-label variant {name!r}; known: {', '.join(IR_LABEL_VARIANTS)}") from None


def split_cam_dict(cam_dict: Mapping[int, np.ndarray], own_background: bool, image_hw: tuple[int, int],
                   source: str = "CAM dict") -> tuple[list[int], np.ndarray, np.ndarray | None]:
    """``(class_ids, cams (K, H, W), background (H, W) or None)`` of a CAM dict.

    ``class_ids`` are label values (VOC: 1..20). Without ``own_background`` the dict is the
    project's CAM dict (0-based keys); with it, one-based with key 0 the method's background.
    """
    if own_background:
        if 0 not in cam_dict:
            raise DataError(f"{source}: this IR-label variant needs the method's own background "
                            f"(a one-based CAM dict with key 0), the dict has keys {sorted(cam_dict)}")
        class_ids = sorted(int(key) for key in cam_dict if int(key) != 0)
        background = np.asarray(cam_dict[0], dtype=np.float32)
    else:
        class_ids = sorted(int(key) + 1 for key in cam_dict)
        background = None
    keys = [class_id if own_background else class_id - 1 for class_id in class_ids]
    cams = (np.stack([np.asarray(cam_dict[key], dtype=np.float32) for key in keys]) if keys
            else np.zeros((0,) + tuple(image_hw), dtype=np.float32))
    if cams.shape[1:] != tuple(image_hw) or (background is not None and background.shape != tuple(image_hw)):
        raise DataError(f"{source}: maps of size {cams.shape[1:] or background.shape} do not match the "
                        f"{image_hw[0]}x{image_hw[1]} image")
    return class_ids, cams, background


def confident_label(image: np.ndarray, class_ids: list[int], scores: np.ndarray,
                    params: CrfParams = IR_LABEL_CRF) -> np.ndarray:
    """Label values (HxW) of the CRF started from the arg-max of ``scores`` (K + 1, H, W), channel 0
    the background and channel k the class ``class_ids[k - 1]``."""
    values = np.array([0] + list(class_ids), dtype=np.int64)
    if values.size == 1:  # nothing but background: the CRF has one label to give
        return np.zeros(scores.shape[1:], dtype=np.int64)
    start = np.argmax(scores, axis=0)
    return values[crf_label_inference(image, start, values.size, params)]


def ir_label(image: np.ndarray, class_ids: list[int], cams: np.ndarray, variant: IrLabelVariant,
             background: np.ndarray | None = None, params: CrfParams = IR_LABEL_CRF) -> np.ndarray:
    """The IR label (HxW uint8: 0 confident background, class id confident foreground, 255 unsure)."""
    cams = np.asarray(cams, dtype=np.float32)
    if variant.own_background:
        if background is None:
            raise ValueError(f"variant {variant.name} needs the CAM's own background map")
        fg_bg, bg_bg = background[None], background[None] * np.float32(variant.bg_scale)
    else:
        fg_bg = np.full((1,) + cams.shape[1:], variant.fg_threshold, dtype=np.float32)
        bg_bg = np.full((1,) + cams.shape[1:], variant.bg_threshold, dtype=np.float32)
    fg_conf = confident_label(image, class_ids, np.concatenate([fg_bg, cams]), params)
    bg_conf = confident_label(image, class_ids, np.concatenate([bg_bg, cams]), params)
    label = fg_conf.copy()
    label[fg_conf == 0] = IGNORE_LABEL
    label[(fg_conf == 0) & (bg_conf == 0)] = 0
    return label.astype(np.uint8)
