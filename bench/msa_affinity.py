"""MSA's affinity propagation on a trained checkpoint, measured without ground truth.

    python -m bench.msa_affinity --dataset synthetic --voc12_root DATA --weights checkpoints/msa.pth \
        --spixel_weights checkpoints/spixel.pth --num_images 20

For the first ``--num_images`` ids of the list: the share of layer-3 cosine affinities at or
above the AP threshold (what each of the 8 propagation steps averages a CAM over), their median
and 90th percentile, and the CAMs' spread with and without AP: per image and label class, the
share of pixels whose max-normalised CAM reaches 0.5 (over the CAMs that fire somewhere; 1.0 = AP
has averaged the class map into a constant over the image), and the share of CAMs that are zero
everywhere (the class never fires). Only
images and their image-level labels are read, never the ground-truth masks: this is what the
small profile's inference AP setting is chosen from (workflow/pipeline.py).
"""
from __future__ import annotations

import argparse
import json
from typing import Sequence

import numpy as np
import torch

from network.msa import AP_STEPS, AP_THRESHOLD, MSANet, affinity_statistics, msa_cam_dict
from network.spixel import SpixelNet
from network.weights import load_for_inference
from tool.cli import add_dataset_args, positive_int, run_cli
from tool.fileio import read_id_list, read_rgb_image
from workflow.datasets import DATASET_NAMES, get_dataset_info


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(parser, DATASET_NAMES)
    parser.add_argument("--weights", required=True, help="an MSA checkpoint (train_msa.py)")
    parser.add_argument("--spixel_weights", required=True, help="its superpixel FCN (train_scn.py)")
    parser.add_argument("--list", default=None, help="image ids (default: <root>/train.txt)")
    parser.add_argument("--num_images", type=positive_int, default=20)
    parser.add_argument("--ap_threshold", type=float, default=AP_THRESHOLD)
    parser.add_argument("--ap_steps", type=positive_int, default=AP_STEPS)
    parser.add_argument("--widened", action="store_true")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    info = get_dataset_info(args.dataset, args.voc12_root)
    device = torch.device("cpu")
    model = load_for_inference(lambda width: MSANet(info.num_classes, width, widened=args.widened), args.weights,
                               None, device)
    spixel = load_for_inference(SpixelNet, args.spixel_weights, None, device)
    labels = info.load_cls_labels()
    stats, spread, zero = [], {0: [], args.ap_steps: []}, {0: [], args.ap_steps: []}
    for image_id in read_id_list(args.list or info.list_path("train"))[:args.num_images]:
        image = read_rgb_image(info.image_path(image_id))
        stats.append(affinity_statistics(model, spixel, image, args.ap_threshold, device))
        for steps in spread:
            cams = msa_cam_dict(model, spixel, image, labels[image_id], (1.0,), device, steps, args.ap_threshold)
            spread[steps] += [float((cam >= 0.5).mean()) for cam in cams.values() if cam.max() > 0]
            zero[steps] += [float(cam.max() == 0) for cam in cams.values()]
    result = {"images": len(stats), "ap_threshold": args.ap_threshold,
              **{f"affinity_{key}": float(np.mean([s[key] for s in stats])) for key in stats[0]},
              **{f"cam_share_at_half_max_ap{steps}": float(np.mean(values)) for steps, values in spread.items()},
              **{f"cam_zero_ap{steps}": float(np.mean(values)) for steps, values in zero.items()}}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    run_cli(main)
