"""Stage 4: train a segmentation network on pseudo masks (the masks stand in for ground truth).

``--arch`` picks the network from ``network.segmenters.SEGMENTERS``; its published recipe
gives the defaults:

* ``deeplabv1_resnet38`` (default), the DeepLabV1 "seamv1-pseudovoc" release: batch 10, 20k
  iterations, crops of 448 after a random rescale 0.5..1.5, HSV jitter (10, 10, 10) and flip;
  SGD with momentum 0.9, weight decay 5e-4, poly (0.9) schedule, new layers at 10x the
  learning rate; cross entropy that ignores 255. With ``--weights`` the backbone starts from
  ImageNet or from a trained classifier and is frozen as for every fine-tuned ResNet38 (frozen
  BatchNorm, conv1a/b2* fixed); without, everything trains from scratch (BatchNorm included).
* ``deeplabv2_resnet101`` (kazuto1011/deeplab-pytorch): batch 5 x 2 accumulated
  (``--batch_size 10 --iter_size 2``), 20k iterations, crop 321 after a rescale by one of
  0.5/0.75/1/1.25/1.5, flip; lr 2.5e-4, ASPP weights 10x and biases 20x without decay,
  momentum 0.9, weight decay 5e-4, poly 0.9 updated every 10 iterations; BatchNorm frozen;
  the loss sums the cross entropy of the 1x, 0.5x, 0.75x logits and their max, the labels
  resized (nearest) to each (the reference swaps height and width there: fixed). ``--weights``
  is ``deeplabv1_resnet101-coco.pth`` (COCO segmentation: pixel supervision), torchvision's
  ``resnet101-63fe2227.pth`` (ImageNet) or a DeepLabV2 checkpoint; without, from scratch.

The init is recorded in the checkpoint and the config (``init``, ``input_convention``).
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
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from network.deeplabv2 import to_input_convention
from network.segmenters import ALIASES, SEGMENTERS, Segmenter, get_segmenter
from tool.cli import (add_dataset_args, add_model_args, add_training_args, non_negative_int,
                      positive_float, positive_int, run_cli, shard_list)
from tool.datasets import DatasetInfo
from tool.device import seed_everything, unwrap_model
from tool.distributed import DistInfo, cleanup, setup_distributed
from tool.fileio import read_id_list
from tool.logs import setup_logging
from tool.metrics import ConfusionMatrix
from tool.multiscale import forward_views
from tool.sampler import make_loader
from tool.trainer import build_trainer
from voc12.data import SegmentationDataset
from workflow.datasets import DATASET_NAMES, get_dataset_info

logger = logging.getLogger(__name__)

DEFAULT_ARCH = "deeplabv1_resnet38"


def build_parser(arch: str = DEFAULT_ARCH) -> argparse.ArgumentParser:
    """The flags, with the defaults of ``arch``'s published recipe."""
    recipe = get_segmenter(arch).train
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(parser, DATASET_NAMES)
    add_model_args(parser)
    parser.add_argument("--arch", choices=[*SEGMENTERS, *ALIASES], default=DEFAULT_ARCH,
                        help=f"segmentation network (default {DEFAULT_ARCH}); sets the defaults below")
    add_training_args(parser, batch_size=recipe.batch_size, max_iters=recipe.max_iters, lr=recipe.lr,
                      wt_dec=recipe.wt_dec, crop_size=recipe.crop_size, session_name="deeplab",
                      momentum=recipe.momentum)
    parser.add_argument("--iter_size", type=positive_int, default=recipe.iter_size,
                        help=f"sub-batches whose gradients one step accumulates (--batch_size images in "
                             f"all; default {recipe.iter_size})")
    parser.add_argument("--lr_update_every", type=positive_int, default=recipe.lr_update_every,
                        help=f"recompute the poly lr every N steps (default {recipe.lr_update_every})")
    parser.add_argument("--train_list", default=None, metavar="FILE",
                        help="training ids (default: <list dir>/train_aug.txt of the dataset)")
    parser.add_argument("--pseudo_dir", default=None, metavar="DIR",
                        help="folder of pseudo-mask PNGs <id>.png used as labels "
                             "(default: the dataset's ground truth, i.e. full supervision)")
    parser.add_argument("--val_list", default=None, metavar="FILE",
                        help="ids with ground truth for a single-scale validation mIoU during training")
    parser.add_argument("--val_every", type=non_negative_int, default=0,
                        help="validate every N steps (0: only at the end); needs --val_list")
    parser.add_argument("--bn_momentum", type=positive_float, default=recipe.bn_momentum,
                        help=f"BatchNorm momentum of the trained BatchNorms (default {recipe.bn_momentum}, "
                             "the reference; short from-scratch runs need a larger one, e.g. 0.1, "
                             "or the running statistics never leave their initial values)")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--arch", default=DEFAULT_ARCH)
    arch = first.parse_known_args(argv)[0].arch
    parser = build_parser(ALIASES.get(arch, arch) if ALIASES.get(arch, arch) in SEGMENTERS else DEFAULT_ARCH)
    args = parser.parse_args(argv)
    args.arch = ALIASES.get(args.arch, args.arch)
    if args.val_every and args.val_list is None:
        parser.error("--val_every needs --val_list")
    if args.batch_size % args.iter_size:
        parser.error(f"--batch_size {args.batch_size} must be a multiple of --iter_size {args.iter_size}")
    return args


def build_model(args: argparse.Namespace, info: DatasetInfo, dist: DistInfo) -> nn.Module:
    """The ``--arch`` network started from ``--weights`` (as its table entry says) or from scratch.

    Records the start in ``args`` (``init``, ``init_description``, ``input_convention``), so the
    config and every checkpoint carry it.
    """
    segmenter = get_segmenter(args.arch)
    model, start = segmenter.build(info.num_classes, args.width_mult, args.weights, args.bn_momentum)
    args.init, args.init_description, args.input_convention = start.init, start.describe(), start.input_convention
    if dist.distributed and dist.device.type == "cuda":
        # Batch statistics over the global batch, as with one GPU (frozen BatchNorms are untouched).
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def accumulate_step(trainer, model: nn.Module, segmenter: Segmenter, images: torch.Tensor,
                    labels: torch.Tensor, iter_size: int, convention: str) -> None:
    """One optimiser step over ``iter_size`` sub-batches (DeepLabV2's ITER_SIZE): each
    back-propagates (sum of its loss terms) / iter_size; the logged terms are their means."""
    trainer.zero_grad()
    totals: dict[str, torch.Tensor] = {}
    for sub_images, sub_labels in zip(images.chunk(iter_size), labels.chunk(iter_size)):
        with trainer.autocast():
            outputs = model(to_input_convention(sub_images, convention))
        terms = segmenter.loss(outputs, sub_labels)
        (sum(terms.values()) / iter_size).backward()
        for name, value in terms.items():
            totals[name] = totals.get(name, 0.0) + value.detach() / iter_size
    trainer.step(sum(totals.values()), totals, backward=False)


def validate(model: nn.Module, dataset: SegmentationDataset | None, num_labels: int, dist: DistInfo,
             amp: bool, num_workers: int, segmenter: Segmenter | None = None,
             convention: str = "torchvision") -> float:
    """Single-scale mIoU of ``model`` on ``dataset`` (this rank's share), summed over ranks.

    Runs in eval mode and restores the previous mode. The loader has its own generator, so
    validation draws nothing from the global RNGs (a resumed run stays bit-exact).
    """
    segmenter = segmenter or get_segmenter(DEFAULT_ARCH)
    net = unwrap_model(model)
    was_training = net.training
    net.eval()
    confusion = ConfusionMatrix(num_labels)
    if dataset is not None:
        loader = DataLoader(dataset, batch_size=1, num_workers=num_workers,
                            generator=torch.Generator().manual_seed(0))
        for _, image, label in tqdm(loader, desc="validate", disable=not dist.is_main, leave=False):
            logits = forward_views(lambda x: net(to_input_convention(x, convention)), [image],
                                   tuple(label.shape[-2:]), align_corners=segmenter.test.align_corners,
                                   device=dist.device, amp=amp)
            confusion.update(logits[0].argmax(0), label[0].to(dist.device))
    confusion.all_reduce()
    net.train(was_training)
    return confusion.mean_iou()


def run(args: argparse.Namespace) -> nn.Module:
    """Train as the flags say; returns the trained (unwrapped) model."""
    dist = setup_distributed()
    try:
        setup_logging(os.path.join(args.save_dir, f"{args.session_name}.log"), dist.is_main)
        info = get_dataset_info(args.dataset, args.voc12_root)
        train_list = args.train_list or info.list_path("train_aug")
        train_ids = read_id_list(train_list)
        segmenter = get_segmenter(args.arch)
        recipe = segmenter.train
        dataset = SegmentationDataset(info, train_ids, label_dir=args.pseudo_dir, crop_size=args.crop_size,
                                      scale_range=recipe.scale_range, seed=args.seed, augment=True,
                                      hsv_shift=recipe.hsv_shift, source=train_list,
                                      scale_choices=recipe.scale_choices)
        val_dataset = None
        if args.val_list:
            val_ids = shard_list(read_id_list(args.val_list), None, dist)
            if val_ids:
                val_dataset = SegmentationDataset(info, val_ids, label_dir=None, augment=False,
                                                  source=args.val_list)

        seed_everything(args.seed + dist.rank)
        model = build_model(args, info, dist)
        trainer, sampler = build_trainer(model, len(dataset), args, dist, segmenter.loss_names,
                                         max_step=args.max_iters)
        model = trainer.model
        val_log = None
        if dist.is_main and args.val_list:
            val_log = trainer.open_log(os.path.join(args.save_dir, f"{args.session_name}_val.csv"),
                                       ("step", "miou"))
        logger.info("%s (init: %s); %d training images from %s, labels from %s; %d steps of batch %d "
                    "in %d sub-batches (%d per epoch)", segmenter.title, args.init_description, len(dataset),
                    train_list, args.pseudo_dir or "the ground truth", args.max_iters, args.batch_size,
                    args.iter_size, sampler.batches_per_epoch)

        def validate_now() -> None:
            miou = validate(model, val_dataset, info.num_labels, dist, args.amp, args.num_workers,
                            segmenter, args.input_convention)
            if val_log is not None:
                val_log.log({"step": trainer.global_step, "miou": f"{miou:.6f}"})
                logger.info("step %d: validation mIoU %.2f%%", trainer.global_step, 100 * miou)

        model.train()
        validated_at = -1
        for _ in trainer.epochs(sampler):
            for _, images, labels in trainer.progress(make_loader(dataset, sampler, args.num_workers)):
                images = trainer.images_to_device(images)
                labels = labels.to(dist.device, non_blocking=True)
                accumulate_step(trainer, model, segmenter, images, labels, args.iter_size, args.input_convention)
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
