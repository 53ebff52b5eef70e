"""IRN's pseudo masks: boundary -> affinity -> random walk -> labels (IRN ``make_sem_seg_labels``,
SIPE / AE-SIPE ``make_seg_labels``), through the project's sparse walk (:mod:`tool.random_walk`).

The reference pads the boundary map with 1.0 (``r`` columns left and right, ``r`` rows at the
bottom) so every pixel is a path source, takes ``1 - max boundary`` along each radius-5 path,
builds the dense N x N affinity, raises it to ``beta``, column-normalises it into T and squares
T ``exp_times`` times; then ``rw = (cam * (1 - edge)) @ T``. Here the same pairs become an
:class:`~tool.random_walk.AffinityGraph` on the padded grid (a pair that touches the padding has
affinity 1 - 1 = 0, so the padding walks nowhere) and ``T^(2^logt)`` is applied to the score
rows without ever forming a matrix. Post-processing: bilinear x4, crop, divide by the global
max, then the variant's background rule (IRN: a constant 0.25 channel; SIPE / AE-SIPE: the
method's own background channel walked with the classes, CAMs raised to 1.5), arg-max.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tool.path_index import INFER_RADIUS, PathIndex, edge_to_affinity
from tool.random_walk import AffinityGraph, random_walk

FEATURE_STRIDE = 4


@dataclass(frozen=True)
class SegLabelVariant:
    """The background rule: a constant ``bg_threshold`` channel after the walk (IRN) or the
    method's own background walked with the classes (``own_background``); CAMs ^ ``cam_power``."""

    name: str
    bg_threshold: float = 0.25
    own_background: bool = False
    cam_power: float = 1.0


SEG_LABEL_VARIANTS: dict[str, SegLabelVariant] = {
    "irn": SegLabelVariant("irn"),
    "sipe": SegLabelVariant("sipe", own_background=True, cam_power=1.5),
    "ae_sipe": SegLabelVariant("ae_sipe", own_background=True, cam_power=1.5),
}


def boundary_graph(edge: torch.Tensor, radius: int = INFER_RADIUS) -> AffinityGraph:
    """The walk's graph of a boundary map (h, w) on the reference's padded (h + r, w + 2r) grid."""
    padded = F.pad(edge.reshape(1, 1, *edge.shape[-2:]).float(), (radius, radius, 0, radius), value=1.0)
    height, width = padded.shape[-2:]
    index = PathIndex(radius, height, width)
    affinity = edge_to_affinity(padded, index)[0]
    order = torch.as_tensor(index.offset_order, device=affinity.device)
    return AffinityGraph.from_pairs(affinity[order], radius, (height, width))


def propagate_to_edge(scores: torch.Tensor, edge: torch.Tensor, radius: int = INFER_RADIUS, beta: float = 10,
                      logt: int = 8) -> torch.Tensor:
    """The reference's ``propagate_to_edge``: scores (C, h, w) masked by ``1 - edge`` and walked
    ``2^logt`` steps over the boundary affinities^beta; returns float32 (C, h, w)."""
    height, width = scores.shape[-2:]
    edge = edge.reshape(height, width).float()
    masked = scores.float() * (1 - edge)
    padded = F.pad(masked, (radius, radius, 0, radius))
    walked = random_walk(boundary_graph(edge, radius), padded, beta=beta, logt=logt)
    return walked[:, :height, radius:radius + width]


def walk_scores(variant: SegLabelVariant, cams: np.ndarray, background: np.ndarray | None,
                grid_hw: tuple[int, int]) -> torch.Tensor:
    """The rows the walk starts from on the boundary grid: [background,] CAMs, resized to the grid
    (bilinear, align_corners=False, by size as SIPE does), raised to ``cam_power`` (numpy's power,
    as the reference, background included)."""
    stack = cams if background is None else np.concatenate([background[None], cams])
    stack = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32))
    if tuple(stack.shape[-2:]) != tuple(grid_hw):
        stack = F.interpolate(stack[None], size=tuple(grid_hw), mode="bilinear", align_corners=False)[0]
    if variant.cam_power != 1:
        stack = torch.from_numpy(np.power(stack.numpy(), np.float32(variant.cam_power)))
    return stack


def walked_to_label(variant: SegLabelVariant, walked: torch.Tensor, class_ids: list[int],
                    image_hw: tuple[int, int]) -> np.ndarray:
    """Upsample x4 (bilinear), crop to the image, divide by the global max, background rule,
    arg-max -> label values (H, W) uint8."""
    up = F.interpolate(walked[:, None].float(), scale_factor=FEATURE_STRIDE, mode="bilinear",
                       align_corners=False)[:, 0, : image_hw[0], : image_hw[1]]
    up = up / torch.max(up)
    if not variant.own_background:  # the constant background channel, after the normalisation
        up = F.pad(up, (0, 0, 0, 0, 1, 0), value=variant.bg_threshold)
    values = [0] + list(class_ids)
    index = torch.argmax(up, dim=0).cpu().numpy()
    return np.asarray(values, dtype=np.uint8)[index]


def seg_label(variant: SegLabelVariant, edge: torch.Tensor, class_ids: list[int], cams: np.ndarray,
              background: np.ndarray | None, image_hw: tuple[int, int], radius: int = INFER_RADIUS,
              beta: float = 10, logt: int = 8) -> np.ndarray:
    """The pseudo mask (H, W) uint8 of one image from its boundary (h, w) and CAMs (any size).

    An image without classes is all background (IRN: the constant channel wins; SIPE: only the
    background row)."""
    if variant.own_background and background is None:
        raise ValueError(f"variant {variant.name} needs the method's own background map")
    if not class_ids:
        return np.zeros(image_hw, dtype=np.uint8)
    grid_hw = tuple(edge.shape[-2:])
    scores = walk_scores(variant, cams, background if variant.own_background else None, grid_hw)
    walked = propagate_to_edge(scores.to(edge.device), edge, radius, beta, logt)
    return walked_to_label(variant, walked, class_ids, image_hw)
