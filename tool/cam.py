"""Multi-scale CAM fusion, seed labels and background scores (SEAM ``infer_SEAM.py`` semantics).

A *CAM dict* maps 0-based foreground class indices to HxW float32 maps in [0, 1] (see
tool/contract.py). The fusion reproduces SEAM's arithmetic bit for bit, including its
1e-5 quirks (reference README section 4):

* classes absent from the image label come out as exactly -1 (they never win an argmax
  against a non-negative background score);
* present classes whose minimum is 0 map the zeroed pixels to ``-1e-5 / (max + 1e-5)``
  (a tiny negative number) and the maximum to ``(max - 1e-5) / (max + 1e-5) < 1``.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

# SEAM keeps a class in the CAM dict when its label entry exceeds this.
LABEL_PRESENT_EPS = 1e-5
# SEAM's background threshold for the seed PNG (infer_SEAM.py ``out_cam_pred``).
SEAM_SEED_BG_THRESHOLD = 0.26


def fuse_cams(view_cams: np.ndarray, label: np.ndarray, clip: bool = False) -> np.ndarray:
    """Fuse per-view CAMs into one min-max normalised CAM per class, exactly as SEAM.

    view_cams: (V, C, H, W) float32, each view already upsampled to the image size and
    flipped back. label: (C,) multi-hot over foreground classes. Returns (C, H, W) float32;
    classes absent from the label are -1 everywhere.

    ``clip=True`` fixes SEAM's bug for a class that is positive everywhere (cam_min > 0):
    SEAM zeroes its minimum pixels *before* subtracting cam_min, so they come out as
    -cam_min / range, far below 0 (-3.4 seen on a young model). Clipping to [0, 1] keeps the
    CAM dict in its documented range and changes nothing else beyond the 1e-5 epsilons.
    """
    view_cams = np.asarray(view_cams, dtype=np.float32)
    label = np.asarray(label, dtype=np.float32)
    if view_cams.ndim != 4 or view_cams.shape[1] != label.shape[0]:
        raise ValueError(f"view_cams must be (V, C, H, W) with C = len(label) = {label.shape[0]}, "
                         f"got {view_cams.shape}")
    # Summing the stacked views over axis 0 adds them in view order, as np.sum(cam_list, 0) does.
    sum_cam = np.sum(view_cams * label[None, :, None, None], axis=0)
    sum_cam[sum_cam < 0] = 0
    cam_max = np.max(sum_cam, axis=(1, 2), keepdims=True)
    cam_min = np.min(sum_cam, axis=(1, 2), keepdims=True)
    sum_cam[sum_cam < cam_min + 1e-5] = 0  # SEAM sets these to 0, not to cam_min
    norm_cam = (sum_cam - cam_min - 1e-5) / (cam_max - cam_min + 1e-5)
    return np.clip(norm_cam, 0.0, 1.0) if clip else norm_cam


def cam_dict_from(norm_cam: np.ndarray, label: np.ndarray) -> dict[int, np.ndarray]:
    """The saved CAM dict: ``{c: norm_cam[c]}`` for every class c in the label, ascending."""
    label = np.asarray(label)
    return {int(c): np.ascontiguousarray(norm_cam[c], dtype=np.float32)
            for c in range(label.shape[0]) if label[c] > LABEL_PRESENT_EPS}


def _keys_and_stack(score_dict: Mapping[int, np.ndarray]) -> tuple[list[int], np.ndarray]:
    keys = list(score_dict.keys())
    return keys, np.stack([np.asarray(score_dict[k], dtype=np.float32) for k in keys])


def labels_from_scores(class_ids: Sequence[int], scores: np.ndarray) -> np.ndarray:
    """Argmax over the channels of ``scores`` (K, H, W), mapped to ``class_ids[k]``, as uint8.

    Ties go to the lowest channel, so list the channels in ascending class order (background
    first) to get SEAM's tie rule.
    """
    lookup = np.asarray(class_ids, dtype=np.uint8)
    if scores.shape[0] != lookup.shape[0]:
        raise ValueError(f"{scores.shape[0]} score channels but {lookup.shape[0]} class ids")
    return lookup[np.argmax(scores, axis=0)]


def seed_from_cam_dict(cam_dict: Mapping[int, np.ndarray], num_classes: int, bg_threshold: float,
                       image_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Seed label map: argmax over [bg_threshold, CAMs] -> uint8 HxW, 0 = bg, c + 1 = class c.

    Equal to SEAM's argmax over all ``num_classes`` channels (absent classes never win when
    ``bg_threshold >= 0``), ties to the lowest class. ``image_hw`` is needed only for an empty
    dict (an image without foreground labels), which gives all background.
    """
    keys = sorted(int(k) for k in cam_dict)
    if any(not 0 <= k < num_classes for k in keys):
        raise ValueError(f"CAM dict keys {keys} outside 0..{num_classes - 1}")
    if not keys:
        if image_hw is None:
            raise ValueError("an empty CAM dict needs image_hw")
        return np.zeros(image_hw, dtype=np.uint8)
    cams = np.stack([np.asarray(cam_dict[k], dtype=np.float32) for k in keys])
    background = np.full((1,) + cams.shape[1:], bg_threshold, dtype=np.float32)
    return labels_from_scores([0] + [k + 1 for k in keys], np.concatenate([background, cams]))


def bg_score(cam_values: np.ndarray, alpha: float) -> np.ndarray:
    """Background score ``(1 - max_c cam)^alpha`` over the class axis 0 -> (1, H, W) float32.

    ``cam_values`` is (K, H, W). With SEAM's slightly negative CAM minima, ``1 - max`` can
    exceed 1 and so can the score; the CRF clips it (reference quirk, kept).
    """
    cam_values = np.asarray(cam_values, dtype=np.float32)
    if cam_values.shape[0] == 0:
        return np.ones((1,) + cam_values.shape[1:], dtype=np.float32)
    # A Python float exponent keeps the power in float32, as SEAM's int/float alpha does.
    return np.power(1 - np.max(cam_values, axis=0, keepdims=True), float(alpha)).astype(np.float32, copy=False)


def scores_with_background(cam_dict: Mapping[int, np.ndarray], alpha: float,
                           image_hw: tuple[int, int] | None = None) -> tuple[list[int], np.ndarray]:
    """``(keys, probs)``: probs = [bg_score, CAMs in dict order] (K+1, H, W), not normalised.

    This is the array SEAM's ``_crf_with_alpha`` gives the CRF. ``keys`` are the CAM dict
    keys (0-based) in the same order as channels 1..K.
    """
    if not cam_dict:
        if image_hw is None:
            raise ValueError("an empty CAM dict needs image_hw")
        return [], np.ones((1,) + tuple(image_hw), dtype=np.float32)
    keys, cams = _keys_and_stack(cam_dict)
    return keys, np.concatenate([bg_score(cams, alpha), cams], axis=0)


def alpha_for_threshold(bg_threshold: float) -> float:
    """The alpha for which argmax([(1 - m)^alpha, CAMs]) equals argmax([bg_threshold, CAMs]).

    Foreground wins where the top CAM m exceeds (1 - m)^alpha; both sides are monotonic in m,
    so the boundary is the m with m = (1 - m)^alpha: alpha = ln(t) / ln(1 - t).
    SEAM's seed threshold 0.26 gives alpha 4.47 (close to SEAM's low alpha 4).
    """
    if not 0.0 < bg_threshold < 1.0:
        raise ValueError(f"bg_threshold must be in (0, 1), got {bg_threshold}")
    return math.log(bg_threshold) / math.log(1.0 - bg_threshold)
