"""Benchmark: the one-pass threshold curve of evaluation.py against SEAM's per-threshold loop.

Generates synthetic 500x375 ground-truth PNGs (1-3 classes, void borders) and CAM dicts once
(cached in a temporary folder), then times

* ours: ``evaluation.evaluate_curve`` (each file read once, all 60 thresholds from one
  bincount per image), with ``--num_workers 1`` and ``2``;
* the baseline, written here as SEAM's ``evaluation.py --curve`` does it: for each of the 60
  thresholds, re-read every file, argmax over the stacked (21, H, W) tensor, count the classes
  one by one, in a single process;

checks that the mIoU (and every TP/P/T count) is identical at every threshold, and prints both
times and the ratio. Example (the baseline takes minutes at full size)::

    .venv/bin/python -m bench.bench_eval --num_images 200
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from PIL import Image

import evaluation
from tool.fileio import atomic_write_text, save_npy, save_palette_png
from tool.metrics import default_class_names

HEIGHT, WIDTH = 375, 500
NUM_CLASSES = 21


# --------------------------------------------------------------------------- synthetic data
def _ellipse_distance(rng: np.random.Generator, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Normalised squared distance to a random ellipse centre (<= 1 inside the ellipse)."""
    centre_y, centre_x = rng.uniform(0.15, 0.85) * HEIGHT, rng.uniform(0.15, 0.85) * WIDTH
    radius_y, radius_x = rng.uniform(0.1, 0.35) * HEIGHT, rng.uniform(0.1, 0.35) * WIDTH
    return ((rows - centre_y) / radius_y) ** 2 + ((cols - centre_x) / radius_x) ** 2


def _void_border(label: np.ndarray, width: int = 2) -> np.ndarray:
    """Set pixels within ``width`` of a label change to 255, as VOC's object outlines."""
    border = np.zeros(label.shape, dtype=bool)
    for shift in range(1, width + 1):
        vertical = label[shift:, :] != label[:-shift, :]
        horizontal = label[:, shift:] != label[:, :-shift]
        border[shift:, :] |= vertical
        border[:-shift, :] |= vertical
        border[:, shift:] |= horizontal
        border[:, :-shift] |= horizontal
    result = label.copy()
    result[border] = 255
    return result


def make_sample(rng: np.random.Generator) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """One gt label map (1-3 classes + void borders) and a CAM dict roughly matching it."""
    rows, cols = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    classes = rng.choice(np.arange(1, NUM_CLASSES), size=int(rng.integers(1, 4)), replace=False)
    label = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    cams: dict[int, np.ndarray] = {}
    # Sometimes a class that is not in the gt gets a CAM too (a false positive).
    cam_classes = list(classes) + ([int(rng.integers(1, NUM_CLASSES))] if rng.random() < 0.3 else [])
    for class_index in cam_classes:
        distance = _ellipse_distance(rng, rows, cols)
        if class_index in classes:
            label[distance <= 1.0] = class_index
        # A blurred, shifted blob with low-frequency noise: the CAM of the object.
        noise = rng.random((HEIGHT // 25 + 1, WIDTH // 25 + 1)).astype(np.float32)
        noise = np.kron(noise, np.ones((25, 25), np.float32))[:HEIGHT, :WIDTH]
        score = np.exp(-0.5 * distance * rng.uniform(0.5, 2.0)) * (0.7 + 0.3 * noise)
        score = (score - score.min()) / (score.max() - score.min() + 1e-5)
        key = int(class_index) - 1
        cams[key] = np.maximum(cams.get(key, 0), score).astype(np.float32)
    return _void_border(label), cams


def prepare_data(cache_dir: str, num_images: int, seed: int) -> tuple[str, str, list[str]]:
    """Write (or reuse) the synthetic set; returns (cam_dir, gt_dir, ids)."""
    folder = os.path.join(cache_dir, f"n{num_images}_seed{seed}")
    cam_dir, gt_dir = os.path.join(folder, "cam"), os.path.join(folder, "gt")
    ids = [f"img_{index:05d}" for index in range(num_images)]
    marker = os.path.join(folder, "complete")
    if not os.path.isfile(marker):
        rng = np.random.default_rng(seed)
        for image_id in ids:
            label, cams = make_sample(rng)
            save_palette_png(os.path.join(gt_dir, image_id + ".png"), label)
            save_npy(os.path.join(cam_dir, image_id + ".npy"), cams)
        atomic_write_text(marker, "\n".join(ids) + "\n")
    return cam_dir, gt_dir, ids


# --------------------------------------------------------------------------- the baseline
def seam_curve(cam_dir: str, gt_dir: str, ids: list[str], thresholds: list[float]) -> tuple[list[float], np.ndarray]:
    """SEAM's --curve: for every threshold, re-read and re-evaluate every image (single process)."""
    mious, all_counts = [], []
    for threshold in thresholds:
        tp, p, t = [0] * NUM_CLASSES, [0] * NUM_CLASSES, [0] * NUM_CLASSES
        for image_id in ids:
            predict_dict = np.load(os.path.join(cam_dir, image_id + ".npy"), allow_pickle=True).item()
            h, w = list(predict_dict.values())[0].shape
            tensor = np.zeros((NUM_CLASSES, h, w), np.float32)
            for key in predict_dict.keys():
                tensor[key + 1] = predict_dict[key]
            tensor[0, :, :] = threshold
            predict = np.argmax(tensor, axis=0).astype(np.uint8)
            gt = np.array(Image.open(os.path.join(gt_dir, image_id + ".png")))
            cal = gt < 255
            mask = (predict == gt) * cal
            for index in range(NUM_CLASSES):
                p[index] += int(np.sum((predict == index) * cal))
                t[index] += int(np.sum((gt == index) * cal))
                tp[index] += int(np.sum((gt == index) * mask))
        iou = [tp[i] / (t[i] + p[i] - tp[i] + 1e-10) for i in range(NUM_CLASSES)]
        mious.append(float(np.mean(np.array(iou))))
        all_counts.append([tp, p, t])
    return mious, np.asarray(all_counts, dtype=np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache_dir", default=os.path.join(tempfile.gettempdir(), "avc_bench_eval"),
                        help="where the synthetic set is generated once and reused")
    args = parser.parse_args()

    start = time.perf_counter()
    cam_dir, gt_dir, ids = prepare_data(args.cache_dir, args.num_images, args.seed)
    print(f"data: {len(ids)} images {WIDTH}x{HEIGHT} in {os.path.dirname(cam_dir)} "
          f"({time.perf_counter() - start:.1f} s to generate or find)")
    thresholds = list(evaluation.CURVE_THRESHOLDS)
    names = default_class_names(NUM_CLASSES)

    # Wall time is the figure; the CPU time of this process is printed too, as the machine may be shared.
    timings = {}
    curves = {}
    for workers in (1, 2):
        start, start_cpu = time.perf_counter(), time.process_time()
        curves[workers] = evaluation.evaluate_curve(cam_dir, gt_dir, ids, names, thresholds,
                                                    num_workers=workers, progress=False)
        timings[workers] = time.perf_counter() - start
        cpu = f", main-process CPU {time.process_time() - start_cpu:.2f} s" if workers == 1 else ""
        print(f"ours, one pass, --num_workers {workers}: {timings[workers]:.2f} s wall{cpu}")

    start, start_cpu = time.perf_counter(), time.process_time()
    baseline_miou, baseline_counts = seam_curve(cam_dir, gt_dir, ids, thresholds)
    baseline_time = time.perf_counter() - start
    print(f"baseline (SEAM loop, 60 passes, 1 process): {baseline_time:.2f} s wall, "
          f"CPU {time.process_time() - start_cpu:.2f} s")

    for workers, curve in curves.items():
        ours_counts = np.asarray([[entry["true_positives"], entry["predicted"], entry["target"]]
                                  for entry in curve["per_threshold"]], dtype=np.int64)
        if curve["miou"] != baseline_miou or not np.array_equal(ours_counts, baseline_counts):
            raise SystemExit(f"MISMATCH between ours (--num_workers {workers}) and the baseline")
    print(f"identical mIoU and TP/P/T counts at all {len(thresholds)} thresholds; best threshold "
          f"{curves[1]['best_threshold']:.2f} (mIoU {100 * curves[1]['best_miou']:.3f}%)")
    for workers, seconds in timings.items():
        print(f"speed-up, --num_workers {workers}: {baseline_time / seconds:.1f}x")


if __name__ == "__main__":
    main()
