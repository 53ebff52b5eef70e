"""Evaluate label maps (PNG) or CAM dicts (npy) against ground truth.

Prints per-class IoU, FP and FN ratios and the mIoU (SEAM's ``evaluation.py`` numbers,
counted exactly as it does). ``--type npy --curve`` evaluates the background thresholds
0.00..0.59 in one pass over the data (each file is read once), reports the best threshold and
writes a plot, JSON and CSV. The logic is importable: :func:`evaluate`, :func:`evaluate_curve`.

Example::

    python evaluation.py --list lists/train.txt --predict_dir out_cam --type npy --curve \\
        --voc12_root data/VOC2012 --comment "seed curve" --logfile evallog.txt
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
from tqdm import tqdm

from tool.cli import run_cli
from tool.fileio import (DataError, atomic_write_bytes, atomic_write_text, load_score_dict,
                         read_id_list, read_label_png, require_files)
from tool.metrics import ABSENT_HELP, ABSENT_MODES, ConfusionMatrix, CurveConfusion, check_absent

DEFAULT_THRESHOLD = 0.26   # SEAM's background score for CAM dicts
CURVE_THRESHOLDS = tuple(index / 100.0 for index in range(60))   # SEAM's --curve: 0.00..0.59
INPUT_TYPES = ("png", "npy")
CURVE_FILES = ("curve.png", "curve.json", "curve.csv")


# --------------------------------------------------------------------------- counting
class _CountJob(NamedTuple):
    """One worker's share: everything it needs, picklable."""

    predict_dir: str
    gt_dir: str
    image_ids: tuple[str, ...]
    num_classes: int
    input_type: str
    thresholds: tuple[float, ...] | None   # None: png mode


def _prediction_path(predict_dir: str, image_id: str, input_type: str) -> str:
    return os.path.join(predict_dir, f"{image_id}.{input_type}")


def _gt_path(gt_dir: str, image_id: str) -> str:
    return os.path.join(gt_dir, f"{image_id}.png")


def _size_error(prediction_path: str, prediction_hw: tuple[int, ...], gt_path: str,
                gt_hw: tuple[int, ...]) -> DataError:
    return DataError(f"{prediction_path}: prediction size {'x'.join(map(str, prediction_hw))} differs from "
                     f"ground truth {gt_path} size {'x'.join(map(str, gt_hw))}")


def _count_images(job: _CountJob) -> np.ndarray:
    """Confusion counts of a list of images: (n+1, n+1) for png, (thresholds, n+1, n+1) for npy."""
    if job.input_type == "png":
        matrix = ConfusionMatrix(job.num_classes)
        for image_id in job.image_ids:
            gt_path = _gt_path(job.gt_dir, image_id)
            prediction_path = _prediction_path(job.predict_dir, image_id, "png")
            gt = read_label_png(gt_path)
            prediction = read_label_png(prediction_path)
            if prediction.shape != gt.shape:
                raise _size_error(prediction_path, prediction.shape, gt_path, gt.shape)
            matrix.update(prediction, gt)
        return matrix.counts
    curve = CurveConfusion(job.num_classes, job.thresholds)
    for image_id in job.image_ids:
        gt_path = _gt_path(job.gt_dir, image_id)
        prediction_path = _prediction_path(job.predict_dir, image_id, "npy")
        gt = read_label_png(gt_path)
        cams = load_score_dict(prediction_path, num_keys=job.num_classes - 1)
        # load_score_dict already checked that all values share one size: compare the first.
        first = next(iter(cams.values()), None)
        if first is not None and first.shape != gt.shape:
            raise _size_error(prediction_path, first.shape, gt_path, gt.shape)
        curve.update(cams, gt)
    return curve.counts


def _check_inputs(predict_dir: str, gt_dir: str, image_ids: Sequence[str], input_type: str) -> None:
    if input_type not in INPUT_TYPES:
        raise ValueError(f"input_type must be one of {INPUT_TYPES}, got {input_type!r}")
    if len(image_ids) == 0:
        raise DataError("the image list is empty: nothing to evaluate")
    require_files([_prediction_path(predict_dir, image_id, input_type) for image_id in image_ids],
                  f"prediction files (.{input_type})")
    require_files([_gt_path(gt_dir, image_id) for image_id in image_ids], "ground-truth PNGs")


def _count_all(template: _CountJob, image_ids: Sequence[str], num_workers: int, progress: bool,
               description: str) -> np.ndarray:
    """Sum the counts over all images; with ``num_workers > 1`` each process returns its own counts."""
    num_workers = max(1, int(num_workers))
    # Chunks small enough for a smooth progress bar and load balance, large enough to amortise pickling.
    chunk_size = max(1, min(16, math.ceil(len(image_ids) / (num_workers * 4))))
    jobs = [template._replace(image_ids=tuple(image_ids[start:start + chunk_size]))
            for start in range(0, len(image_ids), chunk_size)]
    total = None
    with tqdm(total=len(image_ids), desc=description, disable=not progress, unit="img") as bar:
        with contextlib.ExitStack() as stack:
            if num_workers == 1:
                results = map(_count_images, jobs)
            else:
                pool = stack.enter_context(ProcessPoolExecutor(max_workers=min(num_workers, len(jobs))))
                results = pool.map(_count_images, jobs)
            for job, counts in zip(jobs, results):
                total = counts if total is None else total + counts
                bar.update(len(job.image_ids))
    return total


def evaluate(predict_dir: str, gt_dir: str, image_ids: Sequence[str], class_names: Sequence[str],
             input_type: str = "png", threshold: float | None = None, num_workers: int = 1,
             absent: str = "zero", progress: bool = True) -> dict[str, Any]:
    """mIoU, per-class IoU and FP/FN ratios of ``<predict_dir>/<id>.png|npy`` against ``<gt_dir>/<id>.png``.

    ``class_names`` includes background (its length is the number of classes). For ``npy``
    (CAM dicts with 0-based foreground keys) the prediction is argmax([threshold, CAMs]),
    background winning ties; ``threshold`` defaults to 0.26. ``absent``: see
    :data:`tool.metrics.ABSENT_HELP`. Returns :meth:`ConfusionMatrix.results` plus
    ``num_images``, ``input_type`` and ``threshold`` (None for png).
    Raises DataError for missing/unreadable files, size mismatches and bad CAM keys.
    """
    check_absent(absent)
    image_ids = list(image_ids)
    _check_inputs(predict_dir, gt_dir, image_ids, input_type)
    num_classes = len(class_names)
    if input_type == "npy":
        threshold = DEFAULT_THRESHOLD if threshold is None else float(threshold)
        template = _CountJob(predict_dir, gt_dir, (), num_classes, "npy", (threshold,))
        counts = _count_all(template, image_ids, num_workers, progress, "evaluate")[0]
    else:
        threshold = None
        template = _CountJob(predict_dir, gt_dir, (), num_classes, "png", None)
        counts = _count_all(template, image_ids, num_workers, progress, "evaluate")
    results = ConfusionMatrix(num_classes, counts).results(class_names, absent)
    results.update(num_images=len(image_ids), input_type=input_type, threshold=threshold)
    return results


def evaluate_curve(predict_dir: str, gt_dir: str, image_ids: Sequence[str], class_names: Sequence[str],
                   thresholds: Sequence[float] = CURVE_THRESHOLDS, num_workers: int = 1,
                   absent: str = "zero", progress: bool = True) -> dict[str, Any]:
    """mIoU of CAM dicts for every background threshold, reading each file once.

    Returns :meth:`CurveConfusion.results` (``thresholds``, ``miou``, ``miou_percent``,
    ``best_index``, ``best_threshold``, ``best_miou``, ``per_threshold`` results) plus ``num_images``.
    """
    check_absent(absent)
    image_ids = list(image_ids)
    _check_inputs(predict_dir, gt_dir, image_ids, "npy")
    curve = CurveConfusion(len(class_names), thresholds)
    template = _CountJob(predict_dir, gt_dir, (), len(class_names), "npy", tuple(float(t) for t in thresholds))
    curve.counts += _count_all(template, image_ids, num_workers, progress, "curve")
    results = curve.results(class_names, absent)
    results["num_images"] = len(image_ids)
    return results


# --------------------------------------------------------------------------- reporting
def _percent(value: float) -> str:
    return "      -" if value is None or math.isnan(value) else f"{value * 100:7.3f}"


def format_table(results: Mapping[str, Any]) -> str:
    """Per-class IoU, FP and FN ratios (percent) and the mIoU as a text table."""
    width = max(11, max(len(name) for name in results["class_names"]))
    lines = [f"{'class':>{width}}  {'IoU %':>7}  {'FP %':>7}  {'FN %':>7}"]
    for name, iou, fp, fn in zip(results["class_names"], results["iou"], results["fp_ratio"], results["fn_ratio"]):
        lines.append(f"{name:>{width}}  {_percent(iou)}  {_percent(fp)}  {_percent(fn)}")
    lines.append("=" * (width + 29))
    lines.append(f"{'mIoU':>{width}}  {_percent(results['miou'])}   (absent classes: {results['absent']})")
    return "\n".join(lines)


def format_curve(curve: Mapping[str, Any]) -> str:
    lines = [f"{index}/{len(curve['thresholds'])} background score: {threshold:.3f}\tmIoU: {_percent(miou)}%"
             for index, (threshold, miou) in enumerate(zip(curve["thresholds"], curve["miou"]))]
    lines.append(f"best background threshold {curve['best_threshold']:.2f}: mIoU {_percent(curve['best_miou'])}%")
    return "\n".join(lines)


def _json_ready(value: Any) -> Any:
    """NaN (absent classes with absent='ignore') becomes null: strict JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    return value


def write_curve_outputs(curve: Mapping[str, Any], out_dir: str, comment: str = "") -> dict[str, str]:
    """Write ``curve.png`` (mIoU vs threshold), ``curve.json`` and ``curve.csv`` (per threshold, per class)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {name.split(".")[1]: os.path.join(out_dir, name) for name in CURVE_FILES}
    write_json(paths["json"], curve, comment)

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["threshold", "class_index", "class_name", "iou", "fp_ratio", "fn_ratio",
                     "true_positives", "predicted", "target"])
    for threshold, entry in zip(curve["thresholds"], curve["per_threshold"]):
        for index, name in enumerate(entry["class_names"]):
            writer.writerow([f"{threshold:.2f}", index, name, repr(entry["iou"][index]),
                             repr(entry["fp_ratio"][index]), repr(entry["fn_ratio"][index]),
                             entry["true_positives"][index], entry["predicted"][index], entry["target"][index]])
        writer.writerow([f"{threshold:.2f}", "", "mIoU", repr(entry["miou"]), "", "", "", "", ""])
    atomic_write_text(paths["csv"], text.getvalue())

    # Figure + Agg canvas directly: no pyplot global state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    axes.plot(curve["thresholds"], [100 * value for value in curve["miou"]], marker=".")
    axes.axvline(curve["best_threshold"], color="grey", linestyle="--",
                 label=f"best {curve['best_threshold']:.2f}: {100 * curve['best_miou']:.2f}%")
    axes.set_xlabel("background threshold")
    axes.set_ylabel("mIoU (%)")
    axes.set_title(comment or "mIoU vs background threshold")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="best")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(paths["png"], buffer.getvalue())
    return paths


def append_log(logfile: str, comment: str, metrics: Mapping[str, Any]) -> None:
    """Append SEAM's log entry: time + comment, ``key:value`` pairs, a separator line."""
    previous = ""
    if os.path.isfile(logfile):
        with open(logfile, encoding="utf-8") as handle:
            previous = handle.read()
    entry = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime()) + f"\t{comment}\n"
             + "".join(f"{key}:{value}  " for key, value in metrics.items()) + "\n"
             + "=====================================\n")
    atomic_write_text(logfile, previous + entry)


# --------------------------------------------------------------------------- command line
def _parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    from workflow.datasets import DATASET_NAMES

    parser = argparse.ArgumentParser(
        description="mIoU, per-class IoU and FP/FN ratios of predictions (PNG label maps or CAM dicts) "
                    "against ground-truth PNGs; with --curve, mIoU for background thresholds 0.00..0.59.",
        epilog=ABSENT_HELP + " Void gt pixels (255) are ignored; a prediction outside the class range "
               "counts as a false negative of the gt class (as SEAM).")
    parser.add_argument("--list", required=True, help="image id list, one id per line")
    parser.add_argument("--predict_dir", required=True, help="folder of <id>.png label maps or <id>.npy CAM dicts")
    parser.add_argument("--gt_dir", default=None,
                        help="folder of ground-truth <id>.png (default: the dataset's label folder under "
                             "--voc12_root, e.g. <root>/SegmentationClass)")
    parser.add_argument("--voc12_root", default=None,
                        help="dataset root: class names (needed for --dataset synthetic) and the default gt dir")
    parser.add_argument("--dataset", default="voc12", choices=DATASET_NAMES, help="class names and count")
    parser.add_argument("--type", default="png", choices=INPUT_TYPES, help="prediction format")
    parser.add_argument("--t", type=float, default=None,
                        help=f"background threshold for --type npy (default {DEFAULT_THRESHOLD})")
    parser.add_argument("--curve", nargs="?", const=True, default=False, type=_parse_bool,
                        help="--type npy only: mIoU for every threshold 0.00..0.59 in one pass "
                             "(SEAM's spelling '--curve True' is accepted)")
    parser.add_argument("--out_dir", default=None,
                        help="folder for curve.png/.json/.csv (default: <predict_dir>_curve)")
    parser.add_argument("--absent", default="zero", choices=ABSENT_MODES, help=ABSENT_HELP)
    parser.add_argument("--num_workers", type=int, default=1, help="processes reading the images")
    parser.add_argument("--comment", default="", help="text written to the log file with the results")
    parser.add_argument("--logfile", default=None, help="append the results to this file (SEAM's format)")
    parser.add_argument("--out_json", default=None,
                        help="also write every number of the result (or of the curve) to this JSON file")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate as the flags say, print the results, write the curve outputs and the log entry."""
    from workflow.datasets import get_dataset_info

    if args.curve and args.type != "npy":
        raise DataError("--curve evaluates background thresholds of CAM dicts: it needs --type npy")
    if args.gt_dir is None and args.voc12_root is None:
        raise DataError("give --gt_dir or --voc12_root (whose label folder is the default gt dir)")
    # VOC/COCO class names are fixed; only the synthetic dataset reads them from its root.
    info = get_dataset_info(args.dataset, args.voc12_root or os.curdir)
    class_names = list(info.class_names)
    # The dataset's own label folder (VOC: SegmentationClassAug when present, else SegmentationClass).
    gt_dir = args.gt_dir if args.gt_dir is not None else info.label_folder
    image_ids = read_id_list(args.list)

    if args.curve:
        curve = evaluate_curve(args.predict_dir, gt_dir, image_ids, class_names,
                               num_workers=args.num_workers, absent=args.absent)
        best = curve["per_threshold"][curve["best_index"]]
        print(format_curve(curve))
        print(f"\nper class at the best threshold {curve['best_threshold']:.2f}:")
        print(format_table(best))
        out_dir = args.out_dir or args.predict_dir.rstrip("/\\") + "_curve"
        paths = write_curve_outputs(curve, out_dir, args.comment)
        print("curve written to " + ", ".join(paths.values()))
        if args.logfile:
            append_log(args.logfile, args.comment, {"mIoU": curve["miou_percent"]})
        write_json(args.out_json, curve, args.comment)
        return curve

    results = evaluate(args.predict_dir, gt_dir, image_ids, class_names, input_type=args.type,
                       threshold=args.t, num_workers=args.num_workers, absent=args.absent)
    print(format_table(results))
    if args.logfile:
        metrics = dict(zip(results["class_names"], results["iou_percent"]))
        metrics["mIoU"] = results["miou_percent"]
        append_log(args.logfile, args.comment, metrics)
    write_json(args.out_json, results, args.comment)
    return results


def write_json(path: str | None, results: Mapping[str, Any], comment: str) -> None:
    if path:
        atomic_write_text(path, json.dumps(_json_ready(dict(results, comment=comment)), indent=1) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    run_cli(main)
