"""Dense CRF (pydensecrf) and SEAM's CRF-with-alpha, written once for every stage.

``dense_crf`` is SEAM/PSA ``imutils.crf_inference`` (and the DeepLab codebase's
``DenseCRF``): unary = -log(clip(probs, 1e-5, 1)), a Gaussian (position) and a bilateral
(position + RGB) Potts kernel, mean-field inference. pydensecrf is imported when first
used, so the rest of the pipeline imports without it.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterable, Mapping

import numpy as np

from tool.cam import labels_from_scores, scores_with_background
from tool.contract import crf_dir
from tool.fileio import save_npy


@dataclasses.dataclass(frozen=True)
class CrfParams:
    """Dense CRF settings: ``dense_crf(image, probs, params)``."""

    iterations: int = 10
    gauss_sxy: float = 3
    gauss_compat: float = 3
    bilateral_sxy: float = 80
    bilateral_srgb: float = 13
    bilateral_compat: float = 10


# Seeds, low/high-alpha CRF dicts and CRF pseudo masks (DESIGN Stage 2/3; SEAM crf_inference).
SEED_CRF = CrfParams()
# DeepLabV1 test-time CRF (DESIGN Stage 4-5; semantic-segmentation-codebase DenseCRF).
DEEPLAB_TEST_CRF = CrfParams(iterations=1, bilateral_sxy=32)
# DeepLabV2 test-time CRF (kazuto1011/deeplab-pytorch configs/voc12.yaml: ITER_MAX 10, POS_W 3,
# POS_XY_STD 1, BI_W 4, BI_XY_STD 67, BI_RGB_STD 3).
DEEPLABV2_TEST_CRF = CrfParams(iterations=10, gauss_sxy=1, gauss_compat=3, bilateral_sxy=67,
                               bilateral_srgb=3, bilateral_compat=4)


def wrapped_mean_subtracted(image: np.ndarray, mean: tuple[float, float, float]) -> np.ndarray:
    """What DeepLabV2's ``main.crf`` hands the CRF instead of the image (its bug, for a flag):
    float32(image) - mean cast to uint8, i.e. truncated toward zero, then modulo 256, so pixels
    darker than the mean wrap to bright values. ``image`` and ``mean`` in the same channel order."""
    subtracted = image.astype(np.float32) - np.asarray(mean, dtype=np.float64)
    subtracted = subtracted.astype(np.float32)
    return np.mod(np.trunc(subtracted).astype(np.int64), 256).astype(np.uint8)
# IRN/SIPE's CRF of confident regions (imutils.crf_inference_label; DESIGN "IRN refinement").
IR_LABEL_CRF = CrfParams(iterations=10, bilateral_sxy=50, bilateral_srgb=5)


def _import_pydensecrf():
    try:
        import pydensecrf.densecrf as densecrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as error:
        raise ImportError("the dense CRF needs pydensecrf, which is installed by the package "
                          "'pydensecrf2' (pip install pydensecrf2)") from error
    return densecrf, unary_from_softmax


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CrfParams = SEED_CRF) -> np.ndarray:
    """Mean-field dense CRF marginals (K, H, W) float32 for an HxWx3 uint8 RGB image.

    ``probs`` (K, H, W) need not sum to 1: as in the reference, they are clipped to
    [1e-5, 1] before -log, so scores above 1 count as 1.
    """
    densecrf, unary_from_softmax = _import_pydensecrf()
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be HxWx3 uint8 RGB, got {image.dtype} {image.shape}")
    num_labels, height, width = probs.shape
    if (height, width) != image.shape[:2]:
        raise ValueError(f"probs are {height}x{width} but the image is {image.shape[0]}x{image.shape[1]}")
    crf = densecrf.DenseCRF2D(width, height, num_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=params.gauss_sxy, compat=params.gauss_compat)
    # pydensecrf needs a writable C-contiguous buffer (np.asarray of a PIL image is read-only).
    crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb,
                             rgbim=np.array(image, order="C"), compat=params.bilateral_compat)
    marginals = crf.inference(params.iterations)
    return np.asarray(marginals, dtype=np.float32).reshape((num_labels, height, width))


def crf_label_inference(image: np.ndarray, labels: np.ndarray, num_labels: int, params: CrfParams,
                        gt_prob: float = 0.7) -> np.ndarray:
    """IRN ``imutils.crf_inference_label``: a dense CRF from a hard label map (HxW ints < num_labels;
    unary ``unary_from_labels(gt_prob, zero_unsure=False)``), arg-max of the marginals, int64 HxW."""
    densecrf, _ = _import_pydensecrf()
    from pydensecrf.utils import unary_from_labels
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be HxWx3 uint8 RGB, got {image.dtype} {image.shape}")
    height, width = labels.shape
    crf = densecrf.DenseCRF2D(width, height, num_labels)
    crf.setUnaryEnergy(unary_from_labels(labels, num_labels, gt_prob=gt_prob, zero_unsure=False))
    crf.addPairwiseGaussian(sxy=params.gauss_sxy, compat=params.gauss_compat)
    crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb,
                             rgbim=np.array(image, order="C"), compat=params.bilateral_compat)
    marginals = np.asarray(crf.inference(params.iterations)).reshape((num_labels, height, width))
    return np.argmax(marginals, axis=0)


def crf_with_alpha(image: np.ndarray, cam_dict: Mapping[int, np.ndarray], alpha: float,
                   params: CrfParams = SEED_CRF) -> dict[int, np.ndarray]:
    """SEAM ``_crf_with_alpha``: CRF over [(1 - max CAM)^alpha, CAMs] -> CRF dict.

    Keys: 0 = background, then ``key + 1`` for each CAM dict key, in the CAM dict's order.
    An image without foreground classes gives ``{0: ones}``.
    """
    keys, probs = scores_with_background(cam_dict, alpha, image_hw=image.shape[:2])
    if not keys:
        return {0: probs[0]}
    marginals = dense_crf(image, probs, params)
    crf_dict = {0: marginals[0]}
    crf_dict.update({key + 1: marginals[index + 1] for index, key in enumerate(keys)})
    return crf_dict


def crf_label(image: np.ndarray, cam_dict: Mapping[int, np.ndarray], alpha: float,
              params: CrfParams = SEED_CRF) -> np.ndarray:
    """CRF pseudo mask: argmax of the CRF-with-alpha marginals, uint8 HxW (0 bg, c + 1 fg).

    Ties go to the lowest class id.
    """
    crf_dict = crf_with_alpha(image, cam_dict, alpha, params)
    class_ids = sorted(crf_dict)
    return labels_from_scores(class_ids, np.stack([crf_dict[k] for k in class_ids]))


def write_crf_dicts(image: np.ndarray, cam_dict: Mapping[int, np.ndarray], image_id: str,
                    out_crf: str, alphas: Iterable[float], params: CrfParams = SEED_CRF) -> list[str]:
    """Write one CRF dict per alpha to ``crf_dir(out_crf, alpha)/<image_id>.npy`` (atomic).

    Used by infer_seed.py for the low/high-alpha ("la"/"ha") dicts AffinityNet trains from.
    Returns the written paths.
    """
    paths = []
    for alpha in alphas:
        path = os.path.join(crf_dir(out_crf, alpha), f"{image_id}.npy")
        save_npy(path, crf_with_alpha(image, cam_dict, alpha, params))
        paths.append(path)
    return paths
