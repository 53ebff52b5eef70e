"""Stage 3: random-walk pseudo masks from AffinityNet and the CAM dicts (PSA/SEAM ``infer_aff.py``).

Per image: the normalised image is zero-padded to a multiple of 8; AffinityNet gives the
affinities of the radius-5 pairs on the stride-8 grid; the CAM dict becomes score maps
(background (1 - max CAM)^alpha, 8 x 8 average pooling); the scores walk through
T^(2^logt), T the column-normalised affinity^beta (sparse: never a dense N x N matrix);
then x8 bilinear upsampling (align_corners=False, as the reference), with ``--crf`` one
dense-CRF iteration on the de-normalised padded image (SEAM's option), arg-max, crop.
Output: ``<out_rw>/<id>.png`` (palette; 0 background, c + 1 class c). Existing PNGs are
skipped, so an interrupted run resumes; ``--shard K/N`` and ``torchrun`` split the list.

    python infer_aff.py --weights checkpoints/resnet38_aff.pth --voc12_root VOC2012 \\
        --infer_list VOC2012/train.txt --cam_dir out/cam --out_rw out/rw
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from network import build_model
from network.affinity import AffinityNet
from network.weights import load_for_inference
from tool import transforms as T
from tool.cli import (add_dataset_args, add_inference_model_args, add_overwrite_arg, add_parallel_args, add_shard_args,
                      non_negative_int,
                      positive_float, positive_int, run_cli, shard_list)
from tool.crf import SEED_CRF, dense_crf
from tool.datasets import DatasetInfo
from tool.device import images_to_device, inference_autocast, inference_layout, resolve_precision
from tool.distributed import DistInfo, cleanup, setup_distributed
from tool.fileio import DataError, load_score_dict, read_id_list, read_rgb_image, save_palette_png
from tool.logs import config_dict, save_config, setup_logging
from tool.outputs import OutputRecord
from tool.parallel import run_images
from tool.random_walk import (FEATURE_STRIDE, AffinityGraph, padded_size, random_walk, random_walk_labels,
                              rw_scores_from_cam_dict, rw_scores_from_crf_dict)
from voc12.data import CamDictDataset
from workflow.datasets import DATASET_NAMES, get_dataset_info

logger = logging.getLogger("infer_aff")

# SEAM's --crf: the seed CRF kernels with a single mean-field iteration (imutils.crf_inference, t=1).
RW_CRF = dataclasses.replace(SEED_CRF, iterations=1)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(parser, DATASET_NAMES)
    add_shard_args(parser)
    parser.add_argument("--weights", required=True, help="trained AffinityNet (.pth: ours, PSA's or SEAM's)")
    add_inference_model_args(parser)
    parser.add_argument("--infer_list", default=None, help="image ids (default: <root>/train.txt)")
    parser.add_argument("--cam_dir", required=True, help="folder of the CAM dicts <id>.npy (infer_seed.py --out_cam); "
                        "with --walk_from crf, of the CRF dicts (refine_mask.py --out_crf)")
    parser.add_argument("--walk_from", choices=("cam", "crf"), default="cam",
                        help="what the walk propagates: the CAMs with background (1 - max CAM)^alpha (PSA, SEAM), "
                             "or the dense-CRF marginals of the seeds (--alpha unused)")
    parser.add_argument("--out_rw", required=True, help="folder for the random-walk label PNGs")
    parser.add_argument("--alpha", type=positive_float, default=6.0,
                        help="background score (1 - max CAM)^alpha (SEAM 6, PSA 16)")
    parser.add_argument("--beta", type=positive_float, default=8.0, help="affinity exponent (default 8)")
    parser.add_argument("--logt", type=non_negative_int, default=6,
                        help="the walk takes 2^logt steps (SEAM 6, PSA 8)")
    parser.add_argument("--radius", type=positive_int, default=5,
                        help="pair radius on the stride-8 grid (default 5; small maps use SEAM's rule)")
    parser.add_argument("--scale", type=positive_float, default=1.0,
                        help="resize the image by this factor before AffinityNet, so the walk runs on a grid "
                             "scale^2 times finer (the CAM/CRF dicts are resized with it, the labels back to "
                             "the image); default 1, the reference")
    parser.add_argument("--crf", action="store_true",
                        help="SEAM's option: one dense-CRF iteration on the upsampled walk scores")
    parser.add_argument("--num_workers", type=non_negative_int, default=4,
                        help="image-reading workers of the CUDA path")
    add_parallel_args(parser, batching=False)
    add_overwrite_arg(parser)
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: cuda when available; torchrun: one GPU a rank)")
    args = parser.parse_args(argv)
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            parser.error(f"--device {args.device!r} is not a torch device")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device {args.device}: CUDA is not available")
    return args


def pad_to_stride(normalized: np.ndarray, stride: int = FEATURE_STRIDE) -> np.ndarray:
    """Zero-pad a normalised HxWx3 image at the bottom/right to a multiple of ``stride`` (the reference)."""
    height, width = normalized.shape[:2]
    padded_h, padded_w = padded_size((height, width), stride)
    return np.pad(normalized, ((0, padded_h - height), (0, padded_w - width), (0, 0)))


class RandomWalkDataset(CamDictDataset):
    """``{"id", "image" (uint8 HxWx3), "walk_image" (the image at ``scale``), "input" (float32
    3 x Hp x Wp: the walk image normalised, zero-padded), "cam_dict" (maps at the walk image's
    size), "cam_path"}``; use :func:`voc12.data.collate_single` with ``batch_size=1``."""

    def __init__(self, info: DatasetInfo, ids: Sequence[str], cam_dir: str, source: str | None = None,
                 one_based: bool = False, scale: float = 1.0) -> None:
        super().__init__(info, ids, cam_dir, source)
        self.one_based = one_based  # CRF dicts (key 0 = background), as --walk_from crf reads
        self.scale = scale

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = self.ids[index]
        image = read_rgb_image(self.info.image_path(image_id))
        cam_path = self.cam_path(image_id)
        cam_dict = load_score_dict(cam_path, self.info.num_classes, one_based=self.one_based)
        walk_image = image
        if self.scale != 1.0:
            size_wh = T.scaled_size(*image.shape[:2], self.scale)
            walk_image = T.resize_image(image, size_wh, resample="bilinear")
            cam_dict = {key: _resize_map(scores, image.shape[:2], size_wh) for key, scores in cam_dict.items()}
        padded = pad_to_stride(T.normalize(walk_image))
        return {"id": image_id, "image": image, "walk_image": walk_image,
                "input": torch.from_numpy(T.hwc_to_chw(padded)), "cam_dict": cam_dict, "cam_path": cam_path}


def _resize_map(scores: np.ndarray, image_hw: tuple[int, int], size_wh: tuple[int, int]) -> np.ndarray:
    """A score map of the image resized to ``size_wh`` (bilinear); a map of another size is left
    for the walk's shape check to report."""
    if tuple(scores.shape) != tuple(image_hw):
        return scores
    resized = F.interpolate(torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32))[None, None],
                            size=(size_wh[1], size_wh[0]), mode="bilinear", align_corners=False)
    return resized[0, 0].numpy()


def crf_labels(walked: torch.Tensor, padded_input: torch.Tensor, image_hw: tuple[int, int]) -> np.ndarray:
    """SEAM's ``--crf``: upsample the walked scores to the padded size, one CRF iteration on the
    de-normalised (truncated, as the reference) padded image, arg-max, crop."""
    padded_hw = tuple(padded_input.shape[-2:])
    upsampled = F.interpolate(walked[None].float(), size=padded_hw, mode="bilinear", align_corners=False)[0]
    rgb = T.denormalize(padded_input.permute(1, 2, 0).cpu().numpy(), truncate=True)
    probs = dense_crf(rgb, upsampled.cpu().numpy(), RW_CRF)
    return np.argmax(probs, axis=0)[: image_hw[0], : image_hw[1]].astype(np.uint8)


def rw_label(model: AffinityNet, item: dict[str, Any], num_classes: int, args: argparse.Namespace,
             device: torch.device) -> np.ndarray:
    """The random-walk label map (H, W) uint8 of one dataset item."""
    return label_from_walk(item, walk_scores(model, item, num_classes, args, device), args)


def walk_scores(model: AffinityNet, item: dict[str, Any], num_classes: int, args: argparse.Namespace,
                device: torch.device) -> torch.Tensor:
    """The walked scores of one dataset item (the network part), on the CPU."""
    image_hw = item["walk_image"].shape[:2]
    x = images_to_device(item["input"][None], device)
    try:
        with torch.inference_mode(), inference_autocast(device, args.precision):
            graph: AffinityGraph = model.affinity_graph(x)
    except ValueError as error:  # a map too small for any pair
        raise DataError(f"{item['id']}: image {image_hw[0]}x{image_hw[1]} is too small for the walk ({error})") \
            from error
    if args.walk_from == "crf":
        scores = rw_scores_from_crf_dict(item["cam_dict"], num_classes, image_hw, source=item["cam_path"])
    else:
        scores = rw_scores_from_cam_dict(item["cam_dict"], num_classes, args.alpha, image_hw, source=item["cam_path"])
    return random_walk(graph, scores, beta=args.beta, logt=args.logt).cpu()


def label_from_walk(item: dict[str, Any], walked: torch.Tensor, args: argparse.Namespace) -> np.ndarray:
    """Labels from the walked scores: SEAM's CRF with ``--crf``, else upsampling and arg-max; on
    the walk image, then (``--scale``) resized to the image (nearest)."""
    walk_hw = item["walk_image"].shape[:2]
    if args.crf:
        label = crf_labels(walked, item["input"], walk_hw)
    else:
        label = random_walk_labels(walked, walk_hw)
    height, width = item["image"].shape[:2]
    return T.resize_label(label, (width, height))


def write_rw_label(args: argparse.Namespace, item: dict[str, Any], walked: torch.Tensor) -> str:
    """The label PNG of one image from its walked scores; returns the id."""
    save_palette_png(os.path.join(args.out_rw, f"{item['id']}.png"), label_from_walk(item, walked, args))
    return item["id"]


def resolve_device(args: argparse.Namespace) -> tuple[DistInfo, torch.device]:
    """Join torchrun if present; ``--device`` picks the device of a single process."""
    use_cuda = torch.cuda.is_available() if args.device is None else torch.device(args.device).type == "cuda"
    dist = setup_distributed(use_cuda=use_cuda)
    device = torch.device(args.device) if args.device is not None and not dist.distributed else dist.device
    return dist, device


def run(args: argparse.Namespace) -> int:
    """Write the PNGs of this process's part of the list; returns the number written."""
    dist, device = resolve_device(args)
    try:
        setup_logging(os.path.join(args.out_rw, "infer_aff.log"), dist.is_main)
        args.precision = resolve_precision(args.precision, device)  # recorded with the outputs
        record = OutputRecord("infer_aff", args, lambda image_id: [os.path.join(args.out_rw, f"{image_id}.png")])
        logger.info("configuration: %s", config_dict(args))
        info = get_dataset_info(args.dataset, args.voc12_root)
        infer_list = args.infer_list or info.list_path("train")
        ids = shard_list(read_id_list(infer_list), args.shard, dist)
        if record.pending(ids):  # read while the record digests the weights
            model = load_for_inference(lambda width: build_model("affinity", width_mult=width, radius=args.radius),
                                       args.weights, args.width_mult, device)
            model = inference_layout(model, device, args.precision)
        todo = record.start(ids)
        if dist.is_main:
            save_config(args, os.path.join(args.out_rw, "infer_aff_config.json"))
        logger.info("%d of %d images to do (%d already done)", len(todo), len(ids), len(ids) - len(todo))
        if not todo:
            return 0
        dataset = RandomWalkDataset(info, todo, args.cam_dir, source=infer_list, one_based=args.walk_from == "crf",
                                    scale=args.scale)

        results = run_images(dataset, lambda items: [walk_scores(model, items[0], info.num_classes, args, device)],
                             functools.partial(write_rw_label, args), device=device, threads=args.threads,
                             num_workers=args.num_workers)
        for _ in tqdm(results, total=len(dataset), desc="random walk", disable=not dist.is_main, dynamic_ncols=True):
            pass
        return len(todo)
    finally:
        cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
