"""Saliency maps for MSA's saliency variant: the reader, and noisy stand-ins for synthetic data.

MSA's ``train_cls_sal.py`` reads PoolNet saliency maps, one PNG per image id
(``<sal_dir>/<id>.png``, grey or RGB: the R channel is used), values 0..255. **Saliency
detectors such as PoolNet are trained with pixel-level labels** (DUTS), so the saliency
variant is not purely image-level supervised; results with it say so.

There is no saliency detector for the synthetic dataset, so ``python -m voc12.saliency``
writes *stand-ins*: the ground-truth foreground (itself pixel supervision, which is exactly
what a detector trained on pixel labels brings in), blurred, with missed parts, spurious
blobs and noise. They are labelled stand-ins wherever they are used.

    python -m voc12.saliency --voc12_root data/synthetic --out data/synthetic/saliency_standin
"""
from __future__ import annotations

import argparse
import os
from typing import Sequence

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from tool.cli import add_dataset_args, run_cli
from tool.contract import IGNORE_LABEL
from tool.fileio import DataError, atomic_write_bytes, atomic_write_text, read_id_list, read_label_png
from voc12 import layout

STANDIN_NOTE = "saliency stand-ins generated from the ground truth (pixel labels), not a saliency detector"


def saliency_path(sal_dir: str, image_id: str) -> str:
    return os.path.join(sal_dir, f"{image_id}.png")


def read_saliency_png(path: str, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """A saliency PNG as HxW uint8 (the R channel of an RGB file); DataError naming the file."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: saliency map does not exist")
    try:
        with Image.open(path) as image:
            values = np.asarray(image.convert("RGB"))[..., 0] if image.mode not in ("L", "P") \
                else np.asarray(image.convert("L"))
    except (OSError, ValueError, SyntaxError) as error:
        raise DataError(f"{path}: cannot decode saliency PNG ({error})") from error
    if expected_hw is not None and tuple(values.shape) != tuple(expected_hw):
        raise DataError(f"{path}: saliency size {values.shape[0]}x{values.shape[1]} does not match "
                        f"image size {expected_hw[0]}x{expected_hw[1]}")
    return values


def standin_saliency(label: np.ndarray, rng: np.random.Generator, noise: float = 0.15,
                     blobs: int = 2, miss: float = 0.25) -> np.ndarray:
    """A noisy saliency stand-in (HxW uint8) from a label map: foreground blurred, a part of
    each object's bounding box erased with probability ``miss``, ``blobs`` spurious soft
    discs, Gaussian noise of std ``noise``."""
    height, width = label.shape
    salient = ((label != 0) & (label != IGNORE_LABEL)).astype(np.float32)
    if salient.any() and rng.random() < miss:
        ys, xs = np.nonzero(salient)
        cy, cx = int(rng.integers(ys.min(), ys.max() + 1)), int(rng.integers(xs.min(), xs.max() + 1))
        radius = max(2, int(0.25 * max(ys.max() - ys.min(), xs.max() - xs.min())))
        cv2.circle(salient, (cx, cy), radius, 0.0, -1)
    for _ in range(blobs):
        centre = (int(rng.integers(width)), int(rng.integers(height)))
        cv2.circle(salient, centre, max(2, int(rng.uniform(0.04, 0.12) * max(height, width))),
                   float(rng.uniform(0.3, 0.8)), -1)
    sigma = max(1.0, 0.02 * max(height, width))
    salient = cv2.GaussianBlur(salient, (0, 0), sigma)
    salient = salient + rng.normal(0.0, noise, salient.shape).astype(np.float32)
    return np.clip(salient * 255.0 + 0.5, 0, 255).astype(np.uint8)


def write_standins(root: str, ids: Sequence[str], out: str, dataset: str = "synthetic", seed: int = 0,
                   noise: float = 0.15) -> int:
    """Write ``<out>/<id>.png`` stand-ins for ``ids`` (image i draws from ``(seed, i)``)."""
    info = layout.dataset_info(dataset, root)
    os.makedirs(out, exist_ok=True)
    for index, image_id in enumerate(tqdm(ids, desc="saliency stand-ins", leave=False)):
        label = read_label_png(info.gt_path(image_id))
        values = standin_saliency(label, np.random.default_rng((seed, index)), noise)
        ok, encoded = cv2.imencode(".png", values)
        if not ok:
            raise DataError(f"{saliency_path(out, image_id)}: cannot encode PNG")
        atomic_write_bytes(saliency_path(out, image_id), encoded.tobytes())
    atomic_write_text(os.path.join(out, "README.txt"), STANDIN_NOTE + "\n")
    return len(ids)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_dataset_args(parser, layout.VOC_LAYOUT_NAMES, dataset="synthetic")
    parser.add_argument("--out", required=True, help="folder for the stand-in saliency PNGs")
    parser.add_argument("--list", default=None, help="image ids (default: <root>/train_aug.txt)")
    parser.add_argument("--noise", type=float, default=0.15, help="std of the added Gaussian noise (0..1 scale)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    info = layout.dataset_info(args.dataset, args.voc12_root)
    ids = read_id_list(args.list or info.list_path("train_aug"))
    count = write_standins(args.voc12_root, ids, args.out, args.dataset, args.seed, args.noise)
    print(f"wrote {count} {STANDIN_NOTE} to {args.out}")


if __name__ == "__main__":
    run_cli(main)
