"""MSA step 1: train the superpixel FCN (SpixelFCN) on images alone (no labels).

    python train_scn.py --voc12_root VOC2012 --session_name spixel_voc12

The published schedule: Adam (lr 5e-5, betas 0.9/0.999, no weight decay, constant lr), batch
16, 50 epochs, long side 320..640, flip, crop 512, LAB colour + position reconstruction
(position weight 0.003) on a 16 x 16 grid. From scratch (the reference's ``--pretrain`` is never
loaded). Writes ``<save_dir>/<session>.pth`` (keys without ``module.``, as the reference's
train_scn; the classifier loads either spelling), ``_last.pth``, ``_config.json``, ``_log.csv``.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Sequence

import torch

from network.spixel import CELL, POS_WEIGHT, SpixelNet, labxy_target, spixel_loss
from tool.cli import add_dataset_args, add_model_args, add_training_args, positive_float, run_cli
from tool.device import seed_everything, unwrap_model
from tool.distributed import cleanup, setup_distributed
from tool.fileio import DataError, read_id_list
from tool.logs import setup_logging
from tool.sampler import make_loader
from tool.trainer import build_trainer
from voc12.msa_data import SpixelDataset
from workflow.datasets import DATASET_NAMES, get_dataset_info

logger = logging.getLogger("train_scn")

LOSS_TERMS = ("sem", "pos")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(parser, DATASET_NAMES)
    add_model_args(parser)
    add_training_args(parser, batch_size=16, max_epoches=50, lr=5e-5, wt_dec=0.0, crop_size=512,
                      session_name="spixel_fcn", num_workers=2)
    parser.add_argument("--train_list", default=None, help="image ids (default: <root>/train_aug.txt)")
    parser.add_argument("--resize_long", type=int, nargs=2, default=(320, 640), metavar=("MIN", "MAX"),
                        help="random resize of the long side before the crop (reference: 320 640)")
    parser.add_argument("--pos_weight", type=positive_float, default=POS_WEIGHT,
                        help=f"weight of the position term (reference: {POS_WEIGHT})")
    args = parser.parse_args(argv)
    if args.crop_size % CELL:
        parser.error(f"--crop_size must be a multiple of {CELL} (the superpixel grid)")
    return args


def run(args: argparse.Namespace) -> SpixelNet:
    dist = setup_distributed()
    try:
        setup_logging(os.path.join(args.save_dir, f"{args.session_name}.log"), dist.is_main)
        seed_everything(args.seed + dist.rank)
        info = get_dataset_info(args.dataset, args.voc12_root)
        train_list = args.train_list or info.list_path("train_aug")
        dataset = SpixelDataset(info, read_id_list(train_list), crop_size=args.crop_size,
                                resize_long=tuple(args.resize_long), seed=args.seed, source=train_list)
        logger.info("%d training images from %s", len(dataset), train_list)
        if args.weights:
            raise DataError(f"{args.weights}: train_scn starts from scratch (the reference never loads "
                            f"its --pretrain); drop --weights")
        model = SpixelNet(width_mult=args.width_mult)
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.wt_dec)
        trainer, sampler = build_trainer(model, len(dataset), args, dist, LOSS_TERMS, optimizer=optimizer,
                                         poly_power=None)
        model = trainer.model
        model.train()
        for _ in trainer.epochs(sampler):
            for _, images, lab in trainer.progress(make_loader(dataset, sampler, args.num_workers)):
                images = trainer.images_to_device(images)
                with trainer.autocast():
                    association = model(images)
                terms = spixel_loss(association.float(), labxy_target(lab.to(dist.device)), CELL, args.pos_weight)
                total = terms.pop("total")
                trainer.step(total, terms)
        logger.info("final weights: %s", trainer.finish())
        return unwrap_model(model)
    finally:
        cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
