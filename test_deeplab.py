"""Stage 5: segment images with a trained DeepLabV1-ResNet38, write PNGs, report the mIoU.

As the DeepLabV1 "seamv1-pseudovoc" release tests: the normalised image is resized (OpenCV
bicubic) to each scale of ``--scales`` and, with ``--flip``, mirrored; all views of one scale
share one batched forward; the logits of every view are upsampled to the image size
(bilinear, align_corners=True), flipped back and averaged, then softmax; with ``--crf`` a
dense CRF (1 iteration, Gaussian sxy 3 / compat 3, bilateral sxy 32 / srgb 13 / compat 10)
refines the probabilities; the label is their argmax.

Outputs: ``<out_dir>/<id>.png`` (VOC palette; existing files are skipped, so an interrupted
run resumes), with ``--submission`` also ``<out_dir>/results/VOC2012/Segmentation/
comp6_test_cls/<id>.png``, the layout the VOC evaluation server expects. When every image
of the list has a ground-truth PNG, the predictions are evaluated (evaluation.evaluate) and
the per-class IoU and mIoU are printed.

Parallel: ``--shard K/N`` (e.g. one per machine) and ``torchrun --nproc_per_node G``. Example::

    python test_deeplab.py --weights checkpoints/deeplab.pth --voc12_root data/VOC2012 \\
        --infer_list data/VOC2012/val.txt --out_dir out_deeplab_val
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
from typing import Any, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

import evaluation
from network.deeplab import DeepLabV1
from network.weights import load_for_inference
from tool import transforms as T
from tool.cli import (add_dataset_args, add_inference_model_args, add_overwrite_arg, add_parallel_args, add_shard_args,
                      non_negative_int, positive_float, run_cli, shard_list)
from tool.crf import DEEPLAB_TEST_CRF, dense_crf
from tool.datasets import DatasetInfo, get_dataset_info
from tool.distributed import barrier, cleanup, setup_distributed
from tool.fileio import read_id_list, read_rgb_image, save_palette_png
from tool.logs import setup_logging
from tool.multiscale import forward_views_many
from tool.outputs import OutputRecord
from tool.parallel import run_images
from voc12.data import check_images

logger = logging.getLogger(__name__)

DEFAULT_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
# The VOC evaluation server's folder for segmentation results (competition 6: own training data).
SUBMISSION_SUBDIR = os.path.join("results", "VOC2012", "Segmentation", "comp6_test_cls")


# --------------------------------------------------------------------------- views
def multiscale_views(image: np.ndarray, scales: Sequence[float], flip: bool) -> list[torch.Tensor]:
    """One (2 or 1, 3, h, w) tensor per scale of an HxWx3 uint8 image: normalised, resized, and
    with its horizontal flip when ``flip``, the layout ``tool.multiscale.forward_views`` takes."""
    normalized = T.normalize(image)
    views = []
    for scale in scales:
        view = T.hwc_to_chw(scaled_view(normalized, scale))
        stacked = np.stack([view, view[:, :, ::-1]]) if flip else view[None]
        views.append(torch.from_numpy(np.ascontiguousarray(stacked)))
    return views


def scaled_view(normalized: np.ndarray, scale: float) -> np.ndarray:
    """The normalised HxWx3 float32 image resized by ``scale`` with OpenCV bicubic (the reference)."""
    if scale == 1.0:
        return normalized
    height, width = normalized.shape[:2]
    if round(width * scale) < 1 or round(height * scale) < 1:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        return cv2.resize(normalized, size, interpolation=cv2.INTER_CUBIC)
    return cv2.resize(normalized, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)


class DeepLabTestDataset(Dataset):
    """``{"id", "image" (uint8 HxWx3), "views": [float32 (2 or 1, 3, h_s, w_s) per scale]}``.

    With ``flip`` each view tensor holds the scaled image and its mirror. Use
    ``voc12.data.collate_single`` with ``batch_size=1``.
    """

    def __init__(self, info: DatasetInfo, ids: Sequence[str], scales: Sequence[float], flip: bool,
                 source: str | None = None) -> None:
        if not scales:
            raise ValueError("at least one scale is needed")
        self.info, self.ids, self.scales, self.flip = info, list(ids), tuple(scales), flip
        check_images(info, self.ids, source)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = self.ids[index]
        image = read_rgb_image(self.info.image_path(image_id))
        return {"id": image_id, "image": image, "views": multiscale_views(image, self.scales, self.flip)}


# --------------------------------------------------------------------------- prediction
def fuse_view_logits(view_logits: torch.Tensor) -> torch.Tensor:
    """(V, C, H, W) logits at the image size -> (C, H, W) softmax of their mean (the reference)."""
    return torch.softmax(view_logits.float().mean(dim=0), dim=0)


def predict_probabilities(model: torch.nn.Module, views: Sequence[torch.Tensor], image_hw: tuple[int, int],
                          device: torch.device | str = "cpu", amp: bool = True) -> np.ndarray:
    """Class probabilities (C, H, W) float32 from multi-scale (+ flip) views of one image."""
    return predict_probabilities_many(model, [views], [image_hw], device, amp)[0]


def predict_probabilities_many(model: torch.nn.Module, views_per_image: Sequence[Sequence[torch.Tensor]],
                               image_hws: Sequence[tuple[int, int]], device: torch.device | str = "cpu",
                               amp: bool = True) -> list[np.ndarray]:
    """:func:`predict_probabilities` of several images, views of equal shape in one forward."""
    maps = forward_views_many(model, views_per_image, image_hws, align_corners=True, device=device, amp=amp)
    return [fuse_view_logits(logits).cpu().numpy().astype(np.float32, copy=False) for logits in maps]


def label_from_probabilities(image: np.ndarray, probs: np.ndarray, crf: bool) -> np.ndarray:
    """uint8 HxW label map: argmax of ``probs``, after the DeepLab test CRF if ``crf``."""
    if crf:
        probs = dense_crf(image, probs, DEEPLAB_TEST_CRF)
    return np.argmax(probs, axis=0).astype(np.uint8)


def output_paths(out_dir: str, image_id: str, submission: bool) -> list[str]:
    """Where the prediction of one image goes: the PNG, plus the test-server copy."""
    paths = [os.path.join(out_dir, f"{image_id}.png")]
    if submission:
        paths.append(os.path.join(out_dir, SUBMISSION_SUBDIR, f"{image_id}.png"))
    return paths


def write_prediction(args: argparse.Namespace, item: dict[str, Any], probs: np.ndarray) -> str:
    """The label PNG(s) of one image from its fused probabilities (CRF with ``--crf``); returns the id."""
    label = label_from_probabilities(item["image"], probs, args.crf)
    for path in output_paths(args.out_dir, item["id"], args.submission):
        save_palette_png(path, label)
    return item["id"]


# --------------------------------------------------------------------------- script
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(parser)
    add_inference_model_args(parser)
    add_shard_args(parser)
    parser.add_argument("--weights", required=True, metavar="PATH", help="trained DeepLabV1 checkpoint (.pth)")
    parser.add_argument("--infer_list", required=True, metavar="FILE", help="ids of the images to segment")
    parser.add_argument("--out_dir", required=True, metavar="DIR", help="folder for the <id>.png predictions")
    parser.add_argument("--scales", type=positive_float, nargs="+", default=list(DEFAULT_SCALES),
                        help=f"test scales (default {' '.join(map(str, DEFAULT_SCALES))})")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the mirrored image at every scale (default on)")
    parser.add_argument("--crf", action=argparse.BooleanOptionalAction, default=True,
                        help="dense CRF on the fused probabilities (default on)")
    parser.add_argument("--submission", action=argparse.BooleanOptionalAction, default=False,
                        help=f"also write <out_dir>/{SUBMISSION_SUBDIR}/<id>.png for the VOC test server")
    parser.add_argument("--num_workers", type=non_negative_int, default=2,
                        help="data loader workers of the batched (CUDA) path and of the evaluation (default 2)")
    add_parallel_args(parser)
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                        help="bf16 autocast on CUDA (ignored on CPU)")
    add_overwrite_arg(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def evaluate_if_possible(args: argparse.Namespace, info: DatasetInfo, ids: Sequence[str]) -> dict[str, Any] | None:
    """Evaluate the PNGs of ``ids`` against the ground truth when every image has one."""
    without_gt = [image_id for image_id in ids if not os.path.isfile(info.gt_path(image_id))]
    if without_gt:
        logger.info("%d of %d images have no ground truth (e.g. %s): no evaluation", len(without_gt),
                    len(ids), info.gt_path(without_gt[0]))
        return None
    results = evaluation.evaluate(args.out_dir, info.label_folder, ids, info.class_names,
                                  input_type="png", num_workers=max(1, args.num_workers))
    print(evaluation.format_table(results))
    return results


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Segment the list as the flags say; returns the evaluation results (None without gt)."""
    dist = setup_distributed()
    try:
        setup_logging(None, dist.is_main)
        info = get_dataset_info(args.dataset, args.voc12_root)
        shard_ids = shard_list(read_id_list(args.infer_list), args.shard, None)
        my_ids = shard_list(shard_ids, None, dist)
        todo = OutputRecord("test_deeplab", args,
                            lambda image_id: output_paths(args.out_dir, image_id, args.submission)).start(my_ids)
        logger.info("%d images in this part of %s, %d already done", len(my_ids), args.infer_list,
                    len(my_ids) - len(todo))
        if todo:
            model = load_for_inference(lambda width: DeepLabV1(num_classes=info.num_classes, width_mult=width),
                                       args.weights, args.width_mult, dist.device)
            dataset = DeepLabTestDataset(info, todo, args.scales, args.flip, source=args.infer_list)

            def infer(items: list[dict[str, Any]]) -> list[np.ndarray]:
                return predict_probabilities_many(model, [item["views"] for item in items],
                                                  [item["image"].shape[:2] for item in items], dist.device, args.amp)

            results = run_images(dataset, infer, functools.partial(write_prediction, args), device=dist.device, threads=args.threads,
                                 batch_images=args.batch_images, num_workers=args.num_workers,
                                 key=lambda item: tuple(tuple(view.shape) for view in item["views"]),
                                 strip=("views",))
            for _ in tqdm(results, total=len(dataset), desc="test", disable=not dist.is_main, dynamic_ncols=True):
                pass
        barrier()
        return evaluate_if_possible(args, info, shard_ids) if dist.is_main else None
    finally:
        cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
