"""IRN's random walk: the project's sparse walk against the reference's dense matrix power.

    python -m bench.bench_irn_walk                          # a 500 x 375 image: 94 x 125 grid, N = 11,750
    python -m bench.bench_irn_walk --images 250x188 500x375 --threads 1
    python -m bench.bench_irn_walk --dense_squarings 1   # dense: 1 of 8 squarings run, the rest projected

The reference (IRN ``propagate_to_edge``, SIPE/AE-SIPE the same) builds the dense affinity on the
padded grid, crops it to the N x N interior, raises it to beta, column-normalises it and squares it
``exp_times`` times (float32), then multiplies the masked CAM rows by T^256. The sparse walk
(:func:`tool.irn_walk.propagate_to_edge`) applies T^256 to the rows through the CSR operator and a
Chebyshev series, never forming an N x N matrix. Inputs are synthetic but shaped like IRN's: a
boundary map near 0.95 on the outlines of three ellipses and 0.03..0.07 elsewhere, CAM maps that
follow the ellipses; IRN's post-processing (x4, global max, 0.25 background, arg-max) gives the
labels that are compared. Each case runs in its own subprocess (peak RSS as in bench_rw: the
increase during the walk, process peak in brackets).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from bench.bench_rw import _status_mib, peak_rss_mib, reset_peak_rss
from bench.dense_rw_baseline import dense_affinity
from tool.irn_walk import SEG_LABEL_VARIANTS, boundary_graph, propagate_to_edge, walked_to_label

METHODS = ("sparse", "dense")
CLASS_IDS = [1, 15]


def synthetic_inputs(image_hw: tuple[int, int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Boundary (h, w) and two CAM maps (2, h, w) on the stride-4 grid of an image of ``image_hw``."""
    height, width = (image_hw[0] - 1) // 4 + 1, (image_hw[1] - 1) // 4 + 1
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    edge = rng.uniform(0.03, 0.07, (height, width))
    cams = np.zeros((2, height, width))
    for k, (cy, cx, ry, rx) in enumerate([(0.4, 0.3, 0.25, 0.2), (0.6, 0.72, 0.22, 0.18), (0.2, 0.75, 0.12, 0.1)]):
        distance = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2
        edge[np.abs(distance - 1) < 0.15] = 0.95
        cams[min(k, 1)] += np.clip(1.2 - distance, 0, 1) * (0.5 + 0.5 * rng.random((height, width)))
    return torch.from_numpy(edge.astype(np.float32)), torch.from_numpy(cams.astype(np.float32))


def dense_propagate(scores: torch.Tensor, edge: torch.Tensor, radius: int = 5, beta: float = 10,
                    logt: int = 8, timings: list | None = None) -> torch.Tensor:
    """The reference's ``propagate_to_edge``: dense padded affinity, interior crop, A^beta, column
    normalisation, ``logt`` squarings, rows @ T (float32). ``timings`` gets the set-up time and
    the time of each squaring."""
    start = time.perf_counter()
    height, width = edge.shape
    graph = boundary_graph(edge, radius)
    padded_h, padded_w = graph.feat_hw
    dense = dense_affinity(graph).view(padded_h, padded_w, padded_h, padded_w)
    dense = dense[:-radius, radius:-radius, :-radius, radius:-radius].reshape(height * width, height * width)
    del graph
    transition = dense ** beta
    del dense
    transition /= torch.sum(transition, dim=0, keepdim=True)
    if timings is not None:
        timings.append(time.perf_counter() - start)
    for _ in range(logt):
        start = time.perf_counter()
        transition = torch.matmul(transition, transition)
        if timings is not None:
            timings.append(time.perf_counter() - start)
    rows = (scores * (1 - edge)).reshape(scores.shape[0], -1)
    return torch.matmul(rows, transition).reshape(scores.shape)


def run_case(method: str, image_hw: tuple[int, int], out_path: str, dense_squarings: int = 8) -> None:
    """One method on one image size. The dense case may stop after ``dense_squarings`` of its 8
    squarings (its peak memory is reached in the first); the time of the rest is then projected
    from the measured ones and the labels are not compared."""
    edge, cams = synthetic_inputs(image_hw)
    timings: list[float] = []
    if method == "sparse":
        walk = propagate_to_edge
    else:
        walk = lambda c, e: dense_propagate(c, e, logt=dense_squarings, timings=timings)  # noqa: E731
    warm_edge, warm_cams = synthetic_inputs((40, 48))
    walk(warm_cams, warm_edge)
    timings.clear()
    rss_before = reset_peak_rss()
    peak_after = lambda: _status_mib("VmHWM")  # noqa: E731 - peak since the reset
    if rss_before is None:
        rss_before, peak_after = peak_rss_mib(), peak_rss_mib
    start = time.perf_counter()
    walked = walk(cams, edge)
    seconds = time.perf_counter() - start
    walk_peak = peak_after() - rss_before
    if method == "dense" and dense_squarings < 8:
        squarings = timings[1:]
        seconds += (8 - dense_squarings) * float(np.mean(squarings))
    label = walked_to_label(SEG_LABEL_VARIANTS["irn"], walked, CLASS_IDS, image_hw)
    up = torch.nn.functional.interpolate(walked[:, None], scale_factor=4, mode="bilinear",
                                         align_corners=False)[:, 0, : image_hw[0], : image_hw[1]]
    up = torch.cat([torch.full((1,) + tuple(up.shape[1:]), 0.25), up / up.max()])
    top2 = torch.topk(up, 2, dim=0).values
    np.savez(out_path, seconds=np.array(seconds), walk_peak=np.array(walk_peak), process_peak=np.array(peak_rss_mib()),
             walked=walked.numpy(), label=label, margin=(top2[0] - top2[1]).numpy(),
             complete=np.array(method == "sparse" or dense_squarings >= 8))


def parse_size(text: str) -> tuple[int, int]:
    width, height = (int(v) for v in text.lower().split("x"))
    return height, width


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", nargs="+", default=["500x375"], help="image sizes WIDTHxHEIGHT")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of both methods (default 1)")
    parser.add_argument("--dense_squarings", type=int, default=8,
                        help="squarings the dense case really runs (default all 8); fewer: its time is "
                             "projected from the measured ones (marked ~) and its labels are not compared")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        run_case(args.worker, parse_size(args.images[0]), args.out, args.dense_squarings)
        return
    print(f"torch {torch.__version__}, {args.threads} thread(s), radius 5, beta 10, 2^8 steps; sparse = "
          f"Chebyshev walk in float64; dense = the reference's float32 matrix power\n")
    rows = ["| image | grid (N) | load avg | dense time (s) | sparse time (s) | speed-up | dense peak MiB (process) | "
            "sparse peak MiB (process) | max rel. score diff | labels differing |", "|---|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as folder:
        for text in args.images:
            image_hw = parse_size(text)
            load = os.getloadavg()[0]
            results = {}
            for method in METHODS:
                out_path = os.path.join(folder, f"{method}.npz")
                subprocess.run([sys.executable, "-m", "bench.bench_irn_walk", "--worker", method, "--images", text,
                                "--threads", str(args.threads), "--out", out_path,
                                "--dense_squarings", str(args.dense_squarings)], check=True,
                               env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
                with np.load(out_path) as result:
                    results[method] = {key: result[key] for key in result.files}
            sparse, dense = results["sparse"], results["dense"]
            grid = sparse["walked"].shape[1:]
            complete = bool(dense["complete"])
            if complete:
                diff = f'{float(np.abs(sparse["walked"] - dense["walked"]).max() / np.abs(dense["walked"]).max()):.1e}'
                differ = sparse["label"] != dense["label"]
                note = f" (margins there <= {dense['margin'][differ].max():.1e})" if differ.any() else ""
                labels = f"{int(differ.sum())} of {differ.size}{note}"
            else:
                diff, labels = "not compared", f"not compared ({args.dense_squarings} of 8 squarings run)"
            mark = "" if complete else "~"
            rows.append(f"| {text} | {grid[0]}x{grid[1]} ({grid[0] * grid[1]}) | {load:.2f} | "
                        f"{mark}{float(dense['seconds']):.1f} | {float(sparse['seconds']):.2f} | "
                        f"{mark}{float(dense['seconds']) / float(sparse['seconds']):.0f}x | "
                        f"{float(dense['walk_peak']):.0f} ({float(dense['process_peak']):.0f}) | "
                        f"{float(sparse['walk_peak']):.0f} ({float(sparse['process_peak']):.0f}) | {diff} | {labels} |")
            print(rows[-1], flush=True)
    print("\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
