"""Write the id lists and ``cls_labels.npy`` of a VOC-layout dataset (VOC 2012 + SBD, synthetic).

    python -m voc12.prepare --voc12_root ROOT [--out_dir DIR] [--dataset voc12|synthetic]

Lists (``<out_dir>/<split>.txt``, out_dir defaults to ROOT):

* ``train``, ``val``, ``test``: copied from ``ImageSets/Segmentation`` (test only when listed);
* ``train_aug``: every id with a label PNG in SegmentationClassAug (SegmentationClass when
  there is no Aug folder), minus val; 10582 ids on VOC 2012 + SBD.

``cls_labels.npy`` = ``{image_id: float32 multi-hot over foreground classes}`` for every
labelled id, from the classes present in its label PNG (0 and 255 excluded). A labelled image
without any foreground class cannot train a classifier: it is named in a warning, listed in
``no_foreground.txt`` and left out of the training lists (it stays in val and cls_labels).

The part shared with ``coco14.prepare`` is :func:`tool.prepared.write_prepared_dataset`.
"""
from __future__ import annotations

import argparse
import logging
import os

from tool.cli import run_cli
from tool.contract import image_ids_in
from tool.datasets import DatasetInfo
from tool.fileio import DataError, read_id_list, require_files
from tool.prepared import default_workers, write_prepared_dataset
from voc12 import layout


def prepare_voc(info: DatasetInfo, workers: int = 1) -> dict[str, list[str]]:
    """Lists and cls labels of a VOC-layout root (see the module docstring)."""
    root = info.root
    split_ids: dict[str, list[str]] = {}
    for split in ("train", "val", "test"):
        path = layout.split_list_path(root, split)
        if split == "test" and not os.path.isfile(path):
            continue
        split_ids[split] = read_id_list(path)
    label_folder = info.label_folder
    labelled_ids = sorted(image_ids_in(label_folder, ".png"))
    if not labelled_ids:
        raise DataError(f"{label_folder}: no label PNG found")
    val_ids = set(split_ids["val"])
    split_ids["train_aug"] = [image_id for image_id in labelled_ids if image_id not in val_ids]
    for split in ("train", "val"):
        require_files((info.gt_path(image_id) for image_id in split_ids[split]), "label maps",
                      source=layout.split_list_path(root, split))
    for split, ids in split_ids.items():
        source = label_folder if split == "train_aug" else layout.split_list_path(root, split)
        require_files((info.image_path(image_id) for image_id in ids), "images", source=source)
    ordered = {split: split_ids[split] for split in ("train", "val", "train_aug", "test") if split in split_ids}
    return write_prepared_dataset(info, ordered, labelled_ids, training_splits=("train", "train_aug"),
                                  workers=workers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--voc12_root", required=True, help="VOC2012 folder (JPEGImages, SegmentationClass...)")
    parser.add_argument("--out_dir", default=None, help="where lists and cls_labels.npy go (default: the root)")
    parser.add_argument("--dataset", choices=layout.VOC_LAYOUT_NAMES, default="voc12")
    parser.add_argument("--workers", type=int, default=default_workers(), help="processes reading labels")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    prepare_voc(layout.dataset_info(args.dataset, args.voc12_root, list_dir=args.out_dir), workers=args.workers)
    return 0


if __name__ == "__main__":
    run_cli(main)
