"""Stage 2: seeds from the trained AVC classifier (multi-scale + flip PCM CAMs).

    python infer_seed.py --weights checkpoints/resnet38_avc.pth --voc12_root VOC2012 \
        --infer_list VOC2012/train.txt --out_cam out/cam --out_crf out/crf --out_cam_pred out/seed

Outputs, in SEAM's formats (``tool/contract.py``): CAM dicts ``<out_cam>/<id>.npy``; seed PNGs
``<out_cam_pred>/<id>.png`` (background score ``--out_cam_pred_alpha``); CRF dicts for each
``--crf_alphas`` value in ``<out_crf>_<alpha>/<id>.npy`` (AffinityNet's low/high-alpha labels);
with ``--out_vis``, CAM overlays and a PCM affinity picture per image. Images whose outputs
all exist are skipped, so an interrupted run resumes. ``--shard K/N`` or ``torchrun`` split the
list; on CPU one image is in flight per core (``--threads``), CRF included (``tool/parallel.py``).
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from network.avc import AVCNet
from network.weights import load_for_inference
from tool.cam import cam_dict_from, fuse_cams, seed_from_cam_dict
from tool.cli import (add_dataset_args, add_inference_model_args, add_overwrite_arg, add_parallel_args, add_shard_args,
                      non_negative_int, positive_float, run_cli, shard_list)
from tool.contract import HIGH_ALPHA, LOW_ALPHA, crf_dir
from tool.crf import write_crf_dicts
from tool.datasets import get_dataset_info
from tool.distributed import cleanup, setup_distributed
from tool.fileio import read_id_list, save_palette_png, save_rgb_image, save_score_dict
from tool.logs import save_config, setup_logging
from tool.multiscale import forward_views_many
from tool.outputs import OutputRecord
from tool.parallel import run_images
from tool.vis import affinity_matrix_picture, cam_overlay, label_overlay, tile_row
from voc12.data import MultiScaleDataset

logger = logging.getLogger("infer_seed")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(parser)
    add_shard_args(parser)
    parser.add_argument("--weights", required=True, help="trained AVC/SEAM classifier (.pth)")
    add_inference_model_args(parser)
    parser.add_argument("--infer_list", default=None, help="image ids (default: <root>/train.txt)")
    parser.add_argument("--scales", type=positive_float, nargs="+", default=(0.5, 1.0, 1.5, 2.0))
    parser.add_argument("--out_cam", default=None, help="folder for the CAM dicts (.npy)")
    parser.add_argument("--out_cam_pred", default=None, help="folder for the seed PNGs")
    parser.add_argument("--out_cam_pred_alpha", type=float, default=0.26,
                        help="background score of the seed PNGs (SEAM: 0.26; take the best "
                             "threshold of 'evaluation.py --curve')")
    parser.add_argument("--out_crf", default=None,
                        help="prefix of the CRF dict folders (<out_crf>_4.0, <out_crf>_24.0)")
    parser.add_argument("--crf_alphas", type=float, nargs="+", default=(LOW_ALPHA, HIGH_ALPHA),
                        help="background exponents of the CRF dicts (low and high alpha)")
    parser.add_argument("--seam_cam_norm", action="store_true",
                        help="keep SEAM's CAM normalisation bug for classes positive everywhere "
                             "(values far below 0); by default CAMs are clipped to [0, 1]")
    parser.add_argument("--out_vis", default=None, help="folder for CAM overlays and affinity pictures")
    parser.add_argument("--num_workers", type=non_negative_int, default=4,
                        help="data-loading workers of the batched (CUDA) path")
    add_parallel_args(parser)
    parser.add_argument("--log_dir", default=None, help="where the run's configuration and log go "
                                                        "(default: the first output folder)")
    add_overwrite_arg(parser)
    args = parser.parse_args(argv)
    if not (args.out_cam or args.out_cam_pred or args.out_crf or args.out_vis):
        parser.error("nothing to write: give at least one of --out_cam --out_cam_pred --out_crf --out_vis")
    return args


def output_paths(args: argparse.Namespace, image_id: str) -> list[str]:
    """Every file this run writes for one image: the image is done when they all exist."""
    paths = []
    if args.out_cam:
        paths.append(os.path.join(args.out_cam, f"{image_id}.npy"))
    if args.out_cam_pred:
        paths.append(os.path.join(args.out_cam_pred, f"{image_id}.png"))
    if args.out_crf:
        paths += [os.path.join(crf_dir(args.out_crf, alpha), f"{image_id}.npy") for alpha in args.crf_alphas]
    if args.out_vis:
        paths.append(os.path.join(args.out_vis, f"{image_id}.jpg"))
    return paths


def pcm_affinity(model: AVCNet, item: dict, device: torch.device) -> tuple[np.ndarray, tuple[int, int]]:
    """The PCM affinity (N, N) of the unflipped view closest to scale 1 and its CAM grid size."""
    image = item["image"]
    view = item["views"][min(range(len(item["views"])),
                             key=lambda index: abs(item["views"][index].shape[-1] - image.shape[1]))]
    with torch.inference_mode():
        output = model(view[:1].to(device))
    return output["affinity"][0].float().cpu().numpy(), tuple(output["cam"].shape[-2:])


def visualise(image: np.ndarray, affinity: tuple[np.ndarray, tuple[int, int]], cam_dict: dict,
              seed: np.ndarray) -> np.ndarray:
    """CAM overlays, the seed, and the PCM affinity (:func:`pcm_affinity`) sorted by seed class."""
    pictures = [image] + [cam_overlay(image, cam_dict[key]) for key in sorted(cam_dict)]
    pictures.append(label_overlay(image, seed))
    matrix, cam_hw = affinity
    seed_small = F.interpolate(torch.from_numpy(seed)[None, None].float(), size=cam_hw,
                               mode="nearest")[0, 0].numpy()
    picture = affinity_matrix_picture(matrix, seed_small, size=image.shape[0])
    return tile_row(pictures + [picture])


def write_seed_outputs(args: argparse.Namespace, num_classes: int, item: dict, view_cams: np.ndarray,
                       affinity: tuple[np.ndarray, tuple[int, int]] | None = None) -> str:
    """Everything one image's fused CAMs give: CAM dict, seed PNG, picture, CRF dicts; returns the id.

    ``view_cams`` (V, C, H, W): the per-view class CAMs at the image size; ``affinity``: the
    :func:`pcm_affinity` of the image (needed with ``--out_vis``).
    """
    image_id, image, label = item["id"], item["image"], item["label"].numpy()
    norm_cam = fuse_cams(view_cams, label, clip=not args.seam_cam_norm)
    cam_dict = cam_dict_from(norm_cam, label)
    seed = seed_from_cam_dict(cam_dict, num_classes, args.out_cam_pred_alpha, image.shape[:2])
    if args.out_cam:
        save_score_dict(os.path.join(args.out_cam, f"{image_id}.npy"), cam_dict)
    if args.out_cam_pred:
        save_palette_png(os.path.join(args.out_cam_pred, f"{image_id}.png"), seed)
    if args.out_vis:
        save_rgb_image(os.path.join(args.out_vis, f"{image_id}.jpg"), visualise(image, affinity, cam_dict, seed))
    if args.out_crf:
        write_crf_dicts(image, cam_dict, image_id, args.out_crf, args.crf_alphas)
    return image_id


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    dist = setup_distributed()
    try:
        log_dir = args.log_dir or next(p for p in (args.out_cam, args.out_cam_pred, args.out_crf, args.out_vis) if p)
        setup_logging(os.path.join(log_dir, "infer_seed.log"), dist.is_main)
        record = OutputRecord("infer_seed", args, lambda image_id: output_paths(args, image_id))
        if dist.is_main:
            save_config(args, os.path.join(log_dir, "infer_seed_config.json"))
        info = get_dataset_info(args.dataset, args.voc12_root)
        infer_list = args.infer_list or info.list_path("train")
        ids = shard_list(read_id_list(infer_list), args.shard, dist)
        todo = record.start(ids)
        logger.info("%d of %d images to do (%d already done)", len(todo), len(ids), len(ids) - len(todo))
        if not todo:
            return
        dataset = MultiScaleDataset(info, todo, info.load_cls_labels(), scales=args.scales, source=infer_list)
        model = load_for_inference(lambda width: AVCNet(num_classes=info.num_classes, width_mult=width),
                                   args.weights, args.width_mult, dist.device)

        def class_cams(batch: torch.Tensor) -> torch.Tensor:
            return model.forward_cam(batch)[:, 1:]  # drop the background channel, as SEAM

        def infer(items: list[dict]) -> list[tuple[np.ndarray, tuple | None]]:
            maps = forward_views_many(class_cams, [item["views"] for item in items],
                                      [item["image"].shape[:2] for item in items], device=dist.device)
            return [(view_cams.float().cpu().numpy(), pcm_affinity(model, item, dist.device) if args.out_vis else None)
                    for item, view_cams in zip(items, maps)]

        def finish(item: dict, inferred: tuple[np.ndarray, tuple | None]) -> str:
            return write_seed_outputs(args, info.num_classes, item, *inferred)

        results = run_images(dataset, infer, finish, device=dist.device, threads=args.threads,
                             batch_images=args.batch_images, num_workers=args.num_workers,
                             key=lambda item: tuple(tuple(view.shape) for view in item["views"]),
                             strip=("views",))
        for _ in tqdm(results, total=len(dataset), desc="seeds", disable=not dist.is_main, dynamic_ncols=True):
            pass
    finally:
        cleanup()


if __name__ == "__main__":
    run_cli(main)
