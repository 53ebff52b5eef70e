"""IRN stage 3: pseudo masks from the trained boundary network and the CAM dicts (IRN
``make_sem_seg_labels``, SIPE / AE-SIPE ``make_seg_labels``; ``tool/irn_walk.py``).

Per image: the boundary of the image and its flip (zero-padded to ``--crop_size``, as the
reference, logits averaged), affinity ``1 - max boundary`` along radius-5 paths, the CAMs
(resized to the stride-4 grid) masked by ``1 - boundary`` and walked ``2^logt`` steps over
``affinity^beta`` (sparse: never an N x N matrix), x4, global max, the variant's background
rule (``irn``: constant 0.25; ``sipe`` / ``ae_sipe``: the method's own background, CAMs ^ 1.5),
arg-max. Output: ``<out_dir>/<id>.png`` (palette). PNGs made with the same settings are skipped
(other settings are refused, ``--overwrite`` redoes them); ``--shard K/N`` and torchrun split the
list; on CPU one image is in flight per core, boundary and walk included (``tool/parallel.py``).

    python make_seg_labels.py --weights checkpoints/resnet50_irn.pth --voc12_root VOC2012 \\
        --cam_dir out/cam --out_dir out/irn_masks
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Any, Sequence

import torch
from tqdm import tqdm

from network.irn import INFERENCE_CROP, IRNet, inference_edge
from network.weights import load_for_inference
from tool import transforms as T
from tool.cli import (add_dataset_args, add_inference_model_args, add_overwrite_arg, add_parallel_args, add_shard_args,
                      non_negative_int, positive_float, positive_int, run_cli, shard_list)
from tool.datasets import DatasetInfo
from tool.device import images_to_device, inference_autocast, inference_layout, resolve_precision
from tool.distributed import cleanup, setup_distributed
from tool.fileio import load_score_dict, read_id_list, read_rgb_image, save_palette_png
from tool.ir_label import split_cam_dict
from tool.irn_walk import SEG_LABEL_VARIANTS, seg_label
from tool.logs import config_dict, save_config, setup_logging
from tool.outputs import OutputRecord
from tool.parallel import run_images
from tool.path_index import INFER_RADIUS
from voc12.data import CamDictDataset
from workflow.datasets import DATASET_NAMES, get_dataset_info

logger = logging.getLogger("make_seg_labels")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(parser, DATASET_NAMES)
    add_shard_args(parser)
    parser.add_argument("--weights", required=True, help="trained IRN (.pth: ours or the reference's res50_irn.pth)")
    add_inference_model_args(parser)
    parser.add_argument("--infer_list", default=None, help="image ids (default: <root>/train.txt)")
    parser.add_argument("--cam_dir", required=True, help="folder of the CAM dicts <id>.npy")
    parser.add_argument("--out_dir", required=True, help="folder for the pseudo-mask PNGs")
    parser.add_argument("--variant", choices=sorted(SEG_LABEL_VARIANTS), default="irn",
                        help="background rule: irn (constant 0.25, any CAM dict) or sipe / ae_sipe (the "
                             "CAM dict's own background, key 0 of a one-based dict) (default irn)")
    parser.add_argument("--beta", type=positive_float, default=10.0, help="affinity exponent (default 10)")
    parser.add_argument("--logt", type=non_negative_int, default=8, help="the walk takes 2^logt steps (default 8)")
    parser.add_argument("--radius", type=positive_int, default=INFER_RADIUS, help="path radius (default 5)")
    parser.add_argument("--crop_size", type=positive_int, default=INFERENCE_CROP,
                        help="images are zero-padded to this size before the network (default 512; "
                             "GroupNorm sees the padding)")
    parser.add_argument("--num_workers", type=non_negative_int, default=4,
                        help="image-reading workers of the CUDA path")
    add_parallel_args(parser, batching=False)
    add_overwrite_arg(parser)
    return parser.parse_args(argv)


class SegLabelDataset(CamDictDataset):
    """``{"id", "image_hw", "input" (float32 1 x 3 x H x W normalised), "cam_dict", "cam_path"}``."""

    def __init__(self, info: DatasetInfo, ids: Sequence[str], cam_dir: str, one_based: bool,
                 source: str | None = None) -> None:
        super().__init__(info, ids, cam_dir, source)
        self.one_based = one_based

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = self.ids[index]
        image = read_rgb_image(self.info.image_path(image_id))
        cam_path = self.cam_path(image_id)
        return {"id": image_id, "image_hw": image.shape[:2],
                "input": torch.from_numpy(T.hwc_to_chw(T.normalize(image)))[None],
                "cam_dict": load_score_dict(cam_path, self.info.num_classes, one_based=self.one_based),
                "cam_path": cam_path}


def run(args: argparse.Namespace) -> int:
    """Write the PNGs of this process's part of the list; returns the number written."""
    dist = setup_distributed()
    try:
        args.precision = resolve_precision(args.precision, dist.device)  # recorded with the outputs
        setup_logging(os.path.join(args.out_dir, "make_seg_labels.log"), dist.is_main)
        record = OutputRecord("make_seg_labels", args, lambda image_id: [os.path.join(args.out_dir, f"{image_id}.png")])
        logger.info("configuration: %s", config_dict(args))
        info = get_dataset_info(args.dataset, args.voc12_root)
        variant = SEG_LABEL_VARIANTS[args.variant]
        infer_list = args.infer_list or info.list_path("train")
        ids = shard_list(read_id_list(infer_list), args.shard, dist)
        todo = record.start(ids)
        if dist.is_main:
            save_config(args, os.path.join(args.out_dir, "make_seg_labels_config.json"))
        logger.info("%d of %d images to do (%d already done)", len(todo), len(ids), len(ids) - len(todo))
        if not todo:
            return 0
        dataset = SegLabelDataset(info, todo, args.cam_dir, variant.own_background, source=infer_list)
        model = load_for_inference(lambda width: IRNet(width_mult=width), args.weights, args.width_mult, dist.device)
        model = inference_layout(model, dist.device, args.precision)

        def infer(items: list[dict[str, Any]]) -> list[torch.Tensor]:
            with torch.inference_mode(), inference_autocast(dist.device, args.precision):
                return [inference_edge(model, images_to_device(items[0]["input"], dist.device), args.crop_size).cpu()]

        def finish(item: dict[str, Any], edge: torch.Tensor) -> str:
            image_hw = tuple(item["image_hw"])
            class_ids, cams, background = split_cam_dict(item["cam_dict"], variant.own_background, image_hw,
                                                         source=item["cam_path"])
            label = seg_label(variant, edge.float(), class_ids, cams, background, image_hw, args.radius,
                              args.beta, args.logt)
            save_palette_png(os.path.join(args.out_dir, f"{item['id']}.png"), label)
            return item["id"]

        results = run_images(dataset, infer, finish, device=dist.device, threads=args.threads,
                             num_workers=args.num_workers)
        for _ in tqdm(results, total=len(dataset), desc="IRN masks", disable=not dist.is_main, dynamic_ncols=True):
            pass
        return len(todo)
    finally:
        cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
