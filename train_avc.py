"""Stage 1: train the AVC classifier (SEAM + affinity vector consistency) from image-level labels.

    python train_avc.py --voc12_root VOC2012 --weights ilsvrc-cls_rna-a1_cls1000_ep-0001.params \
        --session_name avc_voc12
    torchrun --nproc_per_node 4 train_avc.py ...        # same flags, DistributedDataParallel

No ``--weights`` trains from scratch (BatchNorm then trains too). ``--avc_weight 0`` is SEAM.
Writes ``<save_dir>/<session>.pth`` (final), ``<session>_last.pth`` (every epoch, for
``--resume auto``), ``<session>_config.json`` and ``<session>_log.csv`` (every loss term).
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Sequence

from network.avc import AVCNet, avc_training_losses
from network.weights import start_from_weights
from tool.cli import add_dataset_args, add_model_args, add_training_args, positive_float, run_cli
from tool.datasets import get_dataset_info
from tool.distributed import cleanup, setup_distributed
from tool.fileio import read_id_list
from tool.logs import setup_logging
from tool.training import build_trainer, make_loader, seed_everything, unwrap_model
from voc12.data import ClassificationDataset

logger = logging.getLogger("train_avc")

LOSS_TERMS = ("cls", "min_pool", "er", "ecr", "avc_cross", "avc_sem")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(parser)
    add_model_args(parser)
    add_training_args(parser, batch_size=8, max_epoches=8, lr=0.01, wt_dec=5e-4, crop_size=448,
                      session_name="resnet38_avc", num_workers=8)
    parser.add_argument("--train_list", default=None,
                        help="image ids to train on (default: <root>/train_aug.txt)")
    parser.add_argument("--resize_long", type=int, nargs=2, default=(448, 768), metavar=("MIN", "MAX"),
                        help="random resize of the long side before the crop (SEAM: 448 768)")
    parser.add_argument("--view_scale", type=positive_float, default=0.3,
                        help="rescale factor of the second view (SEAM: 0.3)")
    parser.add_argument("--dropout", action=argparse.BooleanOptionalAction, default=True,
                        help="SEAM's dropout (b6 0.3, b7 0.5, before fc8 0.5); --no-dropout for the tiny-width "
                             "CPU models, where dropping whole channels of a few dozen stalls learning")
    weights = parser.add_argument_group("loss weights (--avc_weight 0 is exactly SEAM)")
    weights.add_argument("--avc_weight", type=float, default=1.0, help="weight of both AVC terms")
    weights.add_argument("--avc_cross_weight", type=float, default=1.0,
                         help="cross-view affinity-vector consistency term")
    weights.add_argument("--avc_sem_weight", type=float, default=1.0,
                         help="semantic affinity-vector term (affinity vs same-class indicator)")
    weights.add_argument("--er_weight", type=float, default=1.0, help="equivariant regularisation")
    weights.add_argument("--ecr_weight", type=float, default=1.0, help="equivariant cross regularisation")
    return parser.parse_args(argv)


def loss_weights(args: argparse.Namespace) -> dict[str, float]:
    return {"avc": args.avc_weight, "avc_cross": args.avc_cross_weight, "avc_sem": args.avc_sem_weight,
            "er": args.er_weight, "ecr": args.ecr_weight}


def run(args: argparse.Namespace) -> AVCNet:
    """Train as the flags say; returns the trained (unwrapped) model."""
    dist = setup_distributed()
    try:
        setup_logging(os.path.join(args.save_dir, f"{args.session_name}.log"), dist.is_main)
        seed_everything(args.seed + dist.rank)
        info = get_dataset_info(args.dataset, args.voc12_root)
        train_list = args.train_list or info.list_path("train_aug")
        dataset = ClassificationDataset(info, read_id_list(train_list), info.load_cls_labels(),
                                        crop_size=args.crop_size, resize_long=tuple(args.resize_long),
                                        seed=args.seed, source=train_list)
        logger.info("%d training images from %s (%s, %d classes)", len(dataset), train_list,
                    info.name, info.num_classes)

        model = AVCNet(num_classes=info.num_classes, width_mult=args.width_mult, dropout=args.dropout)
        start_from_weights(model, args.weights)
        trainer, sampler = build_trainer(model, len(dataset), args, dist, LOSS_TERMS)
        model = trainer.model

        weights = loss_weights(args)
        model.train()
        for _ in trainer.epochs(sampler):
            for _, images, labels in trainer.progress(make_loader(dataset, sampler, args.num_workers)):
                images, labels = trainer.images_to_device(images), labels.to(dist.device, non_blocking=True)
                with trainer.autocast():
                    terms = avc_training_losses(model, images, labels, scale=args.view_scale, weights=weights)
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
