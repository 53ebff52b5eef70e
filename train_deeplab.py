"""Stage 4: train DeepLabV1-ResNet38 on pseudo masks (the masks stand in for ground truth).

The recipe of the DeepLabV1 "seamv1-pseudovoc" release: batch 10, 20k iterations, crops of
448 after a random rescale 0.5..1.5, HSV jitter (10, 10, 10) and flip; SGD with momentum 0.9,
weight decay 5e-4, poly (0.9) schedule, new layers at 10x the learning rate; cross entropy
that ignores 255. With ``--weights`` the backbone starts from ImageNet or from a trained
classifier and is frozen as for every fine-tuned ResNet38 (frozen BatchNorm, conv1a/b2*
fixed); without, everything trains from scratch (BatchNorm included).

Single process or ``torchrun --nproc_per_node N train_deeplab.py ...`` (``--batch_size`` is
the global batch). ``--val_list`` with ground truth adds a single-scale validation mIoU every
``--val_every`` steps and at the end. Example::

    python train_deeplab.py --voc12_root data/VOC2012 --train_list data/VOC2012/train_aug.txt \\
        --pseudo_dir out_rw --weights ilsvrc-cls_rna-a1_cls1000_ep-0001.params --session_name deeplab
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from network.deeplab import DEEPLAB_BN_MOMENTUM, DeepLabV1
from network.weights import start_from_weights
from tool.cli import (add_dataset_args, add_model_args, add_training_args, non_negative_int,
                      positive_float, run_cli, shard_list)
from tool.contract import IGNORE_LABEL
from tool.datasets import DatasetInfo, get_dataset_info
from tool.distributed import DistInfo, cleanup, setup_distributed
from tool.fileio import read_id_list
from tool.logs import setup_logging
from tool.metrics import ConfusionMatrix
from tool.multiscale import forward_views
from tool.training import build_trainer, make_loader, seed_everything, unwrap_model
from voc12.data import SegmentationDataset

logger = logging.getLogger(__name__)

SCALE_RANGE = (0.5, 1.5)
HSV_SHIFT = (10, 10, 10)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(parser)
    add_model_args(parser)
    add_training_args(parser, batch_size=10, max_iters=20000, lr=0.001, wt_dec=5e-4, crop_size=448,
                      session_name="deeplab", momentum=0.9)
    parser.add_argument("--train_list", default=None, metavar="FILE",
                        help="training ids (default: <list dir>/train_aug.txt of the dataset)")
    parser.add_argument("--pseudo_dir", default=None, metavar="DIR",
                        help="folder of pseudo-mask PNGs <id>.png used as labels "
                             "(default: the dataset's ground truth, i.e. full supervision)")
    parser.add_argument("--val_list", default=None, metavar="FILE",
                        help="ids with ground truth for a single-scale validation mIoU during training")
    parser.add_argument("--val_every", type=non_negative_int, default=0,
                        help="validate every N steps (0: only at the end); needs --val_list")
    parser.add_argument("--bn_momentum", type=positive_float, default=DEEPLAB_BN_MOMENTUM,
                        help=f"BatchNorm momentum of the trained BatchNorms (default {DEEPLAB_BN_MOMENTUM}, "
                             "the reference; short from-scratch runs need a larger one, e.g. 0.1, "
                             "or the running statistics never leave their initial values)")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.val_every and args.val_list is None:
        parser.error("--val_every needs --val_list")
    return args


def build_model(args: argparse.Namespace, info: DatasetInfo, dist: DistInfo) -> DeepLabV1:
    """DeepLabV1 with the backbone from ``--weights`` (then frozen) or from scratch."""
    model = DeepLabV1(num_classes=info.num_classes, width_mult=args.width_mult, bn_momentum=args.bn_momentum)
    start_from_weights(model, args.weights)
    if dist.distributed and dist.device.type == "cuda":
        # Batch statistics over the global batch, as with one GPU (frozen BatchNorms are untouched).
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross entropy averaged over the pixels that are not 255 (0, not NaN, if there are none)."""
    per_pixel = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_LABEL, reduction="none")
    num_valid = (labels != IGNORE_LABEL).sum().clamp(min=1)
    return per_pixel.sum() / num_valid


def validate(model: nn.Module, dataset: SegmentationDataset | None, num_labels: int, dist: DistInfo,
             amp: bool, num_workers: int) -> float:
    """Single-scale mIoU of ``model`` on ``dataset`` (this rank's share), summed over ranks.

    Runs in eval mode and restores the previous mode. The loader has its own generator, so
    validation draws nothing from the global RNGs (a resumed run stays bit-exact).
    """
    net = unwrap_model(model)
    was_training = net.training
    net.eval()
    confusion = ConfusionMatrix(num_labels)
    if dataset is not None:
        loader = DataLoader(dataset, batch_size=1, num_workers=num_workers,
                            generator=torch.Generator().manual_seed(0))
        for _, image, label in tqdm(loader, desc="validate", disable=not dist.is_main, leave=False):
            logits = forward_views(net, [image], tuple(label.shape[-2:]), align_corners=True,
                                   device=dist.device, amp=amp)
            confusion.update(logits[0].argmax(0), label[0].to(dist.device))
    confusion.all_reduce()
    net.train(was_training)
    return confusion.mean_iou()


def run(args: argparse.Namespace) -> DeepLabV1:
    """Train as the flags say; returns the trained (unwrapped) model."""
    dist = setup_distributed()
    try:
        setup_logging(os.path.join(args.save_dir, f"{args.session_name}.log"), dist.is_main)
        info = get_dataset_info(args.dataset, args.voc12_root)
        train_list = args.train_list or info.list_path("train_aug")
        train_ids = read_id_list(train_list)
        dataset = SegmentationDataset(info, train_ids, label_dir=args.pseudo_dir, crop_size=args.crop_size,
                                      scale_range=SCALE_RANGE, seed=args.seed, augment=True,
                                      hsv_shift=HSV_SHIFT, source=train_list)
        val_dataset = None
        if args.val_list:
            val_ids = shard_list(read_id_list(args.val_list), None, dist)
            if val_ids:
                val_dataset = SegmentationDataset(info, val_ids, label_dir=None, augment=False,
                                                  source=args.val_list)

        seed_everything(args.seed + dist.rank)
        model = build_model(args, info, dist)
        trainer, sampler = build_trainer(model, len(dataset), args, dist, ("ce",), max_step=args.max_iters)
        model = trainer.model
        val_log = None
        if dist.is_main and args.val_list:
            val_log = trainer.open_log(os.path.join(args.save_dir, f"{args.session_name}_val.csv"),
                                       ("step", "miou"))
        logger.info("%d training images from %s, labels from %s; %d steps of batch %d (%d per epoch)",
                    len(dataset), train_list, args.pseudo_dir or "the ground truth", args.max_iters,
                    args.batch_size, sampler.batches_per_epoch)

        def validate_now() -> None:
            miou = validate(model, val_dataset, info.num_labels, dist, args.amp, args.num_workers)
            if val_log is not None:
                val_log.log({"step": trainer.global_step, "miou": f"{miou:.6f}"})
                logger.info("step %d: validation mIoU %.2f%%", trainer.global_step, 100 * miou)

        model.train()
        validated_at = -1
        for _ in trainer.epochs(sampler):
            for _, images, labels in trainer.progress(make_loader(dataset, sampler, args.num_workers)):
                images = trainer.images_to_device(images)
                labels = labels.to(dist.device, non_blocking=True)
                with trainer.autocast():
                    logits = model(images)
                loss = segmentation_loss(logits, labels)
                trainer.step(loss, {"ce": loss})
                if args.val_list and args.val_every and trainer.global_step % args.val_every == 0:
                    validate_now()
                    validated_at = trainer.global_step
        if args.val_list and validated_at != trainer.global_step:
            validate_now()
        trainer.finish()
        return unwrap_model(model)
    finally:
        cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
