"""Write the id lists and ``cls_labels.npy`` of MS COCO 2014.

    python -m coco14.prepare --coco_root ROOT [--out_dir DIR]

``train.txt`` / ``val.txt`` hold the ids that have both an image (train2014/ or val2014/)
and a label PNG (SegmentationClass/); the split comes from the id. ``cls_labels.npy`` is
derived from the label PNGs exactly as for VOC (shared code: ``voc12.prepare``).
"""
from __future__ import annotations

import argparse
import logging
import os

from coco14.layout import dataset_info, split_of_id
from tool.cli import run_cli
from tool.contract import image_ids_in
from tool.datasets import DatasetInfo
from tool.fileio import DataError
from tool.prepared import default_workers, write_prepared_dataset

LOGGER = logging.getLogger(__name__)
_LIST_OF_SPLIT = {"train2014": "train", "val2014": "val"}


def prepare_coco(info: DatasetInfo, workers: int = 1) -> dict[str, list[str]]:
    """Lists and cls labels of a COCO 2014 root (see the module docstring)."""
    label_folder = info.label_folder
    labelled_ids = sorted(image_ids_in(label_folder, ".png"))
    if not labelled_ids:
        raise DataError(f"{label_folder}: no label PNG found")
    split_ids: dict[str, list[str]] = {"train": [], "val": []}
    usable, missing = [], []
    for image_id in labelled_ids:
        try:
            split = split_of_id(image_id)
        except DataError as error:
            raise DataError(f"{os.path.join(label_folder, image_id + '.png')}: {error}") from None
        if os.path.isfile(info.image_path(image_id)):
            usable.append(image_id)
            split_ids[_LIST_OF_SPLIT[split]].append(image_id)
        else:
            missing.append(image_id)
    if missing:
        LOGGER.warning("%d label PNGs in %s have no image and are left out: %s%s", len(missing),
                       label_folder, ", ".join(missing[:10]), " ..." if len(missing) > 10 else "")
    return write_prepared_dataset(info, split_ids, usable, training_splits=("train",), workers=workers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coco_root", required=True, help="folder with train2014/, val2014/, SegmentationClass/")
    parser.add_argument("--out_dir", default=None, help="where lists and cls_labels.npy go (default: the root)")
    parser.add_argument("--workers", type=int, default=default_workers(), help="processes reading labels")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    prepare_coco(dataset_info(args.coco_root, list_dir=args.out_dir), workers=args.workers)
    return 0


if __name__ == "__main__":
    run_cli(main)
