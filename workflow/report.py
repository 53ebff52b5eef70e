"""The results of a pipeline run: the AVC README table (markdown + JSON) and an HTML page.

Everything is read back from the files the stages wrote (evaluation JSONs, stage markers,
CAM dicts, masks), so the report can be rebuilt at any time without rerunning a stage.
"""
from __future__ import annotations

import html
import json
import os
import platform
import shutil
import time
from typing import Any, Mapping, Sequence

import numpy as np

from tool.cam import seed_from_cam_dict
from tool.datasets import DatasetInfo
from tool.fileio import (atomic_write_text, load_score_dict, read_json_if_present, read_label_png, read_rgb_image,
                         save_rgb_image)
from tool.metrics import ConfusionMatrix
from tool.vis import cam_overlay, label_overlay

# (row label, evaluation JSON name, split it was measured on)
TABLE_ROWS = (("Seed", "seed", "train"), ("+CRF", "crf", "train"),
              ("Mask (random walk)", "rw", "train"), ("Mask (IRN)", "irn", "train"), ("DeepLabV1", "deeplab", "val"),
              ("DeepLab on ground truth", "deeplab_gt", "val"))
# Rows of the refinements (and the ground-truth bound) a run may not have: left out when they have no result.
OPTIONAL_ROWS = ("rw", "irn", "deeplab_gt")
# The last row: DeepLab on the pseudo masks as a percentage of DeepLab on the ground truth
# (label, evaluation names of the two rows).
RATIO_ROW = ("DeepLab pseudo / ground truth", "deeplab", "deeplab_gt")
PAGE_COLUMNS = ("image", "ground truth", "CAM", "seed", "CRF", "random walk", "IRN", "DeepLab")


def machine_description() -> str:
    """The machine, and the precision the inference stages resolve ``--precision auto`` to on it."""
    import torch

    from tool.device import resolve_precision

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    precision = resolve_precision("auto", "cuda" if torch.cuda.is_available() else "cpu")
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, {device}, "
            f"Python {platform.python_version()}, torch {torch.__version__}, inference in {precision}")


def collect_results(eval_dir: str, seed_curve_json: str, stage_markers: Sequence[Mapping[str, Any]],
                    profile_name: str, eval_split_names: Mapping[str, str], method: str = "avc",
                    segmenter_row: str | None = None, notes: Sequence[str] = ()) -> dict[str, Any]:
    """One dict with the table rows, the best seed threshold, stage times, date and machine.

    ``segmenter_row`` labels the segmentation row (which network and its init); ``notes`` are
    printed under the title (msa_sal: where its pixel-supervised saliency maps came from)."""
    rows, by_name = [], {}
    curve = read_json_if_present(seed_curve_json)
    for label, name, split in TABLE_ROWS:
        if name == "seed" and curve is not None:
            miou, threshold = curve["miou_percent"][curve["best_index"]], curve["best_threshold"]
        else:
            results = read_json_if_present(os.path.join(eval_dir, f"{name}.json"))
            miou, threshold = (results["miou_percent"] if results else None), None
            if results is None and name in OPTIONAL_ROWS:
                continue
        if name == "deeplab" and segmenter_row:
            label = segmenter_row
        by_name[name] = {"row": label, "split": eval_split_names.get(split, split), "miou": miou,
                         "bg_threshold": threshold}
        rows.append(by_name[name])
        seed_png = read_json_if_present(os.path.join(eval_dir, "seed_png.json")) if name == "seed" else None
        if seed_png:  # SIPE/AE-SIPE: the seed PNGs, arg-max with the method's own background channel
            rows.append({"row": "Seed (own background)", "split": eval_split_names.get(split, split),
                         "miou": seed_png["miou_percent"], "bg_threshold": None})
    if by_name.get(RATIO_ROW[2]) is not None:
        rows.append(ratio_row(by_name))
    return {"profile": profile_name, "method": method, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_description(),
            "notes": list(notes), "rows": rows,
            "stages": [{"stage": m["stage"], "seconds": m["seconds"], "command": m["command"],
                        **({"beside": m["beside"]} if m.get("beside") else {})} for m in stage_markers],
            "total_seconds": round(sum(m["seconds"] for m in stage_markers), 1),
            "wall_seconds": round(wall_seconds(stage_markers), 1)}


def wall_seconds(stage_markers: Sequence[Mapping[str, Any]]) -> float:
    """The time the stages took end to end: the union of their [start, end] intervals, so stages
    run beside each other count once and the pauses between resumed runs not at all (markers
    written before the interval was recorded count their seconds)."""
    intervals = sorted((m["started_at"], m["ended_at"]) for m in stage_markers if "started_at" in m)
    total = sum(m["seconds"] for m in stage_markers if "started_at" not in m)
    end = float("-inf")
    for start, stop in intervals:
        total += max(0.0, stop - max(start, end))
        end = max(end, stop)
    return total


def ratio_row(by_name: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The row ``RATIO_ROW`` from the rows by evaluation name: ``ratio_percent`` = 100 x pseudo /
    ground truth (None if either is missing)."""
    label, pseudo_name, gt_name = RATIO_ROW
    pseudo, gt = by_name[pseudo_name]["miou"], by_name[gt_name]["miou"]
    ratio = None if pseudo is None or not gt else 100.0 * pseudo / gt
    return {"row": label, "split": by_name[gt_name]["split"], "miou": None, "ratio_percent": ratio,
            "bg_threshold": None}


def _format_value(row: Mapping[str, Any]) -> str:
    """The mIoU cell of a row; the ratio row shows its percentage of the ground-truth bound."""
    if "ratio_percent" in row:
        return "-" if row["ratio_percent"] is None else f"{row['ratio_percent']:.1f} % (ratio)"
    return "-" if row["miou"] is None else f"{row['miou']:.1f}"


def format_summary(summary: Mapping[str, Any]) -> str:
    lines = [f"# Results ({summary.get('method', 'avc')} seeds, {summary['profile']}, {summary['date']})", "", f"Machine: {summary['machine']}", "",
             *(line for note in summary.get("notes", ()) for line in (f"**{note}**", "")),  # a paragraph each
             "| | split | mIoU (%) | background threshold |", "|---|---|---|---|"]
    for row in summary["rows"]:
        miou = _format_value(row)
        threshold = "" if row["bg_threshold"] is None else f"{row['bg_threshold']:.2f}"
        lines.append(f"| {row['row']} | {row['split']} | {miou} | {threshold} |")
    lines += ["", "| stage | wall time (s) |", "|---|---|"]
    lines += [f"| {stage['stage']}" + (f" (beside {stage['beside']})" if stage.get("beside") else "")
              + f" | {stage['seconds']:.1f} |" for stage in summary["stages"]]
    lines += [f"| total | {summary['total_seconds']:.1f} |"]
    if summary.get("wall_seconds") is not None and summary["wall_seconds"] < summary["total_seconds"] - 0.5:
        lines += [f"| end to end (stages beside others counted once) | {summary['wall_seconds']:.1f} |"]
    return "\n".join(lines + [""])
    return "\n".join(lines)


def write_summary(summary: Mapping[str, Any], results_dir: str) -> str:
    text = format_summary(summary)
    atomic_write_text(os.path.join(results_dir, "summary.md"), text)
    atomic_write_text(os.path.join(results_dir, "summary.json"), json.dumps(summary, indent=2))
    return text


def _image_iou(prediction: np.ndarray, gt: np.ndarray, num_labels: int) -> float:
    """mIoU of one image over the classes present in its gt or prediction."""
    matrix = ConfusionMatrix(num_labels)
    matrix.update(prediction, gt)
    return float(matrix.results(None, absent="ignore")["miou_percent"])


def write_page(results_dir: str, info: DatasetInfo, sample_ids: Sequence[str], cam_dir: str,
               bg_threshold: float, mask_dirs: Mapping[str, str], summary: Mapping[str, Any],
               curve_png: str | None) -> str:
    """``index.html``: per sample image, the image and every stage's output with its IoU."""
    image_dir = os.path.join(results_dir, "images")
    rows_html = []
    for image_id in sample_ids:
        image = read_rgb_image(info.image_path(image_id))
        gt = read_label_png(info.gt_path(image_id), image.shape[:2])
        cam_dict = load_score_dict(os.path.join(cam_dir, f"{image_id}.npy"), info.num_classes)
        cam_max = np.max(np.stack(list(cam_dict.values())), axis=0) if cam_dict else np.zeros(gt.shape, np.float32)
        predictions = {"seed": seed_from_cam_dict(cam_dict, info.num_classes, bg_threshold, gt.shape)}
        for column, folder in mask_dirs.items():
            path = os.path.join(folder, f"{image_id}.png")
            if os.path.isfile(path):
                predictions[column] = read_label_png(path, gt.shape)
        pictures = {"image": image, "ground truth": label_overlay(image, gt), "CAM": cam_overlay(image, cam_max)}
        pictures.update({column: label_overlay(image, label) for column, label in predictions.items()})
        cells = []
        for column in PAGE_COLUMNS:
            if column not in pictures:
                cells.append("<td>-</td>")
                continue
            name = f"{image_id}_{column.replace(' ', '_')}.png"
            save_rgb_image(os.path.join(image_dir, name), pictures[column])
            caption = html.escape(column)
            if column in predictions:
                caption += f" {_image_iou(predictions[column], gt, info.num_labels):.1f}"
            cells.append(f'<td><img src="images/{html.escape(name)}" alt="{html.escape(column)}">'
                         f"<div>{caption}</div></td>")
        rows_html.append(f"<tr><th>{html.escape(image_id)}</th>{''.join(cells)}</tr>")
    if curve_png and os.path.isfile(curve_png):
        shutil.copyfile(curve_png, os.path.join(results_dir, "seed_curve.png"))
    table = "".join(f"<tr><td>{html.escape(row['row'])}</td><td>{html.escape(row['split'])}</td>"
                    f"<td>{html.escape(_format_value(row))}</td></tr>" for row in summary["rows"])
    header = "".join(f"<th>{html.escape(column)}</th>" for column in PAGE_COLUMNS)
    notes = "".join(f"<p><strong>{html.escape(note)}</strong></p>" for note in summary.get("notes", ()))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(summary.get('method', 'avc'))} pipeline results</title>
<style>body{{font-family:sans-serif;margin:1em}} img{{max-width:160px;display:block}}
td,th{{padding:4px;text-align:center;vertical-align:top;font-size:12px}} table{{border-collapse:collapse}}</style>
</head><body>
<h1>Pipeline results: {html.escape(summary.get('method', 'avc'))} seeds ({html.escape(summary['profile'])})</h1>
<p>{html.escape(summary['date'])} &middot; {html.escape(summary['machine'])}</p>
{notes}
<table border="1"><tr><th></th><th>split</th><th>mIoU (%)</th></tr>{table}</table>
<h2>Seed mIoU over background thresholds</h2>
<img src="seed_curve.png" alt="seed curve" style="max-width:480px">
<h2>Samples (per-image mIoU over the classes present)</h2>
<table border="1"><tr><th>id</th>{header}</tr>{''.join(rows_html)}</table>
<script>
window.addEventListener('load', function () {{
  var images = Array.from(document.images);
  var broken = images.filter(function (img) {{ return !(img.complete && img.naturalWidth > 0); }});
  document.body.setAttribute('data-images', images.length);
  document.body.setAttribute('data-broken', broken.length);
}});
</script>
</body></html>
"""
    path = os.path.join(results_dir, "index.html")
    atomic_write_text(path, page)
    return path
