"""MSA step 2: train the MSA classifier (DCR + AP + IPC) from image-level labels.

    python train_msa.py --voc12_root VOC2012 --weights resnet50-19c8e357.pth \
        --spixel_weights checkpoints/spixel_fcn.pth --session_name msa_voc12
    python train_msa.py ... --variant saliency --sal_dir VOC2012/saliency_poolnet

The reference's schedule: batch 16, 12 epochs, long side 320..640, flip, crop 480, lr 0.1 in
four groups (x1/x2/x10/x20; weight decay 4e-5 on weights), Nesterov SGD with momentum 4e-5
(the reference's weight decay lands in SGD's momentum slot), poly power 0.5 (image) / 0.9
(saliency), gradient norm clipped to 1, IPC weight 0.3. The image variant trains with AP (8
steps, threshold 0.6), the saliency variant without.

``--variant saliency`` needs ``--sal_dir`` (PoolNet PNGs, one per id). PoolNet is trained with
pixel labels: that variant is not purely image-level supervised. ``--widened`` is the committed
design's kernel heads (256 input channels) instead of the shipped bytecode's default. The
superpixel FCN (``--spixel_weights``, from train_scn.py) stays frozen. No ``--weights`` trains
from scratch (BatchNorm then trains instead of the reference's FixedBatchNorm).
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Sequence

import torch

from network.msa import AP_THRESHOLD, IPC_VARIANTS, IPC_WEIGHT, MSANet, msa_losses, msa_optimizer
from network.spixel import CELL, SpixelNet
from network.weights import load_for_inference, load_pretrained_backbone
from tool.cli import add_dataset_args, add_model_args, add_training_args, positive_float, run_cli
from tool.device import seed_everything, unwrap_model
from tool.distributed import cleanup, setup_distributed
from tool.fileio import read_id_list
from tool.logs import setup_logging
from tool.sampler import make_loader
from tool.trainer import build_trainer
from voc12.msa_data import MSAClassificationDataset
from workflow.datasets import DATASET_NAMES, get_dataset_info

logger = logging.getLogger("train_msa")

LOSS_TERMS = ("cls", "ipc")


def add_msa_args(parser: argparse.ArgumentParser) -> None:
    """The MSA classifier's own flags (training and inference share them)."""
    group = parser.add_argument_group("MSA")
    group.add_argument("--widened", action="store_true",
                       help="the committed reference's kernel heads (features + superpixel features, 256 "
                            "channels); default: the shipped bytecode (features only)")
    group.add_argument("--ap_threshold", type=float, default=AP_THRESHOLD,
                       help=f"affinity propagation: affinities below this are zeroed (default {AP_THRESHOLD})")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(parser, DATASET_NAMES)
    add_model_args(parser)
    add_training_args(parser, batch_size=16, max_epoches=12, lr=0.1, wt_dec=4e-5, momentum=4e-5, crop_size=480,
                      session_name="msa", num_workers=8)
    add_msa_args(parser)
    parser.add_argument("--spixel_weights", required=True, help="trained superpixel FCN (train_scn.py)")
    parser.add_argument("--variant", choices=sorted(IPC_VARIANTS), default="image",
                        help="IPC target: the image (9 patches) or a saliency map (1 patch; needs --sal_dir; "
                             "saliency detectors are trained with pixel labels)")
    parser.add_argument("--sal_dir", default=None, help="saliency PNGs <sal_dir>/<id>.png (PoolNet's format)")
    parser.add_argument("--ipc_weight", type=float, default=IPC_WEIGHT, help=f"IPC loss weight (default {IPC_WEIGHT})")
    parser.add_argument("--poly_power", type=positive_float, default=None,
                        help="poly schedule power (default: 0.5 image, 0.9 saliency, as the reference)")
    parser.add_argument("--clip_grad_norm", type=float, default=1.0, help="gradient norm clip (reference: 1)")
    parser.add_argument("--train_list", default=None, help="image ids (default: <root>/train_aug.txt)")
    parser.add_argument("--resize_long", type=int, nargs=2, default=(320, 640), metavar=("MIN", "MAX"),
                        help="random resize of the long side before the crop (reference: 320 640)")
    args = parser.parse_args(argv)
    if args.crop_size % CELL:
        parser.error(f"--crop_size must be a multiple of {CELL} (the superpixel grid)")
    if args.variant == "saliency" and args.sal_dir is None:
        parser.error("--variant saliency needs --sal_dir")
    if args.poly_power is None:
        args.poly_power = IPC_VARIANTS[args.variant].poly_power
    # Recorded in the checkpoint, so inference knows what it loads (seed-method names).
    args.method, args.backbone = ("msa" if args.variant == "image" else "msa_sal"), "resnet50"
    return args


def run(args: argparse.Namespace) -> MSANet:
    dist = setup_distributed()
    try:
        setup_logging(os.path.join(args.save_dir, f"{args.session_name}.log"), dist.is_main)
        seed_everything(args.seed + dist.rank)
        info = get_dataset_info(args.dataset, args.voc12_root)
        train_list = args.train_list or info.list_path("train_aug")
        sal_dir = args.sal_dir if args.variant == "saliency" else None
        dataset = MSAClassificationDataset(info, read_id_list(train_list), info.load_cls_labels(),
                                           crop_size=args.crop_size, resize_long=tuple(args.resize_long),
                                           seed=args.seed, sal_dir=sal_dir, source=train_list)
        logger.info("%d training images from %s; IPC target: %s%s", len(dataset), train_list, args.variant,
                    " (saliency from a detector trained with pixel labels)" if sal_dir else "")
        spixel = load_for_inference(SpixelNet, args.spixel_weights, None, dist.device)
        for parameter in spixel.parameters():
            parameter.requires_grad_(False)

        model = MSANet(info.num_classes, args.width_mult, widened=args.widened, fixed_bn=args.weights is not None)
        if args.weights:
            load_pretrained_backbone(model.model, args.weights)  # torchvision names; fc.* unused
        else:
            logger.info("no --weights: training from scratch (BatchNorm trains)")
        trainer, sampler = build_trainer(model, len(dataset), args, dist, LOSS_TERMS,
                                         optimizer=msa_optimizer(model, args.lr, args.wt_dec, args.momentum),
                                         poly_power=args.poly_power, clip_grad_norm=args.clip_grad_norm or None)
        model = trainer.model
        model.train()
        for _ in trainer.epochs(sampler):
            for _, images, labels, saliency in trainer.progress(make_loader(dataset, sampler, args.num_workers)):
                images, labels = trainer.images_to_device(images), labels.to(dist.device)
                with torch.no_grad():  # the superpixel FCN is frozen (eval mode, never stepped)
                    association = spixel(images)
                with trainer.autocast():
                    terms = msa_losses(model, images, labels, association, args.variant,
                                       saliency=saliency.to(dist.device) if sal_dir else None,
                                       ipc_weight=args.ipc_weight, ap_threshold=args.ap_threshold)
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
