"""Stage 1: train the AVC classifier (SEAM + affinity vector consistency) from image-level labels.

    python train_avc.py --voc12_root VOC2012 --weights ilsvrc-cls_rna-a1_cls1000_ep-0001.params \
        --session_name avc_voc12
    torchrun --nproc_per_node 4 train_avc.py ...        # same flags, DistributedDataParallel

No ``--weights`` trains from scratch (BatchNorm then trains too). ``--avc_weight 0`` is SEAM.
Writes ``<save_dir>/<session>.pth`` (final), ``<session>_last.pth`` (every epoch, for
``--resume auto``), ``<session>_config.json`` and ``<session>_log.csv`` (every loss term).
This is ``train_seed.py`` with ``--method avc`` as the default (the other methods of
network/methods.py train through the same loop).
"""
from __future__ import annotations

import argparse
from typing import Sequence

import train_seed
from tool.cli import run_cli

run = train_seed.run


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return train_seed.parse_args(argv, default_method="avc", description=__doc__)


def main(argv: Sequence[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
