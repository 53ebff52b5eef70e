"""IRN stage 1: IR labels from the CAM dicts of any seed method (IRN ``cam_to_ir_label``,
SIPE ``cam2ir``, AE-SIPE ``cam2ir_bg_subpress``; ``tool/ir_label.py``).

Per image: two CRFs on hard labels (confident foreground from a generous background, confident
background from a stingy one); 0 where both say background, the class where the first says
foreground, 255 elsewhere. ``--variant irn`` (thresholds 0.30 / 0.05) reads the project's CAM
dicts (0-based keys); ``sipe`` / ``ae_sipe`` (the method's own background x 0.5 / x 0.8) read
one-based dicts whose key 0 is that background. Output: ``<out_ir_label>/<id>.png`` (palette;
0 bg, c + 1 class c, 255 unsure). PNGs made with the same settings are skipped (other settings are
refused, ``--overwrite`` redoes them); ``--shard K/N`` and torchrun split the list; the CRFs of
several images run at once, one per core (``tool/parallel.py``, ``--threads``).

    python make_ir_labels.py --voc12_root VOC2012 --cam_dir out/cam --out_ir_label out/ir_label
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Sequence

from tqdm import tqdm

from tool.cli import add_dataset_args, add_overwrite_arg, add_parallel_args, add_shard_args, run_cli, shard_list
from tool.distributed import cleanup, setup_distributed
from tool.fileio import load_score_dict, read_id_list, read_rgb_image, require_files, save_palette_png
from tool.ir_label import IR_LABEL_VARIANTS, get_ir_variant, ir_label, split_cam_dict
from tool.logs import config_dict, save_config, setup_logging
from tool.outputs import OutputRecord
from tool.parallel import plan_workers, run_in_flight
from voc12.data import check_images
from workflow.datasets import DATASET_NAMES, get_dataset_info

logger = logging.getLogger("make_ir_labels")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(parser, DATASET_NAMES)
    add_shard_args(parser)
    parser.add_argument("--infer_list", default=None, help="image ids (default: <root>/train_aug.txt, "
                                                           "the list train_irn.py trains on)")
    parser.add_argument("--cam_dir", required=True, help="folder of the CAM dicts <id>.npy")
    parser.add_argument("--out_ir_label", required=True, help="folder for the IR-label PNGs")
    parser.add_argument("--variant", choices=sorted(IR_LABEL_VARIANTS), default="irn",
                        help="irn: constant backgrounds 0.30/0.05 (any CAM dict); sipe / ae_sipe: the "
                             "CAM's own background (key 0) x 0.5 / x 0.8 (default irn)")
    add_parallel_args(parser, batching=False)
    add_overwrite_arg(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    """Write this process's part of the list; returns the number written."""
    dist = setup_distributed(use_cuda=False)
    try:
        setup_logging(os.path.join(args.out_ir_label, "make_ir_labels.log"), dist.is_main)
        record = OutputRecord("make_ir_labels", args,
                              lambda image_id: [os.path.join(args.out_ir_label, f"{image_id}.png")])
        logger.info("configuration: %s", config_dict(args))
        info = get_dataset_info(args.dataset, args.voc12_root)
        variant = get_ir_variant(args.variant)
        infer_list = args.infer_list or info.list_path("train_aug")
        ids = shard_list(read_id_list(infer_list), args.shard, dist)
        todo = record.start(ids)
        if dist.is_main:
            save_config(args, os.path.join(args.out_ir_label, "make_ir_labels_config.json"))
        logger.info("%d of %d images to do (%d already done)", len(todo), len(ids), len(ids) - len(todo))
        if not todo:
            return 0
        check_images(info, todo, infer_list)
        cam_paths = {image_id: os.path.join(args.cam_dir, f"{image_id}.npy") for image_id in todo}
        require_files(cam_paths.values(), f"CAM dicts in {args.cam_dir}", source=infer_list)

        def work(image_id: str) -> str:
            image = read_rgb_image(info.image_path(image_id))
            cam_dict = load_score_dict(cam_paths[image_id], info.num_classes, one_based=variant.own_background)
            class_ids, cams, background = split_cam_dict(cam_dict, variant.own_background, image.shape[:2],
                                                         source=cam_paths[image_id])
            save_palette_png(os.path.join(args.out_ir_label, f"{image_id}.png"),
                             ir_label(image, class_ids, cams, variant, background))
            return image_id

        for _ in tqdm(run_in_flight(work, todo, plan_workers(args.threads, len(todo))), total=len(todo),
                      desc="IR labels", disable=not dist.is_main, dynamic_ncols=True):
            pass
        return len(todo)
    finally:
        cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
