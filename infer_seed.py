"""Stage 2: seeds from the trained AVC classifier (multi-scale + flip PCM CAMs).

    python infer_seed.py --weights checkpoints/resnet38_avc.pth --voc12_root VOC2012 \
        --infer_list VOC2012/train.txt --out_cam out/cam --out_crf out/crf --out_cam_pred out/seed

Outputs, in SEAM's formats (``tool/contract.py``): CAM dicts ``<out_cam>/<id>.npy``; seed PNGs
``<out_cam_pred>/<id>.png`` (background score ``--out_cam_pred_alpha``); CRF dicts for each
``--crf_alphas`` value in ``<out_crf>_<alpha>/<id>.npy`` (AffinityNet's low/high-alpha labels);
with ``--out_vis``, CAM overlays and a PCM affinity picture per image. Images whose outputs
all exist are skipped, so an interrupted run resumes. ``--shard K/N`` or ``torchrun`` split the
list; the CRF runs in a process pool beside the network.

``--method msa`` (or ``msa_sal``) runs an MSA checkpoint (train_msa.py) with its superpixel FCN
(``--spixel_weights``): the reference evaluator's CAMs (each scale and its mirror stretched to
multiples of 16, affinity propagation, logits upsampled through the superpixel association,
summed, max-normalised) at full resolution.
"""
from __future__ import annotations

import argparse
import logging
import os
from multiprocessing import get_context
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from network.avc import AVCNet
from network.msa import AP_STEPS, AP_THRESHOLD, MSANet, msa_cam_dict
from network.spixel import SpixelNet
from network.weights import load_for_inference
from tool.cam import cam_dict_from, fuse_cams, seed_from_cam_dict
from tool.cli import (add_dataset_args, add_inference_model_args, add_shard_args, non_negative_int,
                      positive_float, run_cli, shard_list)
from tool.contract import HIGH_ALPHA, LOW_ALPHA, crf_dir
from tool.crf import write_crf_dicts
from tool.datasets import get_dataset_info
from tool.distributed import cleanup, setup_distributed
from tool.fileio import pending_ids, read_id_list, save_npy, save_palette_png, save_rgb_image
from tool.logs import save_config, setup_logging
from tool.multiscale import forward_views
from tool.vis import affinity_matrix_picture, cam_overlay, label_overlay, tile_row
from voc12.data import MultiScaleDataset, collate_single

logger = logging.getLogger("infer_seed")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(parser)
    add_shard_args(parser)
    parser.add_argument("--weights", required=True, help="trained AVC/SEAM classifier (.pth)")
    parser.add_argument("--method", choices=("avc", "msa", "msa_sal"), default="avc",
                        help="the classifier's method (msa/msa_sal: an MSA checkpoint of train_msa.py)")
    parser.add_argument("--spixel_weights", default=None, help="MSA: the superpixel FCN (train_scn.py)")
    parser.add_argument("--widened", action="store_true", help="MSA: a checkpoint trained with --widened")
    parser.add_argument("--ap_steps", type=non_negative_int, default=AP_STEPS,
                        help=f"MSA: affinity propagation steps (default {AP_STEPS}, the training-time evaluator)")
    parser.add_argument("--ap_threshold", type=float, default=AP_THRESHOLD,
                        help=f"MSA: affinity propagation threshold (default {AP_THRESHOLD})")
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
                        help="data-loading workers and CRF processes")
    parser.add_argument("--log_dir", default=None, help="where the run's configuration and log go "
                                                        "(default: the first output folder)")
    args = parser.parse_args(argv)
    if not (args.out_cam or args.out_cam_pred or args.out_crf or args.out_vis):
        parser.error("nothing to write: give at least one of --out_cam --out_cam_pred --out_crf --out_vis")
    if args.method != "avc" and args.spixel_weights is None:
        parser.error(f"--method {args.method} needs --spixel_weights")
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


def visualise(model: AVCNet, item: dict, cam_dict: dict, seed: np.ndarray, device: torch.device,
              affinity: bool = True) -> np.ndarray:
    """CAM overlays, the seed, and (AVC) the PCM affinity of the unflipped scale-1 view sorted by seed class."""
    image = item["image"]
    pictures = [image] + [cam_overlay(image, cam_dict[key]) for key in sorted(cam_dict)]
    pictures.append(label_overlay(image, seed))
    if not affinity:
        return tile_row(pictures)
    view = item["views"][min(range(len(item["views"])),
                             key=lambda index: abs(item["views"][index].shape[-1] - image.shape[1]))]
    with torch.inference_mode():
        output = model(view[:1].to(device))
    affinity = output["affinity"][0].float().cpu().numpy()
    seed_small = F.interpolate(torch.from_numpy(seed)[None, None].float(), size=output["cam"].shape[-2:],
                               mode="nearest")[0, 0].numpy()
    picture = affinity_matrix_picture(affinity, seed_small, size=image.shape[0])
    return tile_row(pictures + [picture])


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    dist = setup_distributed()
    try:
        log_dir = args.log_dir or next(p for p in (args.out_cam, args.out_cam_pred, args.out_crf, args.out_vis) if p)
        setup_logging(os.path.join(log_dir, "infer_seed.log"), dist.is_main)
        if dist.is_main:
            save_config(args, os.path.join(log_dir, "infer_seed_config.json"))
        info = get_dataset_info(args.dataset, args.voc12_root)
        infer_list = args.infer_list or info.list_path("train")
        ids = shard_list(read_id_list(infer_list), args.shard, dist)
        todo = pending_ids(ids, lambda image_id: output_paths(args, image_id))
        logger.info("%d of %d images to do (%d already done)", len(todo), len(ids), len(ids) - len(todo))
        if not todo:
            return
        # MSA resizes the full image itself (its evaluator's stretch): no views to prepare.
        dataset = MultiScaleDataset(info, todo, info.load_cls_labels(), scales=args.scales if args.method == "avc"
                                    else (), source=infer_list)
        if args.method == "avc":
            model = load_for_inference(lambda width: AVCNet(num_classes=info.num_classes, width_mult=width),
                                       args.weights, args.width_mult, dist.device)

            def image_cam_dict(item: dict, label: np.ndarray) -> dict:
                view_cams = forward_views(lambda batch: model.forward_cam(batch)[:, 1:],  # no bg, as SEAM
                                          item["views"], item["image"].shape[:2], align_corners=False,
                                          device=dist.device)
                return cam_dict_from(fuse_cams(view_cams.float().cpu().numpy(), label,
                                               clip=not args.seam_cam_norm), label)
        else:
            model = load_for_inference(lambda width: MSANet(info.num_classes, width, widened=args.widened),
                                       args.weights, args.width_mult, dist.device)
            spixel = load_for_inference(SpixelNet, args.spixel_weights, None, dist.device)

            def image_cam_dict(item: dict, label: np.ndarray) -> dict:
                return msa_cam_dict(model, spixel, item["image"], label, args.scales, dist.device,
                                    args.ap_steps, args.ap_threshold, "image" if args.method == "msa" else "saliency")

        loader = torch.utils.data.DataLoader(dataset, batch_size=1, collate_fn=collate_single,
                                             num_workers=args.num_workers)
        crf_pool = get_context("spawn").Pool(args.num_workers) if args.out_crf and args.num_workers > 0 else None
        pending = []
        for item in tqdm(loader, desc="seeds", disable=not dist.is_main, dynamic_ncols=True):
            image_id, image, label = item["id"], item["image"], item["label"].numpy()
            cam_dict = image_cam_dict(item, label)
            seed = seed_from_cam_dict(cam_dict, info.num_classes, args.out_cam_pred_alpha, image.shape[:2])
            if args.out_cam:
                save_npy(os.path.join(args.out_cam, f"{image_id}.npy"), cam_dict)
            if args.out_cam_pred:
                save_palette_png(os.path.join(args.out_cam_pred, f"{image_id}.png"), seed)
            if args.out_vis:
                save_rgb_image(os.path.join(args.out_vis, f"{image_id}.jpg"),
                               visualise(model, item, cam_dict, seed, dist.device, args.method == "avc"))
            if args.out_crf:
                crf_args = (image, cam_dict, image_id, args.out_crf, args.crf_alphas)
                if crf_pool is None:
                    write_crf_dicts(*crf_args)
                else:
                    pending.append(crf_pool.apply_async(write_crf_dicts, crf_args))
                    # Bound the queue so images do not pile up in memory ahead of the CRF.
                    while len(pending) > 4 * args.num_workers:
                        pending.pop(0).get()
        if crf_pool is not None:
            for job in tqdm(pending, desc="crf", disable=not dist.is_main, dynamic_ncols=True):
                job.get()
            crf_pool.close()
            crf_pool.join()
    finally:
        cleanup()


if __name__ == "__main__":
    run_cli(main)
