"""Numeric vectors produced by the reference SEAM/PSA/DeepLab code (see reference/README.md).

They ship with the tests, so every reference comparison runs on a fresh clone; a missing
file is an error, never a skip.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

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
