"""Boundary recall / precision and achievable segmentation accuracy of a trained superpixel FCN.

    python eval_spixel.py --weights checkpoints/spixel_fcn.pth --voc12_root VOC2012 --out results/spixel.json

Every image is stretched to multiples of 16 (as the MSA evaluator feeds the FCN), each pixel
takes its arg-max cell, and a ground-truth boundary pixel counts as found when a superpixel
boundary lies within ``--tolerance`` pixels (SpixelFCN's metric, tolerance 2; precision the
other way round; ASA: pixels whose superpixel's majority label is theirs). The regular
16 x 16 grid (the association's starting point, no learning) is scored alongside.
Ground truth is only read here, to score; nothing is selected with it.
"""
from __future__ import annotations

import argparse
import json
from typing import Sequence

import torch
from tqdm import tqdm

from network.spixel import SpixelNet, superpixel_scores, superpixels_of_image
from network.weights import load_for_inference
from tool import transforms as T
from tool.cli import add_dataset_args, add_inference_model_args, non_negative_int, run_cli
from tool.fileio import atomic_write_text, read_id_list, read_label_png, read_rgb_image
from workflow.datasets import DATASET_NAMES, get_dataset_info


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(parser, DATASET_NAMES)
    add_inference_model_args(parser, precision=False)
    parser.add_argument("--weights", required=True, help="trained superpixel FCN (train_scn.py)")
    parser.add_argument("--infer_list", default=None, help="image ids (default: <root>/train.txt)")
    parser.add_argument("--tolerance", type=non_negative_int, default=2, help="pixels (default 2)")
    parser.add_argument("--out", default=None, help="JSON file for the result")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    info = get_dataset_info(args.dataset, args.voc12_root)
    ids = read_id_list(args.infer_list or info.list_path("train"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spixel = load_for_inference(SpixelNet, args.weights, args.width_mult, device)
    counts: dict[str, dict[str, int]] = {"spixel_fcn": {}, "regular_grid": {}}
    for image_id in tqdm(ids, desc="superpixel scores", dynamic_ncols=True):
        image = read_rgb_image(info.image_path(image_id))
        gt = read_label_png(info.gt_path(image_id), image.shape[:2])
        tensor = torch.from_numpy(T.hwc_to_chw(T.normalize(image)))[None].to(device)
        for name, net in (("spixel_fcn", spixel), ("regular_grid", None)):
            for key, value in superpixel_scores(superpixels_of_image(net, tensor), gt, args.tolerance).items():
                counts[name][key] = counts[name].get(key, 0) + value
    result = {"images": len(ids), "tolerance": args.tolerance, "weights": args.weights}
    for name, c in counts.items():
        result[name] = {"boundary_recall": c["recall_found"] / max(c["recall_total"], 1),
                        "boundary_precision": c["precision_found"] / max(c["precision_total"], 1),
                        "asa": c["asa_correct"] / max(c["asa_total"], 1)}
    print(json.dumps(result, indent=1))
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    run_cli(main)
