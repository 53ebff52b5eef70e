"""Radius pair indexing and affinity labels, written once for labels, network and random walk.

The pairs follow PSA/SEAM ``pyutils.get_indices_of_pairs`` exactly, including its quirk:
only "from" pixels inside the window rows ``0..h-r``, cols ``r-1..w-r`` (r = radius) get
pairs, so some within-radius neighbour pairs near the left, right and bottom borders are
never in the graph. Outputs are offset-major, from-minor: element ``[d, j]`` is the pair
(``ind_from[j]``, ``ind_from[j] + dy_d * w + dx_d``).
"""
from __future__ import annotations

import numpy as np

from tool.contract import IGNORE_LABEL

# Scores below this everywhere mark a pooled cell that is pure crop padding (reference 3b).
NO_SCORE_EPS = 1e-5


def radius_offsets(radius: int) -> list[tuple[int, int]]:
    """The (dy, dx) offsets to the later neighbours within ``radius``, in the reference order.

    ``(0, 1..r-1)`` then ``(1..r-1, -(r-1)..r-1)`` with ``dy^2 + dx^2 < r^2``: 34 for r = 5.
    """
    if radius < 1:
        raise ValueError(f"radius must be >= 1, got {radius}")
    offsets = [(0, dx) for dx in range(1, radius)]
    offsets += [(dy, dx) for dy in range(1, radius) for dx in range(-radius + 1, radius)
                if dx * dx + dy * dy < radius * radius]
    return offsets


def affinity_radius(h: int, w: int, radius: int = 5) -> int:
    """SEAM's radius rule for small feature maps: ``(min_edge - 1) // 2`` below ``2r + 1``.

    A 56x56 (crop 448) or larger map keeps ``radius``; an 8x8 map gets 3. PSA always uses 5.
    """
    min_edge = min(h, w)
    return (min_edge - 1) // 2 if min_edge < 2 * radius + 1 else radius


def _from_window(radius: int, h: int, w: int) -> tuple[int, int]:
    """Height and width of the window of "from" pixels; raises if it is empty."""
    floor = radius - 1
    window_h, window_w = h - floor, w - 2 * floor
    if radius < 2 or window_h <= 0 or window_w <= 0:
        raise ValueError(f"a {h}x{w} map has no radius-{radius} pairs (need radius >= 2, "
                         f"h >= {radius}, w >= {2 * radius - 1}); use affinity_radius() to pick the radius")
    return window_h, window_w


def pair_indices(radius: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat node indices of the radius pairs on an h x w map (row-major ``p = y * w + x``).

    Returns ``ind_from`` (n_from,) and ``ind_to`` (n_offsets * n_from,), offset-major, exactly
    as ``get_indices_of_pairs(radius, (h, w))``.
    """
    window_h, window_w = _from_window(radius, h, w)
    floor = radius - 1
    full = np.arange(h * w, dtype=np.int64).reshape(h, w)
    ind_from = full[:window_h, floor:floor + window_w].reshape(-1)
    steps = np.array([dy * w + dx for dy, dx in radius_offsets(radius)], dtype=np.int64)
    ind_to = (steps[:, None] + ind_from[None, :]).reshape(-1)
    return ind_from, ind_to


def affinity_pair_labels(label: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pair labels (reference ``ExtractAffinityLabelInRadius``) of an HxW uint8 label map.

    Returns float32 arrays (n_offsets, n_from) in the order of :func:`pair_indices`:
    ``bg_pos`` both ends 0; ``fg_pos`` same foreground class, both valid; ``neg`` different
    classes, both valid (255 = unknown is never valid).
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label must be HxW, got shape {label.shape}")
    h, w = label.shape
    ind_from, ind_to = pair_indices(radius, h, w)
    flat = label.reshape(-1)
    label_from = flat[ind_from][None, :]
    label_to = flat[ind_to].reshape(-1, ind_from.size)
    valid = (label_from < IGNORE_LABEL) & (label_to < IGNORE_LABEL)
    same = label_from == label_to
    bg_pos = same & (label_from == 0)
    fg_pos = same & (label_from != 0) & valid
    neg = ~same & valid
    return bg_pos.astype(np.float32), fg_pos.astype(np.float32), neg.astype(np.float32)


def pool_score_stack(stack: np.ndarray, stride: int = 8) -> np.ndarray:
    """Block mean of an HxWxK score stack by ``stride`` (``skimage block_reduce(np.mean)``).

    A partial block at the bottom/right is padded with zeros first, as block_reduce does.
    """
    stack = np.asarray(stack, dtype=np.float32)
    if stack.ndim != 3:
        raise ValueError(f"score stack must be HxWxK, got shape {stack.shape}")
    h, w, k = stack.shape
    pad_h, pad_w = -h % stride, -w % stride
    if pad_h or pad_w:
        stack = np.pad(stack, ((0, pad_h), (0, pad_w), (0, 0)))
    blocks = stack.reshape((h + pad_h) // stride, stride, (w + pad_w) // stride, stride, k)
    return blocks.mean(axis=(1, 3), dtype=np.float32)


def fuse_crf_labels(la_stack: np.ndarray, ha_stack: np.ndarray) -> np.ndarray:
    """Combine low-alpha and high-alpha CRF score stacks (HxWxK each, channel 0 = bg) into a label.

    The la arg-max class where la is confident foreground; 255 where la says background;
    0 where ha (weak background) still says background; 255 where no channel of either
    stack reaches 1e-5 (crop padding). Values are stack channel indices, not class ids.
    """
    la_stack, ha_stack = np.asarray(la_stack), np.asarray(ha_stack)
    if la_stack.shape != ha_stack.shape or la_stack.ndim != 3:
        raise ValueError(f"la and ha stacks must be HxWxK of one shape, got {la_stack.shape} and {ha_stack.shape}")
    label_la = np.argmax(la_stack, axis=-1).astype(np.uint8)
    label_ha = np.argmax(ha_stack, axis=-1).astype(np.uint8)
    no_score = np.maximum(la_stack.max(axis=-1), ha_stack.max(axis=-1)) < NO_SCORE_EPS
    label = label_la.copy()
    label[label_la == 0] = IGNORE_LABEL
    label[label_ha == 0] = 0
    label[no_score] = IGNORE_LABEL
    return label
