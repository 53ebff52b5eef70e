"""IRN stage 2: train the class-boundary and displacement branches from the IR labels
(IRN ``step/train_irn.py``; SIPE/AE-SIPE ``train_irn.py``).

The ResNet-50 backbone is frozen (detached, eval mode); pair labels within radius 10 on the
stride-4 grid of each crop (``voc12/irn_dataset.py``); loss ``network.irn.boundary_training_terms``
(affinity -log terms, displacement L1 terms, normalised over the batch). Published schedule:
batch 32, crop 512, 3 epochs, lr 0.1 (boundary) / 1.0 (displacement), weight decay 1e-4 on every
parameter, poly 0.9, and the reference's effective optimiser: SGD with momentum 1e-4 (its
PolyOptimizer passes the weight decay into SGD's momentum slot). After training, the mean
displacement over ``--mean_list`` (top-left crops, eval mode) becomes ``mean_shift``.

    python train_irn.py --voc12_root VOC2012 --ir_label_dir out/ir_label \\
        --weights resnet50-19c8e357.pth --session_name resnet50_irn
    torchrun --nproc_per_node 4 train_irn.py ...      # same flags, DistributedDataParallel

Writes ``<save_dir>/<session>.pth`` (final), ``<session>_last.pth`` (``--resume auto``),
``<session>_config.json`` and ``<session>_log.csv``.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Sequence

import torch
from torch.utils.data import DataLoader

from network.irn import IRNet, boundary_training_terms, displacement_sum
from network.weights import load_pretrained_backbone
from tool.cli import add_dataset_args, add_model_args, add_training_args, run_cli
from tool.device import images_to_device, seed_everything, unwrap_model
from tool.distributed import all_reduce_tensor, cleanup, setup_distributed
from tool.fileio import DataError, read_id_list
from tool.logs import setup_logging
from tool.path_index import TRAIN_RADIUS, check_path_size
from tool.sampler import make_loader
from tool.trainer import build_trainer
from voc12.irn_dataset import LABEL_STRIDE, IrLabelDataset, TopLeftCropDataset
from workflow.datasets import DATASET_NAMES, get_dataset_info

logger = logging.getLogger("train_irn")

LOSS_TERMS = ("pos_aff", "neg_aff", "dp_fg", "dp_bg")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(parser, DATASET_NAMES)
    add_model_args(parser)
    add_training_args(parser, batch_size=32, max_epoches=3, lr=0.1, wt_dec=1e-4, crop_size=512,
                      momentum=1e-4, session_name="resnet50_irn", num_workers=8)
    parser.add_argument("--train_list", default=None, metavar="FILE",
                        help="image ids to train on (default: <root>/train_aug.txt)")
    parser.add_argument("--mean_list", default=None, metavar="FILE",
                        help="image ids of the displacement-mean pass (default: <root>/train.txt; "
                             "AE-SIPE used val)")
    parser.add_argument("--ir_label_dir", required=True, metavar="DIR", help="IR labels <id>.png (make_ir_labels.py)")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.crop_size % LABEL_STRIDE:
        parser.error(f"--crop_size must be a multiple of {LABEL_STRIDE}, got {args.crop_size}")
    try:
        check_path_size(TRAIN_RADIUS, args.crop_size // LABEL_STRIDE, args.crop_size // LABEL_STRIDE)
    except ValueError as error:
        parser.error(f"--crop_size {args.crop_size}: {error}")
    return args


def set_mean_shift(model: IRNet, dataset: TopLeftCropDataset, batch_size: int, num_workers: int,
                   dist, device: torch.device) -> torch.Tensor:
    """The displacement-mean pass (batches of ``batch_size``, the tail dropped as the reference),
    split over ranks; assigns and returns the mean."""
    batch_size = min(batch_size, len(dataset))
    batches = [list(range(start, start + batch_size))
               for start in range(0, len(dataset) - batch_size + 1, batch_size)][dist.rank::dist.world_size]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers)
    total, count = displacement_sum(model, (images_to_device(images, device) for _, images in loader))
    total = all_reduce_tensor(total.to(device), op="sum").cpu()
    count = int(all_reduce_tensor(torch.tensor(float(count), device=device), op="sum").item())
    mean = (total / count).float()
    model.mean_shift.running_mean.copy_(mean.to(model.mean_shift.running_mean.device))
    return mean


def run(args: argparse.Namespace) -> IRNet:
    """Train as the flags say; returns the trained (unwrapped) model."""
    dist = setup_distributed()
    try:
        setup_logging(os.path.join(args.save_dir, f"{args.session_name}.log"), dist.is_main)
        seed_everything(args.seed + dist.rank)
        info = get_dataset_info(args.dataset, args.voc12_root)
        train_list = args.train_list or info.list_path("train_aug")
        dataset = IrLabelDataset(info, read_id_list(train_list), args.ir_label_dir, crop_size=args.crop_size,
                                 seed=args.seed, source=train_list)
        mean_list = args.mean_list or info.list_path("train")
        mean_dataset = TopLeftCropDataset(info, read_id_list(mean_list), args.crop_size, source=mean_list)
        logger.info("%d training images from %s (%s), IR labels from %s", len(dataset), train_list, info.name,
                    args.ir_label_dir)

        model = IRNet(width_mult=args.width_mult)
        if args.weights:
            load_pretrained_backbone(model, args.weights)
            logger.info("backbone from %s, frozen (detached, eval mode)", args.weights)
        else:
            logger.info("no --weights: the backbone keeps its random initialisation, frozen as the reference freezes it")
        trainer, sampler = build_trainer(model, len(dataset), args, dist, LOSS_TERMS)
        model = trainer.model
        logger.info("%d steps of batch %d (%d per epoch)", trainer.max_step, args.batch_size, sampler.batches_per_epoch)

        path_index = dataset.path_index
        model.train()
        for _ in trainer.epochs(sampler):
            model.train()
            for _, images, pair_labels in trainer.progress(make_loader(dataset, sampler, args.num_workers)):
                images = trainer.images_to_device(images)
                bg_pos, fg_pos, neg = (labels.to(dist.device, non_blocking=True) for labels in pair_labels)
                with trainer.autocast():
                    edge_out, dp_out = model(images)
                terms = boundary_training_terms(edge_out, dp_out, path_index, bg_pos, fg_pos, neg)
                trainer.step(terms["total"], {name: terms[name] for name in LOSS_TERMS})
        net = unwrap_model(model)
        with trainer.autocast():
            mean = set_mean_shift(net, mean_dataset, args.batch_size, args.num_workers, dist, dist.device)
        if not torch.isfinite(mean).all():
            raise DataError(f"the displacement mean over {mean_list} is not finite: {mean.tolist()}")
        logger.info("mean displacement over %s: %s", mean_list, [round(v, 6) for v in mean.tolist()])
        logger.info("final weights: %s", trainer.finish())
        return net
    finally:
        cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
