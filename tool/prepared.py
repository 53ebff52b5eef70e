"""Writing the prepared lists and ``cls_labels.npy`` of any dataset (shared by every prepare step).

``write_prepared_dataset`` takes the split ids a dataset package found (``voc12.prepare``,
``coco14.prepare``), reads the classes of every label PNG (``compute_cls_labels``, in worker
processes when there are many) and writes ``<split>.txt``, ``cls_labels.npy`` and
``no_foreground.txt`` where the ``DatasetInfo`` says.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
from typing import Iterable, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from tool.datasets import DatasetInfo
from tool.fileio import DataError, atomic_write_text, image_size, read_label_png, save_npy

LOGGER = logging.getLogger(__name__)
NO_FOREGROUND_FILE = "no_foreground.txt"
# Below this many labels, starting worker processes costs more than it saves.
_MIN_IDS_FOR_POOL = 512


def label_classes(path: str, num_classes: int, image_path: str | None = None) -> np.ndarray:
    """Float32 multi-hot (num_classes,) of the foreground classes present in a label PNG.

    A value that is neither a class (0..num_classes) nor 255, or a label whose size differs
    from its image (``image_path``, read from the header), raises DataError.
    """
    label = read_label_png(path, expected_hw=image_size(image_path) if image_path else None)
    counts = np.bincount(label.ravel(), minlength=256)
    unknown = np.flatnonzero(counts[num_classes + 1:255]) + num_classes + 1
    if unknown.size:
        raise DataError(f"{path}: label values {unknown[:10].tolist()} are outside 0..{num_classes} "
                        f"and 255")
    return (counts[1:num_classes + 1] > 0).astype(np.float32)


def _label_classes_star(args: tuple[str, int, str]) -> np.ndarray:
    return label_classes(*args)


def compute_cls_labels(info: DatasetInfo, image_ids: Sequence[str], workers: int = 1) -> dict[str, np.ndarray]:
    """Image-level labels of ``image_ids`` read from their ground-truth PNGs (process pool)."""
    tasks = [(info.gt_path(image_id), info.num_classes, info.image_path(image_id)) for image_id in image_ids]
    progress = dict(total=len(tasks), desc="class labels", unit="img", leave=False)
    if workers > 1 and len(tasks) >= _MIN_IDS_FOR_POOL:
        with multiprocessing.Pool(workers) as pool:
            results = list(tqdm(pool.imap(_label_classes_star, tasks, chunksize=64), **progress))
    else:
        results = [_label_classes_star(task) for task in tqdm(tasks, **progress)]
    return dict(zip(image_ids, results))


def write_prepared_dataset(info: DatasetInfo, split_ids: Mapping[str, list[str]], labelled_ids: Sequence[str],
                           training_splits: Iterable[str], workers: int = 1) -> dict[str, list[str]]:
    """Compute cls labels of ``labelled_ids``, write every list and ``cls_labels.npy`` atomically.

    Files go to ``info.list_path(split)`` and ``info.cls_labels_path``. Labelled ids without a
    foreground class are warned about, written to ``no_foreground.txt`` and removed from the
    ``training_splits``. Returns the lists as written.
    """
    cls_labels = compute_cls_labels(info, labelled_ids, workers)
    no_foreground = [image_id for image_id in labelled_ids if not cls_labels[image_id].any()]
    no_foreground_path = os.path.join(os.path.dirname(info.cls_labels_path), NO_FOREGROUND_FILE)
    training_splits = set(training_splits)
    if no_foreground:
        atomic_write_text(no_foreground_path, "".join(f"{image_id}\n" for image_id in no_foreground))
        LOGGER.warning("%d labelled images have no foreground class and cannot train a classifier; "
                       "they are left out of %s and listed in %s: %s%s", len(no_foreground),
                       "/".join(sorted(training_splits)), no_foreground_path, ", ".join(no_foreground[:10]),
                       " ..." if len(no_foreground) > 10 else "")
    elif os.path.isfile(no_foreground_path):
        os.remove(no_foreground_path)  # stale from an earlier run over other data
    excluded = set(no_foreground)
    written: dict[str, list[str]] = {}
    for split, ids in split_ids.items():
        ids = [image_id for image_id in ids if image_id not in excluded] if split in training_splits else list(ids)
        if not ids:
            raise DataError(f"{info.root}: split {split!r} has no usable image")
        atomic_write_text(info.list_path(split), "".join(f"{image_id}\n" for image_id in ids))
        written[split] = ids
        LOGGER.info("%s: %d ids", info.list_path(split), len(ids))
    save_npy(info.cls_labels_path, cls_labels)
    LOGGER.info("%s: %d image-level labels", info.cls_labels_path, len(cls_labels))
    return written


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))
