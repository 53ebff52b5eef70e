"""Numeric vectors produced by the reference SEAM/PSA/DeepLab code (see reference/README.md).

They ship with the tests, so every reference comparison runs on a fresh clone; a missing
file is an error, never a skip.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from tool.random_walk import AffinityGraph

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"


def reference_path(name: str) -> Path:
    path = REFERENCE_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"reference vector {path} is missing from the repository")
    return path


def load_reference(name: str) -> Any:
    """An ``.npz`` of the reference directory (a lazily read mapping of arrays)."""
    return np.load(reference_path(name))


def reference_keys(model_name: str) -> dict[str, list]:
    """Parameter/buffer names and shapes of a reference model, from ``resnet38_keys.json``."""
    with open(reference_path("resnet38_keys.json"), encoding="utf-8") as handle:
        return json.load(handle)[model_name]


def portable_value(name: str, shape: tuple) -> np.ndarray:
    """The reference README's framework-independent fill rule for one state-dict entry."""
    if name.endswith("num_batches_tracked"):
        return np.array(0, dtype=np.int64)
    rng = np.random.default_rng(zlib.crc32(name.encode("utf-8")))
    if len(shape) == 4:
        value = rng.standard_normal(shape) * np.sqrt(1.0 / float(np.prod(shape[1:])))
    elif name.endswith("running_mean"):
        value = rng.uniform(-0.2, 0.2, shape)
    elif name.endswith("running_var"):
        value = rng.uniform(0.5, 2.0, shape)
    elif name.endswith("weight"):
        value = rng.uniform(0.5, 1.5, shape)
    elif name.endswith("bias"):
        value = rng.uniform(-0.2, 0.2, shape)
    else:
        raise KeyError(f"no portable rule for {name}")
    return value.astype(np.float32)


def portable_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every entry replaced by its portable fill (same keys and shapes)."""
    return {k: torch.from_numpy(portable_value(k, tuple(v.shape))) for k, v in state.items()}


def reference_graph() -> AffinityGraph:
    """The reference random walk's affinities (radius 5 on its 12 x 15 grid) as a graph."""
    common = load_reference("rw_common.npz")
    return AffinityGraph.from_pairs(torch.from_numpy(common["aff_pairs"][0]), 5, (12, 15))


def reference_cam_dict() -> dict[int, np.ndarray]:
    """The CAM dict the reference random walk started from."""
    common = load_reference("rw_common.npz")
    return {int(k): v for k, v in zip(common["cam_keys"], common["cam_values"])}


def reference_msa_keys() -> dict:
    """State-dict names, shapes, aliases and parameter groups of the MSA reference models."""
    with open(reference_path("msa/msa_keys.json"), encoding="utf-8") as handle:
        return json.load(handle)
