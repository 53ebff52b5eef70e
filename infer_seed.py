"""Stage 2: seeds from a trained seed classifier (multi-scale + flip CAMs, as its method fuses them).

    python infer_seed.py --weights checkpoints/resnet38_avc.pth --voc12_root VOC2012 \
        --infer_list VOC2012/train.txt --out_cam out/cam --out_crf out/crf --out_cam_pred out/seed

Outputs, in SEAM's formats (``tool/contract.py``): CAM dicts ``<out_cam>/<id>.npy``; seed PNGs
``<out_cam_pred>/<id>.png`` (background score ``--out_cam_pred_alpha``); CRF dicts for each
``--crf_alphas`` value in ``<out_crf>_<alpha>/<id>.npy`` (AffinityNet's low/high-alpha labels);
with ``--out_vis``, CAM overlays and a PCM affinity picture per image. Images whose outputs
all exist are skipped, so an interrupted run resumes. ``--shard K/N`` or ``torchrun`` split the
list; on CPU one image is in flight per core (``--threads``), CRF included (``tool/parallel.py``).

The method (network/methods.py), backbone and width come from the checkpoint; ``--method`` is
only needed for files that do not record it (a released SIPE/AE-SIPE ``{'net': ...}`` file),
and one that contradicts the checkpoint is refused. SIPE/AE-SIPE: the IS-CAMs of scales
1, 0.5, 1.5, 2 (with flip) are summed and max-normalised; the CAM dicts hold its foreground
channels, the seed PNG is the arg-max with SIPE's own background channel, and ``--out_is_cam``
writes the reference's ``{'keys', 'IS_CAM'}`` dicts for SIPE's own later steps.

``--method msa`` / ``msa_sal`` checkpoints (train_msa.py) run with their superpixel FCN
(``--spixel_weights``, default the one recorded at training): the reference evaluator's CAMs
(each scale and its mirror stretched to multiples of 16, affinity propagation, logits upsampled
through the superpixel association, summed, max-normalised) at full resolution.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from network.methods import METHODS, MSA_METHODS, SEED_METHOD_NAMES, ImageCams, build_network, image_cams_many
from network.msa import AP_STEPS, AP_THRESHOLD, MSANet, msa_cam_dict
from network.spixel import SpixelNet
from network.weights import load_for_inference, read_weights, saved_args
from tool.cam import labels_from_scores, seed_from_cam_dict
from tool.cli import (add_dataset_args, add_inference_model_args, add_overwrite_arg, add_parallel_args, add_shard_args,
                      non_negative_int, positive_float, run_cli, shard_list)
from tool.contract import HIGH_ALPHA, LOW_ALPHA, crf_dir
from tool.crf import write_crf_dicts
from tool.datasets import DatasetInfo
from tool.device import inference_autocast, inference_layout, resolve_precision
from tool.distributed import cleanup, setup_distributed
from tool.fileio import DataError, read_id_list, save_npy, save_palette_png, save_rgb_image, save_score_dict
from tool.logs import save_config, setup_logging
from tool.outputs import OutputRecord
from tool.parallel import run_images
from tool.vis import affinity_matrix_picture, cam_overlay, label_overlay, tile_row
from voc12.data import MultiScaleDataset
from workflow.datasets import DATASET_NAMES, get_dataset_info

logger = logging.getLogger("infer_seed")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(parser, DATASET_NAMES)
    add_shard_args(parser)
    parser.add_argument("--weights", required=True, help="trained seed classifier (.pth)")
    parser.add_argument("--method", choices=SEED_METHOD_NAMES, default=None,
                        help="seed method, for checkpoints that do not record it (default: the "
                             "checkpoint's, else avc)")
    msa = parser.add_argument_group("MSA checkpoints (train_msa.py)")
    msa.add_argument("--spixel_weights", default=None,
                     help="the superpixel FCN (train_scn.py; default: the one recorded in the checkpoint)")
    msa.add_argument("--widened", action="store_true", help="a checkpoint trained with --widened")
    msa.add_argument("--ap_steps", type=non_negative_int, default=AP_STEPS,
                     help=f"affinity propagation steps (default {AP_STEPS}, the training-time evaluator)")
    msa.add_argument("--ap_threshold", type=float, default=AP_THRESHOLD,
                     help=f"affinity propagation threshold (default {AP_THRESHOLD})")
    add_inference_model_args(parser)
    parser.add_argument("--infer_list", default=None, help="image ids (default: <root>/train.txt)")
    parser.add_argument("--scales", type=positive_float, nargs="+", default=None,
                        help="inference scales (default: the method's; SEAM 0.5 1 1.5 2, SIPE 1 0.5 1.5 2)")
    parser.add_argument("--out_cam", default=None, help="folder for the CAM dicts (.npy)")
    parser.add_argument("--out_is_cam", default=None,
                        help="SIPE/AE-SIPE: folder for the reference's {'keys', 'IS_CAM'} dicts (.npy)")
    parser.add_argument("--out_cam_bg", default=None,
                        help="SIPE/AE-SIPE: folder for one-based CAM dicts whose key 0 is the method's own "
                             "background (tool/contract.py; what IRN's sipe / ae_sipe variants read)")
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
    if not (args.out_cam or args.out_cam_pred or args.out_crf or args.out_vis or args.out_is_cam or args.out_cam_bg):
        parser.error("nothing to write: give at least one of --out_cam --out_cam_pred --out_crf --out_vis "
                     "--out_is_cam")
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
    if args.out_is_cam:
        paths.append(os.path.join(args.out_is_cam, f"{image_id}.npy"))
    if args.out_cam_bg:
        paths.append(os.path.join(args.out_cam_bg, f"{image_id}.npy"))
    return paths


def resolve_method(flag: str | None, saved: dict, weights: str) -> str:
    """The checkpoint's method; ``flag`` for files without one (default avc); a contradiction is an error."""
    recorded = saved.get("method")
    if recorded is not None and recorded not in SEED_METHOD_NAMES:
        raise DataError(f"{weights}: trained with seed method {recorded!r}, which this version does not know "
                        f"(known: {', '.join(SEED_METHOD_NAMES)})")
    if flag is not None and recorded is not None and flag != recorded:
        raise DataError(f"{weights}: trained with --method {recorded}, but --method {flag} was given")
    return recorded or flag or "avc"


def pcm_affinity(model: torch.nn.Module, item: dict, device: torch.device) -> tuple[np.ndarray, tuple[int, int]]:
    """The PCM affinity (N, N) of the unflipped view closest to scale 1 and its CAM grid size."""
    image = item["image"]
    view = item["views"][min(range(len(item["views"])),
                             key=lambda index: abs(item["views"][index].shape[-1] - image.shape[1]))]
    with torch.inference_mode():
        output = model(view[:1].to(device))
    return output["affinity"][0].float().cpu().numpy(), tuple(output["cam"].shape[-2:])


def visualise(image: np.ndarray, affinity: tuple[np.ndarray, tuple[int, int]] | None, cam_dict: dict,
              seed: np.ndarray) -> np.ndarray:
    """CAM overlays, the seed, and (AVC/SEAM) the PCM affinity (:func:`pcm_affinity`) sorted by seed class."""
    pictures = [image] + [cam_overlay(image, cam_dict[key]) for key in sorted(cam_dict)]
    pictures.append(label_overlay(image, seed))
    if affinity is None:
        return tile_row(pictures)
    matrix, cam_hw = affinity
    seed_small = F.interpolate(torch.from_numpy(seed)[None, None].float(), size=cam_hw,
                               mode="nearest")[0, 0].numpy()
    picture = affinity_matrix_picture(matrix, seed_small, size=image.shape[0])
    return tile_row(pictures + [picture])


def write_seed_outputs(args: argparse.Namespace, num_classes: int, item: dict, cams: ImageCams,
                       affinity: tuple[np.ndarray, tuple[int, int]] | None = None) -> str:
    """Everything one image's fused CAMs give: CAM dict, seed PNG, picture, CRF dicts; returns the id.

    ``cams``: the image's fused CAMs (network.methods); ``affinity``: the :func:`pcm_affinity` of
    the image (AVC/SEAM with ``--out_vis``).
    """
    image_id, image = item["id"], item["image"]
    cam_dict = cams.cam_dict
    if cams.is_cam is not None:  # SIPE: the arg-max with its own background channel
        seed = labels_from_scores(cams.keys.tolist(), cams.is_cam)
    else:
        seed = seed_from_cam_dict(cam_dict, num_classes, args.out_cam_pred_alpha, image.shape[:2])
    if args.out_cam:
        save_score_dict(os.path.join(args.out_cam, f"{image_id}.npy"), cam_dict)
    if args.out_is_cam:
        save_npy(os.path.join(args.out_is_cam, f"{image_id}.npy"), {"keys": cams.keys, "IS_CAM": cams.is_cam})
    if args.out_cam_bg:  # the keys are label values: 0 = the method's background, c + 1 = class c
        save_score_dict(os.path.join(args.out_cam_bg, f"{image_id}.npy"),
                        {int(key): np.ascontiguousarray(cams.is_cam[i]) for i, key in enumerate(cams.keys)})
    if args.out_cam_pred:
        save_palette_png(os.path.join(args.out_cam_pred, f"{image_id}.png"), seed)
    if args.out_vis:
        save_rgb_image(os.path.join(args.out_vis, f"{image_id}.jpg"), visualise(image, affinity, cam_dict, seed))
    if args.out_crf:
        write_crf_dicts(image, cam_dict, image_id, args.out_crf, args.crf_alphas)
    return image_id


def msa_inference(args: argparse.Namespace, name: str, saved: dict, info: DatasetInfo, todo: list[str], infer_list: str,
                  loaded: object, device: torch.device
                  ) -> tuple[Callable[[list[dict]], list[tuple[ImageCams, None]]], MultiScaleDataset]:
    """The per-batch inference of an MSA checkpoint and its dataset (the full images: MSA resizes
    them itself, the evaluator's stretch)."""
    spixel_weights = args.spixel_weights or saved.get("spixel_weights")
    if not spixel_weights:
        raise DataError(f"{args.weights}: an MSA checkpoint needs its superpixel FCN: give --spixel_weights")
    widened = args.widened or bool(saved.get("widened", False))
    model = inference_layout(load_for_inference(lambda width: MSANet(info.num_classes, width, widened=widened),
                                                args.weights, args.width_mult, device, loaded=loaded),
                             device, args.precision)
    spixel = inference_layout(load_for_inference(SpixelNet, spixel_weights, None, device), device, args.precision)
    logger.info("%s from %s, superpixels from %s", name, args.weights, spixel_weights)
    dataset = MultiScaleDataset(info, todo, info.load_cls_labels(), scales=(), source=infer_list)
    method = MSA_METHODS[name]

    def infer(items: list[dict]) -> list[tuple[ImageCams, None]]:
        with inference_autocast(device, args.precision):
            return [(ImageCams(msa_cam_dict(model, spixel, item["image"], item["label"].numpy(),
                                            args.scales or method.scales, device, args.ap_steps, args.ap_threshold,
                                            method.sum_at)), None) for item in items]
    return infer, dataset


def seed_inference(args: argparse.Namespace, info: DatasetInfo, todo: list[str], infer_list: str,
                   device: torch.device) -> tuple[Callable[[list[dict]], list[tuple[ImageCams, tuple | None]]],
                                                  MultiScaleDataset]:
    """The per-batch inference of the checkpoint's method and its dataset of the ``todo`` images."""
    loaded = read_weights(args.weights)
    saved = saved_args(loaded)
    name = resolve_method(args.method, saved, args.weights)
    if (args.out_is_cam or args.out_cam_bg) and (name in MSA_METHODS or METHODS[name].fusion != "sipe"):
        raise DataError(f"{args.weights}: --out_is_cam / --out_cam_bg need a SIPE-family checkpoint (a method "
                        f"with its own background), this is {name}")
    if name in MSA_METHODS:
        return msa_inference(args, name, saved, info, todo, infer_list, loaded, device)
    method = METHODS[name]
    backbone = saved.get("backbone") or method.backbones[0]
    model = load_for_inference(lambda width: build_network(method, info.num_classes, backbone, width),
                               args.weights, args.width_mult, device, loaded=loaded)
    model = inference_layout(model, device, args.precision)
    logger.info("%s (%s) from %s", method.name, backbone, args.weights)
    dataset = MultiScaleDataset(info, todo, info.load_cls_labels(), scales=args.scales or method.scales,
                                source=infer_list)
    picture_affinity = bool(args.out_vis) and method.fusion == "seam"

    def infer(items: list[dict]) -> list[tuple[ImageCams, tuple | None]]:
        with inference_autocast(device, args.precision):
            cams = image_cams_many(method, model, [item["views"] for item in items],
                                   [item["label"].numpy() for item in items],
                                   [item["image"].shape[:2] for item in items], device,
                                   args.seam_cam_norm, amp=args.precision == "bf16")
            return [(image_cams, pcm_affinity(model, item, device) if picture_affinity else None)
                    for item, image_cams in zip(items, cams)]
    return infer, dataset


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    dist = setup_distributed()
    try:
        args.precision = resolve_precision(args.precision, dist.device)  # recorded with the outputs
        log_dir = args.log_dir or next(p for p in (args.out_cam, args.out_cam_pred, args.out_crf, args.out_vis,
                                                   args.out_is_cam, args.out_cam_bg) if p)
        setup_logging(os.path.join(log_dir, "infer_seed.log"), dist.is_main)
        record = OutputRecord("infer_seed", args, lambda image_id: output_paths(args, image_id))
        info = get_dataset_info(args.dataset, args.voc12_root)
        infer_list = args.infer_list or info.list_path("train")
        ids = shard_list(read_id_list(infer_list), args.shard, dist)
        todo = record.pending(ids)
        if todo:  # the model is read while the record digests the weights
            infer, dataset = seed_inference(args, info, todo, infer_list, dist.device)
        todo = record.start(ids)
        if dist.is_main:
            save_config(args, os.path.join(log_dir, "infer_seed_config.json"))
        logger.info("%d of %d images to do (%d already done)", len(todo), len(ids), len(ids) - len(todo))
        if not todo:
            return

        def finish(item: dict, inferred: tuple[ImageCams, tuple | None]) -> str:
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
