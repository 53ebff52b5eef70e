"""Random-walk propagation of CAM scores over the AffinityNet graph, without a dense N x N matrix.

The reference (PSA/SEAM ``infer_aff.py``) builds the dense affinity A (symmetric, unit
diagonal, radius-5 pairs), raises it to ``beta``, column-normalises it into T and squares
T ``logt`` times: O(N^3) time and O(N^2) memory. Here T stays sparse (about 2 * 34 + 1
entries a column) and the scores go through T^(2^logt) by 2^logt sparse products, which is
the same maths: ``scores @ T^(2^logt)`` = ``scores @ T @ T @ ... @ T``.

Since A is symmetric, ``(scores @ T)^T = D^-1 A scores^T`` with D the column sums of A: we
keep the row-normalised CSR matrix ``D^-1 A`` and multiply (N, C) score columns by it.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from tool.affinity import pair_indices
from tool.fileio import DataError

FEATURE_STRIDE = 8


@dataclass(frozen=True)
class AffinityGraph:
    """Pair affinities on an h x w grid in the order of :func:`tool.affinity.pair_indices`.

    ``weights[d, j]`` is the affinity of nodes ``ind_from[j]`` and ``ind_to[d * n_from + j]``.
    """

    weights: torch.Tensor   # (n_offsets, n_from), float
    ind_from: torch.Tensor  # (n_from,) int64
    ind_to: torch.Tensor    # (n_offsets * n_from,) int64
    feat_hw: tuple[int, int]

    @property
    def num_nodes(self) -> int:
        return self.feat_hw[0] * self.feat_hw[1]

    @classmethod
    def from_pairs(cls, weights: torch.Tensor, radius: int, feat_hw: tuple[int, int]) -> "AffinityGraph":
        """Wrap pair affinities (n_offsets, n_from) computed with ``radius`` on a ``feat_hw`` map."""
        ind_from, ind_to = pair_indices(radius, *feat_hw)
        if weights.shape != (ind_to.size // ind_from.size, ind_from.size):
            raise ValueError(f"affinities of shape {tuple(weights.shape)} do not fit radius {radius} "
                             f"on a {feat_hw[0]}x{feat_hw[1]} map")
        device = weights.device
        return cls(weights, torch.from_numpy(ind_from).to(device), torch.from_numpy(ind_to).to(device),
                   (int(feat_hw[0]), int(feat_hw[1])))


def walk_operator(graph: AffinityGraph, beta: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The sparse CSR matrix ``D^-1 A^beta`` (= T transposed), on the graph's device.

    A has 1 on the diagonal and the pair affinity at both (from, to) and (to, from); the
    reference's pairs never repeat, so no entry is summed twice.
    """
    num_nodes, device = graph.num_nodes, graph.weights.device
    # Power in float32 as the reference does, then widen.
    edge_weights = (graph.weights.detach().float() ** beta).reshape(-1).to(dtype)
    ind_from = graph.ind_from.repeat(graph.weights.shape[0])
    nodes = torch.arange(num_nodes, device=device)
    rows = torch.cat([ind_from, graph.ind_to, nodes])
    cols = torch.cat([graph.ind_to, ind_from, nodes])
    values = torch.cat([edge_weights, edge_weights, torch.ones(num_nodes, dtype=dtype, device=device)])
    degree = torch.zeros(num_nodes, dtype=dtype, device=device).index_add_(0, rows, values)
    values = values / degree[rows]
    order = torch.argsort(rows * num_nodes + cols)
    row_counts = torch.bincount(rows, minlength=num_nodes)
    crow = torch.cat([torch.zeros(1, dtype=torch.int64, device=device), torch.cumsum(row_counts, 0)])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, cols[order], values[order], (num_nodes, num_nodes),
                                       check_invariants=False)


def propagate(operator: torch.Tensor, scores: torch.Tensor, logt: int) -> torch.Tensor:
    """``scores @ T^(2^logt)`` for scores (C, N), by 2^logt sparse products with ``operator``.

    The products are small and sequential: on a CPU shared with other jobs, torch's
    intra-op threads wait at barriers, so parallel workers should run with one torch thread.
    """
    columns = scores.to(operator.dtype).t().contiguous()
    for _ in range(2 ** logt):
        columns = operator @ columns
    return columns.t()


def random_walk(graph: AffinityGraph, scores: torch.Tensor, beta: float = 8, logt: int = 8,
                dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Propagate score maps (C, h, w) through the random walk; returns float32 (C, h, w).

    float64 by default: 2^logt float32 products drift like the reference's float32 squarings,
    and the labels are an arg-max of close scores.
    """
    if tuple(scores.shape[1:]) != graph.feat_hw:
        raise ValueError(f"scores of shape {tuple(scores.shape)} do not match the {graph.feat_hw} graph")
    operator = walk_operator(graph, beta, dtype)
    channels = scores.shape[0]
    walked = propagate(operator, scores.to(graph.weights.device).reshape(channels, -1), logt)
    return walked.reshape(channels, *graph.feat_hw).float()


def padded_size(image_hw: tuple[int, int], stride: int = FEATURE_STRIDE) -> tuple[int, int]:
    """Image size padded up to a multiple of ``stride`` (the reference pads bottom/right)."""
    return (math.ceil(image_hw[0] / stride) * stride, math.ceil(image_hw[1] / stride) * stride)


def rw_scores_from_cam_dict(cam_dict: Mapping[int, np.ndarray], num_classes: int, alpha: float,
                            image_hw: tuple[int, int], source: str = "CAM dict") -> torch.Tensor:
    """Score maps for the walk (num_classes + 1, Hp/8, Wp/8), float32, channel 0 = background.

    As the reference: channel k + 1 = CAM of 0-based class k, background = (1 - max CAM)^alpha
    at image size, zero padding to a multiple of 8 (background too), 8 x 8 average pooling.
    """
    height, width = image_hw
    full = np.zeros((num_classes + 1, height, width), dtype=np.float32)
    for key, cam in cam_dict.items():
        if not 0 <= int(key) < num_classes:
            raise DataError(f"{source}: class key {key} is outside 0..{num_classes - 1}")
        if tuple(cam.shape) != (height, width):
            raise DataError(f"{source}: class {key} map is {cam.shape[0]}x{cam.shape[1]}, "
                            f"the image is {height}x{width}")
        full[int(key) + 1] = cam
    full[0] = np.power(1 - np.max(full[1:], axis=0), np.float32(alpha))
    padded_h, padded_w = padded_size(image_hw)
    full = np.pad(full, ((0, 0), (0, padded_h - height), (0, padded_w - width)))
    return F.avg_pool2d(torch.from_numpy(full), FEATURE_STRIDE, FEATURE_STRIDE)


def random_walk_labels(walked_scores: torch.Tensor, image_hw: tuple[int, int]) -> np.ndarray:
    """Label map (H, W) uint8 from walked scores (C, h, w): x8 bilinear (align_corners=False,
    as the reference's ``nn.Upsample``), arg-max over channels (0 bg, c + 1 class c), crop."""
    channels, feat_h, feat_w = walked_scores.shape
    upsampled = F.interpolate(walked_scores[None].float(), size=(feat_h * FEATURE_STRIDE, feat_w * FEATURE_STRIDE),
                              mode="bilinear", align_corners=False)[0]
    label = torch.argmax(upsampled, dim=0)[: image_hw[0], : image_hw[1]]
    return label.to(torch.uint8).cpu().numpy()


def random_walk_cam_dict(graph: AffinityGraph, cam_dict: Mapping[int, np.ndarray], num_classes: int,
                         image_hw: tuple[int, int], alpha: float, beta: float = 8, logt: int = 8,
                         source: str = "CAM dict") -> np.ndarray:
    """The whole CAM side of infer_aff: scores from the CAM dict, walk, label map (H, W) uint8."""
    scores = rw_scores_from_cam_dict(cam_dict, num_classes, alpha, image_hw, source)
    if tuple(scores.shape[1:]) != graph.feat_hw:
        raise DataError(f"{source}: image {image_hw[0]}x{image_hw[1]} gives a {tuple(scores.shape[1:])} score "
                        f"grid, the affinity graph is {graph.feat_hw}")
    return random_walk_labels(random_walk(graph, scores, beta, logt), image_hw)
