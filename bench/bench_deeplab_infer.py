"""Benchmark: DeepLabV1 test-time inference, batched views against one forward per view.

For each synthetic image, the 6 test scales x {image, mirror} views of test_deeplab.py are
run through a (small-width) DeepLabV1 either as ``tool.multiscale.forward_views`` does it
(both flips of a scale in one forward) or with one forward per view
(``forward_views_unbatched``, the reference's loop). Checks that both give the same fused
probabilities, prints images/s of each and the speed-up. CPU by default; sizes kept small::

    .venv/bin/python -m bench.bench_deeplab_infer --width_mult 0.0625 --height 64 --width 80
"""
from __future__ import annotations

import argparse
import time
from typing import Callable, Sequence

import numpy as np
import torch

from network.deeplab import DeepLabV1
from test_deeplab import DEFAULT_SCALES, fuse_view_logits, multiscale_views
from bench.unbatched_views import forward_views_unbatched
from tool.multiscale import forward_views


def make_views(rng: np.random.Generator, height: int, width: int, scales: Sequence[float]) -> list[torch.Tensor]:
    """Views of one random image, built as test_deeplab.DeepLabTestDataset builds them (with flip)."""
    return multiscale_views(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), scales, flip=True)


def time_images(run_one: Callable[[list[torch.Tensor]], torch.Tensor], images: list[list[torch.Tensor]],
                repeats: int) -> tuple[float, list[torch.Tensor]]:
    """Best-of-``repeats`` images/s over all images, and the last repetition's outputs."""
    best = float("inf")
    outputs: list[torch.Tensor] = []
    for _ in range(repeats):
        start = time.perf_counter()
        outputs = [run_one(views) for views in images]
        best = min(best, time.perf_counter() - start)
    return len(images) / best, outputs


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width_mult", type=float, default=0.0625)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=80)
    parser.add_argument("--num_images", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = DeepLabV1(num_classes=20, width_mult=args.width_mult).eval().to(device)
    rng = np.random.default_rng(0)
    images = [make_views(rng, args.height, args.width, DEFAULT_SCALES) for _ in range(args.num_images)]
    out_size = (args.height, args.width)

    def batched(views: list[torch.Tensor]) -> torch.Tensor:
        return fuse_view_logits(forward_views(model, views, out_size, align_corners=True, device=device))

    def unbatched(views: list[torch.Tensor]) -> torch.Tensor:
        return fuse_view_logits(forward_views_unbatched(model, views, out_size, align_corners=True, device=device))

    batched(images[0])  # warm-up (allocator, oneDNN kernels)
    batched_rate, batched_out = time_images(batched, images, args.repeats)
    unbatched_rate, unbatched_out = time_images(unbatched, images, args.repeats)
    worst = max(float((a - b).abs().max()) for a, b in zip(batched_out, unbatched_out))
    print(f"DeepLabV1 width {args.width_mult}, {args.height}x{args.width} images, "
          f"{len(DEFAULT_SCALES)} scales x flip = {2 * len(DEFAULT_SCALES)} views, device {device}, "
          f"{torch.get_num_threads()} threads")
    print(f"batched (one forward per scale): {batched_rate:.2f} images/s")
    print(f"one forward per view:            {unbatched_rate:.2f} images/s")
    print(f"speed-up: {batched_rate / unbatched_rate:.2f}x; max |probability difference| {worst:.2e}")


if __name__ == "__main__":
    main()
