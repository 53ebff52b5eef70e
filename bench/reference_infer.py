"""The reference scripts' way of running inference on a CPU, as the baseline of bench/bench_parallel_infer.py.

Same flags, datasets, weights and per-image outputs as our scripts (their parsers and finish
functions are reused), scheduled as the reference code does it:

- ``seed``: SEAM ``infer_SEAM.py`` - a DataLoader with ``--num_workers`` workers, one forward per
  view (each scale and each flip alone) spread over a thread pool of ``--num_workers`` threads
  (``pyutils.BatchThreader``), then the fusion and the CRF dicts inline in the main loop.
- ``deeplab``: the seamv1 DeepLab test - the same thread pool over single-view forwards, the
  test CRF inline.
- ``rw``: PSA/SEAM ``infer_aff.py`` - a DataLoader, one image at a time, the walk and the CRF
  inline (our sparse walk in both, so the comparison measures the scheduling only).

torch keeps its default thread count and float32, and the model is built with its random
initialisation before the weights are loaded, as in the reference scripts::

    python -m bench.reference_infer seed <infer_seed.py flags>
    python -m bench.reference_infer deeplab <test_deeplab.py flags>
    python -m bench.reference_infer rw <infer_aff.py flags>
"""
from __future__ import annotations

import os
import sys
from multiprocessing.pool import ThreadPool
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import infer_aff
import infer_seed
import test_deeplab
from bench.unbatched_views import forward_views_unbatched
from network.affinity import AffinityNet
from network.avc import AVCNet
from network.deeplab import DeepLabV1
from network.methods import METHODS, fuse_seam_views
from network.segmenters import SEGMENTERS
from network.weights import load_for_inference
from tool.cli import run_cli
from tool.fileio import read_id_list
from voc12.data import MultiScaleDataset, collate_single
from workflow.datasets import get_dataset_info

CPU = torch.device("cpu")


def threaded_views(pool: ThreadPool, model_fn: Callable[[torch.Tensor], torch.Tensor], views: Sequence[torch.Tensor],
                   image_hw: tuple[int, int], align_corners: bool) -> torch.Tensor:
    """(V, C, H, W) maps, one forward per single view, the views spread over ``pool`` (SEAM's _work)."""
    singles = [view[flip:flip + 1] for view in views for flip in range(view.shape[0])]
    flipped = [flip == 1 for view in views for flip in range(view.shape[0])]

    def work(index: int) -> torch.Tensor:
        maps = forward_views_unbatched(model_fn, [singles[index]], image_hw, align_corners=align_corners)
        return maps.flip(-1) if flipped[index] else maps
    return torch.cat(pool.map(work, range(len(singles))))


def _loader(dataset, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=1, collate_fn=collate_single, num_workers=num_workers)


def seed(argv: Sequence[str]) -> None:
    args = infer_seed.parse_args(argv)
    info = get_dataset_info(args.dataset, args.voc12_root)
    ids = read_id_list(args.infer_list)
    dataset = MultiScaleDataset(info, ids, info.load_cls_labels(), scales=args.scales or METHODS["avc"].scales,
                                source=args.infer_list)
    model = load_for_inference(lambda width: AVCNet(num_classes=info.num_classes, width_mult=width),
                               args.weights, args.width_mult, CPU, skip_init=False)
    with ThreadPool(max(1, args.num_workers)) as pool:
        for item in tqdm(_loader(dataset, args.num_workers), total=len(dataset), desc="reference seeds"):
            cams = threaded_views(pool, lambda batch: model.forward_cam(batch)[:, 1:], item["views"],
                                  item["image"].shape[:2], align_corners=False)
            fused = fuse_seam_views(cams.numpy(), item["label"].numpy(), args.seam_cam_norm)
            infer_seed.write_seed_outputs(args, info.num_classes, item, fused)


def deeplab(argv: Sequence[str]) -> None:
    args = test_deeplab.parse_args(argv)
    info = get_dataset_info(args.dataset, args.voc12_root)
    ids = read_id_list(args.infer_list)
    recipe = SEGMENTERS["deeplabv1_resnet38"].test  # the seamv1 test this baseline reproduces
    dataset = test_deeplab.DeepLabTestDataset(info, ids, args.scales or recipe.scales,
                                              recipe.flip if args.flip is None else args.flip, source=args.infer_list)
    model = load_for_inference(lambda width: DeepLabV1(num_classes=info.num_classes, width_mult=width),
                               args.weights, args.width_mult, CPU, skip_init=False)
    with ThreadPool(max(1, args.num_workers)) as pool:
        for item in tqdm(_loader(dataset, args.num_workers), total=len(dataset), desc="reference deeplab"):
            logits = threaded_views(pool, model, item["views"], item["image"].shape[:2], align_corners=True)
            probs = test_deeplab.fuse_view_logits(logits).numpy()
            test_deeplab.write_prediction(args, item, probs)


def rw(argv: Sequence[str]) -> None:
    args = infer_aff.parse_args(argv)
    args.precision = "fp32"  # the reference's
    info = get_dataset_info(args.dataset, args.voc12_root)
    ids = read_id_list(args.infer_list)
    dataset = infer_aff.RandomWalkDataset(info, ids, args.cam_dir, source=args.infer_list,
                                         one_based=args.walk_from == "crf")
    model = load_for_inference(lambda width: AffinityNet(width_mult=width, radius=args.radius),
                               args.weights, args.width_mult, CPU, skip_init=False)
    os.makedirs(args.out_rw, exist_ok=True)
    for item in tqdm(_loader(dataset, args.num_workers), total=len(dataset), desc="reference rw"):
        walked = infer_aff.walk_scores(model, item, info.num_classes, args, CPU)
        infer_aff.write_rw_label(args, item, walked)


STAGES = {"seed": seed, "deeplab": deeplab, "rw": rw}


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in STAGES:
        raise SystemExit(f"usage: python -m bench.reference_infer {{{','.join(STAGES)}}} <the script's flags>")
    STAGES[argv[0]](argv[1:])


if __name__ == "__main__":
    run_cli(main)
