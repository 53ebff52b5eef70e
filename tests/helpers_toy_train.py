"""A tiny but real training script on the shared machinery, for the training tests.

It follows the shape of train_avc.py / train_aff.py / train_deeplab.py: shared flags,
torchrun set-up, parameter groups, poly SGD, EpochBatchSampler, Trainer, checkpoints. Its
model has dropout and its data random augmentation (per-sample from (seed, epoch, index),
plus batch-level python/numpy draws in the loop), so a resume is only bit-exact if every
RNG state is restored.

Run: python -m tests.helpers_toy_train --save_dir DIR [--max_iters 4] [--stop_after 2]
     torchrun --nproc_per_node 2 -m tests.helpers_toy_train --save_dir DIR --dump_weights
"""
from __future__ import annotations

import argparse
import logging
import os
import random
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from tool.cli import add_training_args, positive_int, run_cli
from tool.device import seed_everything, unwrap_model
from tool.distributed import cleanup, setup_distributed
from tool.logs import setup_logging
from tool.sampler import make_loader
from tool.trainer import build_trainer

logger = logging.getLogger(__name__)


class ToyNet(nn.Module):
    """conv-BN-ReLU "backbone" plus a dropout + 1x1 conv head declared as the new layer."""

    new_layers = ("head",)

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(8)
        self.dropout = nn.Dropout2d(0.5)
        self.head = nn.Conv2d(8, num_classes, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.bn(self.conv(x)))
        return self.head(self.dropout(features)).mean(dim=(2, 3))


class ToyDataset(Dataset):
    """Fixed random images with labels; flip and noise drawn from (seed, epoch, index)."""

    def __init__(self, num_samples: int, seed: int) -> None:
        data_rng = np.random.default_rng(1234)
        self.images = data_rng.normal(size=(num_samples, 3, 8, 8)).astype(np.float32)
        self.labels = data_rng.integers(0, 3, size=num_samples)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        rng = np.random.default_rng((self.seed, self.epoch, index))
        image = self.images[index]
        if rng.random() < 0.5:
            image = image[:, :, ::-1]
        image = image + rng.normal(scale=0.1, size=image.shape).astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(image)), int(self.labels[index])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    add_training_args(parser, batch_size=2, max_iters=4, lr=0.05, wt_dec=5e-4, crop_size=8,
                      session_name="toy", num_workers=0, momentum=0.9, save_every=1)
    parser.add_argument("--num_samples", type=positive_int, default=6)
    parser.add_argument("--stop_after", type=int, default=None, help="simulate a crash after N steps")
    parser.add_argument("--nan_at_step", type=int, default=None, help="make the loss NaN at this 1-based step")
    parser.add_argument("--dump_weights", action=argparse.BooleanOptionalAction, default=False,
                        help="every rank writes its final weights to <save_dir>/rank<r>.pt")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    dist = setup_distributed(use_cuda=False)
    try:
        setup_logging(os.path.join(args.save_dir, f"{args.session_name}.log"), dist.is_main)
        seed_everything(args.seed + dist.rank)
        model = ToyNet()
        dataset = ToyDataset(args.num_samples, args.seed)
        trainer, sampler = build_trainer(model, len(dataset), args, dist, ("ce", "l2"), max_step=args.max_iters)
        model = trainer.model
        model.train()
        for _ in trainer.epochs(sampler):
            for images, labels in trainer.progress(make_loader(dataset, sampler, args.num_workers)):
                # Batch-level draws from the global python and numpy RNGs (restored on resume).
                if random.random() < 0.5:
                    images = images.flip(-2)
                images = images * float(np.random.uniform(0.8, 1.2))
                with trainer.autocast():
                    logits = model(images.to(dist.device))
                    terms = {"ce": nn.functional.cross_entropy(logits, labels.to(dist.device)),
                             "l2": 1e-3 * logits.pow(2).mean()}
                if args.nan_at_step == trainer.global_step + 1:
                    terms["ce"] = terms["ce"] * float("nan")
                trainer.step(terms["ce"] + terms["l2"], terms)
                if args.stop_after is not None and trainer.global_step >= args.stop_after:
                    return
        trainer.finish()
        if args.dump_weights:
            torch.save(unwrap_model(model).state_dict(), os.path.join(args.save_dir, f"rank{dist.rank}.pt"))
    finally:
        cleanup()


if __name__ == "__main__":
    run_cli(main)
