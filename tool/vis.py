"""Pictures for people: colourised label maps, CAM overlays, affinity-matrix images.

Pure array-in, array-out functions (uint8 RGB), so the inference stages and the results
page draw the same pictures. No maths that another stage relies on lives here.
"""
from __future__ import annotations

import numpy as np
from matplotlib import colormaps

from tool.contract import VOC_PALETTE


def colorize_label(label: np.ndarray) -> np.ndarray:
    """HxW uint8 label map -> HxWx3 uint8 RGB with the VOC palette (255 = cream)."""
    return VOC_PALETTE.reshape(-1, 3)[label.astype(np.uint8)]


def heatmap(values: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """Map an array of values in [0, 1] to uint8 RGB with a matplotlib colour map."""
    rgba = colormaps[cmap](np.clip(values, 0.0, 1.0))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def blend(image: np.ndarray, overlay: np.ndarray, weight: float = 0.5) -> np.ndarray:
    """Alpha-blend two HxWx3 uint8 images."""
    mixed = image.astype(np.float32) * (1 - weight) + overlay.astype(np.float32) * weight
    return mixed.round().clip(0, 255).astype(np.uint8)


def cam_overlay(image: np.ndarray, cam: np.ndarray, weight: float = 0.5) -> np.ndarray:
    """One class's CAM (HxW in [0, 1]) drawn over the RGB image as a jet heat map."""
    return blend(image, heatmap(cam), weight)


def label_overlay(image: np.ndarray, label: np.ndarray, weight: float = 0.6) -> np.ndarray:
    """A label map drawn over the image; background pixels keep the image."""
    colour = colorize_label(label)
    mixed = blend(image, colour, weight)
    return np.where((label == 0)[..., None], image, mixed)


def affinity_matrix_picture(affinity: np.ndarray, pixel_labels: np.ndarray, size: int = 256) -> np.ndarray:
    """The N x N affinity matrix as a heat map, rows and columns grouped by pixel label.

    Sorting the pixels by their seed class turns a semantically consistent affinity into
    visible blocks on the diagonal (the AVC paper's affinity-map comparison).
    """
    order = np.argsort(pixel_labels.reshape(-1), kind="stable")
    sorted_affinity = affinity[np.ix_(order, order)]
    # Each column of the PCM affinity sums to 1: rescale by the column maximum to show structure.
    scaled = sorted_affinity / np.maximum(sorted_affinity.max(axis=0, keepdims=True), 1e-12)
    picture = heatmap(scaled, cmap="viridis")
    index = np.linspace(0, picture.shape[0] - 1, size).round().astype(int)
    return picture[np.ix_(index, index)]


def tile_row(images: list[np.ndarray], gap: int = 4) -> np.ndarray:
    """Place equally tall RGB images side by side with a white gap."""
    height = max(image.shape[0] for image in images)
    parts = []
    for image in images:
        padded = np.full((height, image.shape[1], 3), 255, np.uint8)
        padded[: image.shape[0]] = image
        parts += [padded, np.full((height, gap, 3), 255, np.uint8)]
    return np.concatenate(parts[:-1], axis=1)
