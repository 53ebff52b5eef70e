"""IRN's inter-pixel paths: which pixels lie between two pixels, affinities from a boundary map,
and pair labels (IRN ``misc/indexing.py`` ``PathIndex`` / ``edge_to_affinity`` and
``voc12/dataloader.py`` ``GetAffinityLabelFromIndices``; SIPE/AE-SIPE copy them).

The directions are those of :func:`tool.affinity.radius_offsets` (the half-plane of offsets
with ``dy^2 + dx^2 < r^2``) and the source pixels those of :func:`tool.affinity.pair_indices`
(rows ``0..h-r``, columns ``r-1..w-r``): the same window as PSA's pairs. What IRN adds is the
path of each direction, a thick digital line, and its own channel order: directions grouped by
path length (shortest first), generation order within a group. Every pair tensor here is in
that group order, ``(n_directions, n_sources)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from tool.affinity import pair_indices, radius_offsets
from tool.contract import IGNORE_LABEL

# IRN trains its boundaries with radius 10 on the stride-4 grid and walks with radius 5.
TRAIN_RADIUS = 10
INFER_RADIUS = 5


def direction_path(dy: int, dx: int) -> list[tuple[int, int]]:
    """The pixels from (0, 0) to (dy, dx): every (y, x) of their bounding box whose squared
    distance to the line, ``(dy x - dx y)^2 / (dy^2 + dx^2)``, is below 1; destination first,
    source last (stable sort by ``-(|y| + |x|)``, as the reference)."""
    length_sq = dy * dy + dx * dx
    coords = [(y, x) for y in range(min(0, dy), max(0, dy) + 1) for x in range(min(0, dx), max(0, dx) + 1)
              if (dy * x - dx * y) ** 2 / length_sq < 1]
    coords.sort(key=lambda c: -abs(c[0]) - abs(c[1]))
    return coords


def check_path_size(radius: int, height: int, width: int) -> None:
    """The reference's limit for a map: sources exist only when ``h > r - 1`` and ``w > 2 (r - 1)``
    (it silently indexes garbage below that; we refuse)."""
    floor = radius - 1
    if radius < 2 or height <= floor or width <= 2 * floor:
        raise ValueError(f"a {height}x{width} map is too small for radius-{radius} paths "
                         f"(need height >= {floor + 1} and width >= {2 * floor + 1})")


@dataclass(frozen=True)
class PathIndex:
    """The paths of radius ``radius`` on a ``height`` x ``width`` map (IRN's ``PathIndex``)."""

    radius: int
    height: int
    width: int

    def __post_init__(self) -> None:
        check_path_size(self.radius, self.height, self.width)

    @property
    def radius_floor(self) -> int:
        return self.radius - 1

    @cached_property
    def search_paths(self) -> list[np.ndarray]:
        """Per path length (ascending): (n_k, len_k, 2) int64 (dy, dx) of each path pixel."""
        by_length: dict[int, list] = {}
        for dy, dx in radius_offsets(self.radius):
            path = direction_path(dy, dx)
            by_length.setdefault(len(path), []).append(path)
        return [np.asarray(by_length[length], dtype=np.int64) for length in sorted(by_length)]

    @cached_property
    def search_dst(self) -> np.ndarray:
        """(n_directions, 2) destination offsets in group order (the channel order)."""
        return np.concatenate([paths[:, 0] for paths in self.search_paths])

    @cached_property
    def src_indices(self) -> np.ndarray:
        return pair_indices(self.radius, self.height, self.width)[0]

    @cached_property
    def path_indices(self) -> list[np.ndarray]:
        """Per group: (n_k, len_k, n_src) int64 flat index of each path pixel of each source."""
        steps = [paths[..., 0] * self.width + paths[..., 1] for paths in self.search_paths]
        return [step[..., None] + self.src_indices for step in steps]

    @cached_property
    def dst_indices(self) -> np.ndarray:
        """(n_directions, n_src) flat index of each destination."""
        return np.concatenate([indices[:, 0] for indices in self.path_indices])

    @cached_property
    def offset_order(self) -> np.ndarray:
        """For each direction of :func:`tool.affinity.radius_offsets`, its channel here: reorders a
        group-order pair tensor into the order of :class:`tool.random_walk.AffinityGraph`."""
        channel = {tuple(dst): index for index, dst in enumerate(self.search_dst.tolist())}
        return np.array([channel[offset] for offset in radius_offsets(self.radius)], dtype=np.int64)


def edge_to_affinity(edge: torch.Tensor, path_index: PathIndex) -> torch.Tensor:
    """``1 - max`` of the boundary over each path, endpoints included: (B, n_dirs, n_src).

    ``edge`` is (B, ..., h, w) with ``h * w`` values per item on the path index's map.
    """
    flat = edge.reshape(edge.shape[0], -1)
    affinities = []
    for indices in path_index.path_indices:
        index = torch.as_tensor(indices, device=flat.device)
        values = flat[:, index.reshape(-1)].view(flat.shape[0], *index.shape)
        affinities.append(1 - values.amax(dim=2))
    return torch.cat(affinities, dim=1)


def path_pair_labels(label: np.ndarray, path_index: PathIndex) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pair labels of a label map on the path index's grid (``GetAffinityLabelFromIndices``):
    float32 (n_dirs, n_src) ``bg_pos`` (both 0), ``fg_pos`` (same class > 0), ``neg`` (classes
    differ); a pair with 255 at either end is in none."""
    flat = np.asarray(label).reshape(-1)
    if flat.size != path_index.height * path_index.width:
        raise ValueError(f"label of shape {np.shape(label)} is not the {path_index.height}x{path_index.width} map")
    source = flat[path_index.src_indices][None, :]
    destination = flat[path_index.dst_indices]
    # The reference tests < 21 (VOC's class count); on VOC labels that is < 255, which also
    # serves datasets with more classes.
    valid = (source < IGNORE_LABEL) & (destination < IGNORE_LABEL)
    same = source == destination
    bg_pos = valid & same & (source == 0)
    fg_pos = valid & same & (source > 0)
    neg = valid & ~same
    return bg_pos.astype(np.float32), fg_pos.astype(np.float32), neg.astype(np.float32)
