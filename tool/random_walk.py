"""Random-walk propagation of CAM scores over the AffinityNet graph, without a dense N x N matrix.

The reference (PSA/SEAM ``infer_aff.py``) builds the dense affinity A (symmetric, unit
diagonal, radius-5 pairs), raises it to ``beta``, column-normalises it into T and squares
T ``logt`` times: O(N^3) time and O(N^2) memory. Here T stays sparse (at most 2 * 34 + 1
entries a row, CSR with int32 indices) and only (N, C) score blocks are ever dense.

Since A is symmetric, ``(scores @ T)^T = M scores^T`` with ``M = D^-1 A`` (D the column sums
of A): we keep M and apply it to the (N, C) score columns. ``M^n`` (n = 2^logt) is reached
either by n sparse products ("power", exact) or, by default, by a truncated Chebyshev series
of x^n ("chebyshev"): M is similar to the symmetric ``D^-1/2 A D^-1/2``, whose spectrum lies
in [-1, 1], and x^n = sum_k c_k T_k(x) there with c_k >= 0 summing to 1, so dropping the
terms past degree K changes the result by at most sum_{k>K} c_k (times sqrt(max D / min D)
<= sqrt(69) in norm). The tail falls like exp(-K^2 / 2n): for n = 256 and a tail of 1e-12,
K = 112 products instead of 256, at float64 a change of about 1e-12 of the scores.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from tool.affinity import pair_indices
from tool.cam import bg_score
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
    """The sparse CSR matrix ``M = D^-1 A^beta`` (= T transposed), int32 indices, on the graph's device.

    A has 1 on the diagonal and the pair affinity at both (from, to) and (to, from); the
    reference's pairs never repeat, so no entry is summed twice. Built as a table of
    (node, neighbour offset) slots, offsets sorted by flat step ``dy * w + dx`` (so each CSR row
    is sorted without an argsort); absent pairs (the reference's border quirk) are left out.
    """
    num_nodes, device = graph.num_nodes, graph.weights.device
    num_offsets, num_from = graph.weights.shape
    to_nodes = graph.ind_to.view(num_offsets, num_from)
    forward_steps = to_nodes[:, 0] - graph.ind_from[0]                  # dy * w + dx, all > 0
    # Sorted by flat step = sorted by (dy, dx), since |dx| < w / 2 for any map with pairs.
    steps, slot_of = torch.unique(torch.cat([forward_steps, -forward_steps, forward_steps.new_zeros(1)]),
                                  sorted=True, return_inverse=True)
    forward_slot, backward_slot, self_slot = (slot_of[:num_offsets, None], slot_of[num_offsets:-1, None],
                                              slot_of[-1])
    # Power in float32 as the reference does, then widen. masked_select, not boolean indexing:
    # the latter goes through an (nnz, 2) int64 index, the largest temporary of all.
    edge_weights = (graph.weights.detach().float() ** beta).to(dtype)  # (n_offsets, n_from)
    affinity = torch.zeros(num_nodes, steps.numel(), dtype=dtype, device=device)   # by (node, offset slot)
    present = torch.zeros(num_nodes, steps.numel(), dtype=torch.bool, device=device)
    for nodes, slots in ((graph.ind_from[None, :], forward_slot), (to_nodes, backward_slot)):
        affinity[nodes, slots] = edge_weights
        present[nodes, slots] = True
    affinity[:, self_slot] = 1
    present[:, self_slot] = True
    affinity /= affinity.sum(dim=1, keepdim=True)
    values = torch.masked_select(affinity, present)
    del affinity
    nodes = torch.arange(num_nodes, dtype=torch.int32, device=device)
    columns = torch.masked_select(nodes[:, None] + steps.to(torch.int32)[None, :], present)
    row_counts = present.sum(dim=1)
    crow = torch.cat([row_counts.new_zeros(1), torch.cumsum(row_counts, 0)]).to(torch.int32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, columns, values, (num_nodes, num_nodes), check_invariants=False)


def chebyshev_power_coefficients(power: int, tolerance: float) -> list[float]:
    """``c_0 .. c_K`` with ``|x^power - sum_k c_k T_k(x)| <= tolerance`` on [-1, 1], K as small as that allows.

    Exact series: ``x^n = 2^(1-n) sum_j binom(n, j) T_(n-2j)(x)`` (the T_0 term halved); its
    coefficients are >= 0 and sum to 1, so the error of the truncation is the sum of the
    dropped ones. Computed in integers (units of 2^-n) so large n does not overflow.
    """
    if power < 1:
        raise ValueError(f"power must be >= 1, got {power}")
    scaled = [0] * (power + 1)                                          # c_k * 2^power
    for j in range(power // 2 + 1):
        scaled[power - 2 * j] = math.comb(power, j) * (1 if power == 2 * j else 2)
    degree, dropped = power, 0
    while degree > 0 and Fraction(dropped + scaled[degree], 2 ** power) <= tolerance:
        dropped += scaled[degree]
        degree -= 1
    return [coefficient / 2 ** power for coefficient in scaled[: degree + 1]]


def _power_walk(operator: torch.Tensor, columns: torch.Tensor, steps: int) -> torch.Tensor:
    """``operator^steps @ columns`` by repeated products into two alternating buffers."""
    spare = torch.empty_like(columns)
    for _ in range(steps):
        torch.mm(operator, columns, out=spare)
        columns, spare = spare, columns
    return columns


def _chebyshev_walk(operator: torch.Tensor, columns: torch.Tensor, coefficients: list[float]) -> torch.Tensor:
    """``sum_k c_k T_k(operator) @ columns`` by the three-term recurrence T_(k+1) = 2 M T_k - T_(k-1)."""
    previous, current = columns, operator @ columns
    result = previous * coefficients[0]
    result.add_(current, alpha=coefficients[1])
    following = torch.empty_like(columns)
    for coefficient in coefficients[2:]:
        torch.addmm(previous, operator, current, beta=-1, alpha=2, out=following)
        if coefficient:                                                 # odd/even terms of x^n are 0
            result.add_(following, alpha=coefficient)
        previous, current, following = current, following, previous
    return result


WALK_METHODS = ("chebyshev", "power")


@contextlib.contextmanager
def _cpu_threads_at_most(limit: int | None, device: torch.device) -> Iterator[None]:
    """Lower torch's intra-op CPU threads to ``limit`` for the block, then restore them."""
    previous = torch.get_num_threads()
    if limit is None or device.type != "cpu" or previous <= limit:
        yield
        return
    torch.set_num_threads(limit)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def propagate(operator: torch.Tensor, scores: torch.Tensor, logt: int, method: str = "chebyshev",
              tolerance: float = 1e-12, max_threads: int | None = 1) -> torch.Tensor:
    """``scores @ T^(2^logt)`` for scores (C, N) with the sparse ``operator`` M = T^T; returns (C, N).

    ``method="power"``: 2^logt sparse products (exact). ``"chebyshev"``: the Chebyshev series of
    x^(2^logt) truncated where the dropped coefficients sum to ``tolerance`` (see the module
    docstring); it falls back to "power" when that would not save products.
    ``max_threads``: torch CPU threads for the walk (None: torch's setting). The walk is a chain
    of ~100 small products, each a few ms: extra threads mostly wait at barriers. On the shared
    2-core machine a 64x64 walk took 0.11 s with 1 thread and 0.6-2.1 s with 2.
    """
    if method not in WALK_METHODS:
        raise ValueError(f"unknown random-walk method {method!r}, expected one of {WALK_METHODS}")
    steps = 2 ** logt
    # A private (N, C) copy: the buffers below are written in place.
    columns = scores.to(device=operator.device, dtype=operator.dtype).t().clone(memory_format=torch.contiguous_format)
    coefficients = chebyshev_power_coefficients(steps, tolerance) if method == "chebyshev" else []
    with _cpu_threads_at_most(max_threads, operator.device):
        if not 1 < len(coefficients) <= steps:
            return _power_walk(operator, columns, steps).t()
        return _chebyshev_walk(operator, columns, coefficients).t()


def random_walk(graph: AffinityGraph, scores: torch.Tensor, beta: float = 8, logt: int = 8,
                dtype: torch.dtype = torch.float64, method: str = "chebyshev",
                tolerance: float = 1e-12, max_threads: int | None = 1) -> torch.Tensor:
    """Propagate score maps (C, h, w) through the random walk; returns float32 (C, h, w).

    float64 by default: 2^logt float32 products drift like the reference's float32 squarings
    (about 1e-5 relative), and the labels are an arg-max of close scores. ``method``,
    ``tolerance`` and ``max_threads``: see :func:`propagate`.
    """
    if tuple(scores.shape[1:]) != graph.feat_hw:
        raise ValueError(f"scores of shape {tuple(scores.shape)} do not match the {graph.feat_hw} graph")
    flat = scores.to(graph.weights.device).reshape(scores.shape[0], -1)
    # The walk is linear: an all-zero channel (a class absent from the CAM dict) stays zero.
    active = torch.nonzero(flat.any(dim=1)).flatten()
    walked = torch.zeros(flat.shape, dtype=torch.float32, device=flat.device)
    if active.numel():
        with _cpu_threads_at_most(max_threads, graph.weights.device):
            operator = walk_operator(graph, beta, dtype)
            walked[active] = propagate(operator, flat[active], logt, method, tolerance, max_threads).float()
    return walked.reshape(scores.shape)


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
    full[0] = bg_score(full[1:], alpha)[0]
    padded_h, padded_w = padded_size(image_hw)
    full = np.pad(full, ((0, 0), (0, padded_h - height), (0, padded_w - width)))
    return F.avg_pool2d(torch.from_numpy(full), FEATURE_STRIDE, FEATURE_STRIDE)


def rw_scores_from_crf_dict(crf_dict: Mapping[int, np.ndarray], num_classes: int, image_hw: tuple[int, int],
                            source: str = "CRF dict") -> torch.Tensor:
    """Score maps for the walk from a CRF dict (keys 0 = background, c + 1 = class c: the dense-CRF
    marginals of the seeds, refine_mask.py --out_crf), zero-padded and 8 x 8 average-pooled as
    :func:`rw_scores_from_cam_dict`; the background is the CRF's own, no alpha."""
    height, width = image_hw
    full = np.zeros((num_classes + 1, height, width), dtype=np.float32)
    for key, scores in crf_dict.items():
        if not 0 <= int(key) <= num_classes:
            raise DataError(f"{source}: key {key} is outside 0..{num_classes}")
        if tuple(scores.shape) != (height, width):
            raise DataError(f"{source}: key {key} map is {scores.shape[0]}x{scores.shape[1]}, "
                            f"the image is {height}x{width}")
        full[int(key)] = scores
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
