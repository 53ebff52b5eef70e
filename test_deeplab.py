"""Stage 5: segment images with a trained DeepLab network, write PNGs, report the mIoU.

The architecture comes from the checkpoint (its ``arch`` flag; a ``base.*`` state dict is a
DeepLabV2 release of the reference), and with it the test recipe of ``network.segmenters``:

* DeepLabV1-ResNet38, as the "seamv1-pseudovoc" release tests: the normalised image is resized
  (OpenCV bicubic) to each scale of ``--scales`` and, with ``--flip``, mirrored; all views of
  one scale share one batched forward; the logits of every view are upsampled to the image size
  (bilinear, align_corners=True), flipped back and averaged, then softmax; with ``--crf`` a
  dense CRF (1 iteration, Gaussian sxy 3 / compat 3, bilateral sxy 32 / srgb 13 / compat 10).
* DeepLabV2-ResNet101, as kazuto1011/deeplab-pytorch: the full image in the network's input
  convention, the MSC max of the 1, 0.5, 0.75 passes, bilinear (align_corners=False) to the
  image size, softmax; CRF 10 iterations, Gaussian sxy 1 / compat 3, bilateral sxy 67 / srgb 3
  / compat 4 on the image (``--crf_image reference``: on the mean-subtracted BGR image cast to
  uint8, values wrapped, which is what the reference's ``main.py crf`` feeds it).

The label is the argmax.

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
from network.deeplabv2 import CAFFE_MEAN_BGR, to_input_convention
from network.segmenters import Segmenter, arch_of, get_segmenter
from network.weights import checkpoint_info, load_for_inference, read_weights
from tool import transforms as T
from tool.cli import (add_dataset_args, add_inference_model_args, add_overwrite_arg, add_parallel_args, add_shard_args,
                      non_negative_int, positive_float, run_cli, shard_list)
from tool.crf import DEEPLAB_TEST_CRF, CrfParams, dense_crf, wrapped_mean_subtracted
from tool.datasets import DatasetInfo
from tool.device import inference_autocast, inference_layout, resolve_precision
from tool.distributed import barrier, cleanup, setup_distributed
from tool.fileio import read_id_list, read_rgb_image, save_palette_png
from tool.logs import setup_logging
from tool.multiscale import forward_views_many
from tool.outputs import OutputRecord
from tool.parallel import run_images
from voc12.data import check_images
from workflow.datasets import DATASET_NAMES, get_dataset_info

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
                          device: torch.device | str = "cpu", amp: bool = True, align_corners: bool = True,
                          convention: str = "torchvision") -> np.ndarray:
    """Class probabilities (C, H, W) float32 from multi-scale (+ flip) views of one image.

    The views are torchvision-normalised; the network sees them in ``convention``; logits are
    resized to the image with ``align_corners`` (DeepLabV1 True, DeepLabV2 False).
    """
    return predict_probabilities_many(model, [views], [image_hw], device, amp, align_corners, convention)[0]


def predict_probabilities_many(model: torch.nn.Module, views_per_image: Sequence[Sequence[torch.Tensor]],
                               image_hws: Sequence[tuple[int, int]], device: torch.device | str = "cpu",
                               amp: bool = True, align_corners: bool = True,
                               convention: str = "torchvision") -> list[np.ndarray]:
    """:func:`predict_probabilities` of several images, views of equal shape in one forward."""
    maps = forward_views_many(lambda x: model(to_input_convention(x, convention)), views_per_image, image_hws,
                              align_corners=align_corners, device=device, amp=amp)
    return [fuse_view_logits(logits).cpu().numpy().astype(np.float32, copy=False) for logits in maps]


def crf_input_image(image: np.ndarray, mode: str) -> np.ndarray:
    """The uint8 image the CRF sees, from the RGB ``image``: ``"rgb"``; ``"bgr"`` (DeepLabV2's
    demo.py: the colour std is equal per channel, but pydensecrf's permutohedral lattice is not
    exactly symmetric in the channels, so the order changes a few marginals); ``"reference"``:
    DeepLabV2 ``main.crf``'s mean-subtracted BGR image wrapped to uint8 (its bug, for a flag)."""
    if mode == "rgb":
        return image
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    if mode == "bgr":
        return bgr
    if mode == "reference":
        return wrapped_mean_subtracted(bgr, CAFFE_MEAN_BGR)
    raise ValueError(f"unknown CRF image mode {mode!r}")


def label_from_probabilities(image: np.ndarray, probs: np.ndarray, crf: bool,
                             params: CrfParams = DEEPLAB_TEST_CRF) -> np.ndarray:
    """uint8 HxW label map: argmax of ``probs``, after the test CRF ``params`` if ``crf``."""
    if crf:
        probs = dense_crf(image, probs, params)
    return np.argmax(probs, axis=0).astype(np.uint8)


def output_paths(out_dir: str, image_id: str, submission: bool) -> list[str]:
    """Where the prediction of one image goes: the PNG, plus the test-server copy."""
    paths = [os.path.join(out_dir, f"{image_id}.png")]
    if submission:
        paths.append(os.path.join(out_dir, SUBMISSION_SUBDIR, f"{image_id}.png"))
    return paths


def write_prediction(args: argparse.Namespace, item: dict[str, Any], probs: np.ndarray, crf_mode: str = "rgb",
                     crf_params: CrfParams = DEEPLAB_TEST_CRF) -> str:
    """The label PNG(s) of one image from its fused probabilities (the test CRF ``crf_params``
    on the :func:`crf_input_image` of ``crf_mode`` with ``--crf``); returns the id."""
    label = label_from_probabilities(crf_input_image(item["image"], crf_mode), probs, args.crf, crf_params)
    for path in output_paths(args.out_dir, item["id"], args.submission):
        save_palette_png(path, label)
    return item["id"]


# --------------------------------------------------------------------------- script
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(parser, DATASET_NAMES)
    add_inference_model_args(parser)
    add_shard_args(parser)
    parser.add_argument("--weights", required=True, metavar="PATH",
                        help="trained DeepLab checkpoint (.pth; the architecture is read from it)")
    parser.add_argument("--infer_list", required=True, metavar="FILE", help="ids of the images to segment")
    parser.add_argument("--out_dir", required=True, metavar="DIR", help="folder for the <id>.png predictions")
    parser.add_argument("--scales", type=positive_float, nargs="+", default=None,
                        help=f"test scales (default: the architecture's; DeepLabV1 "
                             f"{' '.join(map(str, DEFAULT_SCALES))}, DeepLabV2 1.0, its MSC inside)")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                        help="also run the mirrored image at every scale (default: DeepLabV1 on, V2 off)")
    parser.add_argument("--crf", action=argparse.BooleanOptionalAction, default=True,
                        help="dense CRF on the fused probabilities, the architecture's parameters (default on)")
    parser.add_argument("--crf_image", choices=("image", "reference"), default="image",
                        help="what the DeepLabV2 CRF sees: the image (default) or, as the reference's "
                             "main.py crf, the mean-subtracted BGR image cast to uint8 (values wrap)")
    parser.add_argument("--submission", action=argparse.BooleanOptionalAction, default=False,
                        help=f"also write <out_dir>/{SUBMISSION_SUBDIR}/<id>.png for the VOC test server")
    parser.add_argument("--num_workers", type=non_negative_int, default=2,
                        help="data loader workers of the batched (CUDA) path and of the evaluation (default 2)")
    add_parallel_args(parser)
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


def checkpoint_segmenter(weights: str, loaded: object) -> tuple[Segmenter, str]:
    """The segmenter of a checkpoint (``loaded``: its content, :func:`read_weights`) and the input
    convention it was trained with (a release of the reference, without flags, expects the Caffe
    one); logs both with the init."""
    saved, keys = checkpoint_info(weights, loaded)
    segmenter = get_segmenter(arch_of(saved, keys))
    default = "caffe_bgr" if not saved and segmenter.name == "deeplabv2_resnet101" else "torchvision"
    convention = str(saved.get("input_convention", default))
    logger.info("%s: %s, init %s, input convention %s", weights, segmenter.title,
                saved.get("init_description", saved.get("init", "not recorded")), convention)
    return segmenter, convention


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Segment the list as the flags say; returns the evaluation results (None without gt)."""
    dist = setup_distributed()
    try:
        setup_logging(None, dist.is_main)
        args.precision = resolve_precision(args.precision, dist.device)  # recorded with the outputs
        info = get_dataset_info(args.dataset, args.voc12_root)
        shard_ids = shard_list(read_id_list(args.infer_list), args.shard, None)
        my_ids = shard_list(shard_ids, None, dist)
        record = OutputRecord("test_deeplab", args,
                              lambda image_id: output_paths(args.out_dir, image_id, args.submission))
        if record.pending(my_ids):  # the model is read while the record digests the weights
            loaded = read_weights(args.weights)
            segmenter, convention = checkpoint_segmenter(args.weights, loaded)
            model = load_for_inference(segmenter.build_for_inference(info.num_classes), args.weights,
                                       args.width_mult, dist.device, loaded=loaded)
            model = inference_layout(model, dist.device, args.precision)
            del loaded  # copied into the model; not held through the run
        todo = record.start(my_ids)
        logger.info("%d images in this part of %s, %d already done", len(my_ids), args.infer_list,
                    len(my_ids) - len(todo))
        if todo:
            scales = args.scales or segmenter.test.scales
            flip = segmenter.test.flip if args.flip is None else args.flip
            crf_mode = "reference" if args.crf_image == "reference" else segmenter.test.crf_channels
            dataset = DeepLabTestDataset(info, todo, scales, flip, source=args.infer_list)

            def infer(items: list[dict[str, Any]]) -> list[np.ndarray]:
                with inference_autocast(dist.device, args.precision):
                    return predict_probabilities_many(model, [item["views"] for item in items],
                                                      [item["image"].shape[:2] for item in items], dist.device,
                                                      args.precision == "bf16", segmenter.test.align_corners,
                                                      convention)

            finish = functools.partial(write_prediction, args, crf_mode=crf_mode, crf_params=segmenter.test.crf)
            results = run_images(dataset, infer, finish, device=dist.device, threads=args.threads,
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
