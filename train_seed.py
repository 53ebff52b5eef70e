"""Stage 1: train a seed classifier of the method table (network/methods.py) from image-level labels.

    python train_seed.py --method sipe --voc12_root VOC2012 --weights resnet50-19c8e357.pth
    python train_seed.py --method ae_sipe ...      # AE-SIPE; --method avc / seam: as train_avc.py
    torchrun --nproc_per_node 4 train_seed.py ...   # same flags, DistributedDataParallel

Every default (batch, epochs, lr, weight decay, momentum, crop, resize range) is the method's
published one; ``--help`` after ``--method M`` shows them. SIPE/AE-SIPE reproduce the reference's
*effective* optimiser: SGD momentum 1e-4 (its PolyOptimizerSGD passes the weight decay into
SGD's momentum slot; the 0.9 is the poly power), weight decay 1e-4 on every trained tensor,
new layers at 10x lr, gradient norm clipped to 1.0. No ``--weights`` trains from scratch
(BatchNorm then trains too). The checkpoint records method, backbone and width, so
``infer_seed.py`` needs none of them again. Writes ``<save_dir>/<session>.pth`` (the final
weights: no checkpoint is chosen with ground truth), ``<session>_last.pth``,
``<session>_config.json`` and ``<session>_log.csv`` (every loss term).
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Sequence

import torch.nn as nn

from network.methods import METHODS, SeedMethod, build_network, get_method
from network.weights import start_from_weights
from tool.cli import add_dataset_args, add_model_args, add_training_args, positive_int, run_cli
from tool.device import seed_everything, unwrap_model
from tool.distributed import cleanup, setup_distributed
from tool.fileio import read_id_list
from tool.logs import setup_logging
from tool.sampler import make_loader
from tool.trainer import build_trainer
from voc12.data import ClassificationDataset
from workflow.datasets import DATASET_NAMES, get_dataset_info

logger = logging.getLogger("train_seed")


def _method_of(argv: Sequence[str] | None, default: str) -> SeedMethod:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", choices=tuple(METHODS), default=default)
    return METHODS[pre.parse_known_args(argv)[0].method]


def parse_args(argv: Sequence[str] | None = None, default_method: str = "sipe",
               description: str | None = None) -> argparse.Namespace:
    """The flags of ``--method`` (default ``default_method``) with that method's defaults."""
    method = _method_of(argv, default_method)
    training = dict(method.training)
    resize_long = training.pop("resize_long")
    parser = argparse.ArgumentParser(description=description or __doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=tuple(METHODS), default=default_method,
                        help="seed method: " + "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()))
    parser.add_argument("--backbone", choices=method.backbones, default=method.backbones[0],
                        help=f"backbone of {method.name} (default {method.backbones[0]})")
    add_dataset_args(parser, DATASET_NAMES)
    add_model_args(parser)
    add_training_args(parser, **training)
    parser.add_argument("--train_list", default=None,
                        help="image ids to train on (default: <root>/train_aug.txt)")
    parser.add_argument("--resize_long", type=positive_int, nargs=2, default=tuple(resize_long),
                        metavar=("MIN", "MAX"), help="random resize of the long side before the crop "
                                                     f"(default {resize_long[0]} {resize_long[1]})")
    method.add_flags(parser)
    parser.set_defaults(**method.defaults)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> nn.Module:
    """Train as the flags say; returns the trained (unwrapped) model."""
    method = get_method(args.method)
    dist = setup_distributed()
    try:
        setup_logging(os.path.join(args.save_dir, f"{args.session_name}.log"), dist.is_main)
        seed_everything(args.seed + dist.rank)
        info = get_dataset_info(args.dataset, args.voc12_root)
        train_list = args.train_list or info.list_path("train_aug")
        dataset = ClassificationDataset(info, read_id_list(train_list), info.load_cls_labels(),
                                        crop_size=args.crop_size, resize_long=tuple(args.resize_long),
                                        seed=args.seed, source=train_list, color_jitter=method.color_jitter,
                                        valid_mask=method.valid_mask)
        logger.info("%s: %d training images from %s (%s, %d classes)", method.name, len(dataset), train_list,
                    info.name, info.num_classes)

        model = build_network(method, info.num_classes, args.backbone, args.width_mult, args)
        start_from_weights(model, args.weights)
        trainer, sampler = build_trainer(model, len(dataset), args, dist, method.loss_terms,
                                         group_specs=method.group_specs, clip_grad_norm=method.clip_grad_norm)
        model = trainer.model

        model.train()
        for _ in trainer.epochs(sampler):
            for batch in trainer.progress(make_loader(dataset, sampler, args.num_workers)):
                tensors = {"images": trainer.images_to_device(batch[1]), "labels": batch[2].to(dist.device, non_blocking=True)}
                if method.valid_mask:
                    tensors["valid"] = batch[3].to(dist.device, non_blocking=True)
                with trainer.autocast():
                    terms = method.losses(model, tensors, args)
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
