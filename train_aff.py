"""Stage 3: train AffinityNet from the low/high-alpha CRF dicts of the seeds (PSA/SEAM ``train_aff.py``).

Labels (``voc12/affinity_dataset.py``): the la/ha CRF dicts are cropped and flipped with the
image, pooled by 8 and fused (la class where la is confident foreground, 0 where ha still says
background, 255 unsure); pairs within radius 5 on the stride-8 grid are background-positive,
foreground-positive or negative. Loss (``network.affinity.affinity_loss``): bg/4 + fg/4 + neg/2
with -log(aff) for positives and -log(1 - aff) for negatives.

    python train_aff.py --voc12_root VOC2012 --weights ilsvrc-cls_rna-a1_cls1000_ep-0001.params \\
        --la_crf_dir out/crf_4.0 --ha_crf_dir out/crf_24.0 --session_name resnet38_aff
    torchrun --nproc_per_node 4 train_aff.py ...        # same flags, DistributedDataParallel

``--weights``: the ImageNet ``.params`` file, or a trained classifier ``.pth`` (ours or SEAM's)
whose backbone initialises AffinityNet (then frozen the SEAM way); none trains from scratch.
Writes ``<save_dir>/<session>.pth`` (final), ``<session>_last.pth`` (for ``--resume auto``),
``<session>_config.json`` and ``<session>_log.csv`` (bg, fg, neg and the total per step).
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Sequence

from network import build_model
from network.affinity import AffinityNet, affinity_loss
from network.weights import start_from_weights
from tool.cli import add_dataset_args, add_model_args, add_training_args, run_cli
from tool.device import seed_everything, unwrap_model
from tool.distributed import cleanup, setup_distributed
from tool.fileio import read_id_list
from tool.logs import setup_logging
from tool.sampler import make_loader
from tool.trainer import build_trainer
from voc12.affinity_dataset import LABEL_STRIDE, AffinityDataset
from workflow.datasets import DATASET_NAMES, get_dataset_info

logger = logging.getLogger("train_aff")

LOSS_TERMS = ("bg", "fg", "neg")
# PSA/SEAM pair radius on the stride-8 grid (smaller maps follow SEAM's rule automatically).
AFFINITY_RADIUS = 5


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(parser, DATASET_NAMES)
    add_model_args(parser)
    add_training_args(parser, batch_size=8, max_epoches=8, lr=0.1, wt_dec=5e-4, crop_size=448,
                      session_name="resnet38_aff", num_workers=8)
    parser.add_argument("--train_list", default=None, metavar="FILE",
                        help="image ids to train on (default: <root>/train_aug.txt)")
    parser.add_argument("--la_crf_dir", required=True, metavar="DIR",
                        help="low-alpha CRF dicts <id>.npy (infer_seed.py: <out_crf>_4.0)")
    parser.add_argument("--ha_crf_dir", required=True, metavar="DIR",
                        help="high-alpha CRF dicts <id>.npy (infer_seed.py: <out_crf>_24.0)")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.crop_size % LABEL_STRIDE:
        parser.error(f"--crop_size must be a multiple of {LABEL_STRIDE} (the label grid), got {args.crop_size}")
    return args


def run(args: argparse.Namespace) -> AffinityNet:
    """Train as the flags say; returns the trained (unwrapped) model."""
    dist = setup_distributed()
    try:
        setup_logging(os.path.join(args.save_dir, f"{args.session_name}.log"), dist.is_main)
        seed_everything(args.seed + dist.rank)
        info = get_dataset_info(args.dataset, args.voc12_root)
        train_list = args.train_list or info.list_path("train_aug")
        train_ids = read_id_list(train_list)
        dataset = AffinityDataset(info, train_ids, args.la_crf_dir, args.ha_crf_dir, crop_size=args.crop_size,
                                  radius=AFFINITY_RADIUS, seed=args.seed, source=train_list)
        logger.info("%d training images from %s (%s), CRF dicts from %s and %s", len(dataset), train_list,
                    info.name, args.la_crf_dir, args.ha_crf_dir)

        model = build_model("affinity", width_mult=args.width_mult, radius=AFFINITY_RADIUS)
        start_from_weights(model, args.weights)
        trainer, sampler = build_trainer(model, len(dataset), args, dist, LOSS_TERMS)
        model = trainer.model
        logger.info("%d steps of batch %d (%d per epoch)", trainer.max_step, args.batch_size, sampler.batches_per_epoch)

        model.train()
        for _ in trainer.epochs(sampler):
            for _, images, pair_labels in trainer.progress(make_loader(dataset, sampler, args.num_workers)):
                images = trainer.images_to_device(images)
                bg_pos, fg_pos, neg = (labels.to(dist.device, non_blocking=True) for labels in pair_labels)
                with trainer.autocast():
                    affinities = model(images)
                terms = affinity_loss(affinities, bg_pos, fg_pos, neg)  # float32, outside autocast
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
