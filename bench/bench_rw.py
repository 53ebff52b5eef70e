"""Time and peak memory of the sparse random walk against the dense matrix-power baseline.

    python -m bench.bench_rw                       # grids 32, 48, 64, 80; 21 channels; beta 8, logt 8
    python -m bench.bench_rw --sizes 32 48 --repeat 1 --threads 1
    python -m bench.bench_rw --method power        # the exact 2^logt-product walk instead of Chebyshev

One table row per (torch threads, grid); ``--threads 1 0`` (the default) gives 1 thread and
torch's default (0). ``random_walk`` itself caps its CPU walk at 1 thread (``max_threads=1``:
more threads mostly wait at barriers), so in the default rows only the dense baseline gets
torch's threads. The 1-minute load average at the start of each row is shown, since the
timings are only comparable on a quiet machine. Every synthetic channel is non-zero, so the
walk's skipping of all-zero channels (absent classes in real CAM dicts) does not help here.

Each (grid, method) case runs in a fresh subprocess, so its peak memory is its own. RSS counts
torch's CPU tensors (tracemalloc does not): after the inputs are built the kernel's peak-RSS mark
is reset (``/proc/self/clear_refs``), and "walk peak" is the peak RSS during the walk minus
the RSS before it (glibc's mmap threshold is fixed at 64 KiB so freed tensors leave RSS);
without /proc it falls back to the increase of ``getrusage().ru_maxrss``. The process peak
(``ru_maxrss``, interpreter and torch included) is shown in brackets. On CUDA (``--device cuda``) the walk
peak is ``torch.cuda.max_memory_allocated``. The inputs are synthetic but shaped like
AffinityNet's: pair affinities of a piecewise-constant feature map with noise, and CAM-like
score maps whose arg-max follows the regions. Both methods get identical inputs; the labels
(x8 upsample, arg-max) are compared pixel by pixel.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from bench.dense_rw_baseline import dense_random_walk
from network.affinity import pair_affinities
from tool.affinity import affinity_radius
from tool.random_walk import WALK_METHODS, AffinityGraph, random_walk, random_walk_labels

METHODS = ("sparse", "dense")


def synthetic_inputs(size: int, channels: int, seed: int = 0) -> tuple[AffinityGraph, torch.Tensor]:
    """A size x size affinity graph and (channels, size, size) scores, deterministic in ``seed``."""
    rng = np.random.default_rng((seed, size))
    grid = np.arange(size)
    regions = (grid[:, None] * 3 // size) * 3 + (grid[None, :] * 3 // size)       # 3 x 3 blocks
    features = rng.normal(size=(9, 32))[regions] + 0.3 * rng.normal(size=(size, size, 32))
    features = torch.from_numpy(features.transpose(2, 0, 1)[None].astype(np.float32))
    radius = affinity_radius(size, size)
    graph = AffinityGraph.from_pairs(pair_affinities(features, radius)[0], radius, (size, size))
    scores = 0.05 * rng.random((channels, size, size))
    region_class = rng.integers(0, min(channels, 4), 9)                           # bg or one of 3 classes
    scores[region_class[regions], grid[:, None], grid[None, :]] += 0.4 + 0.3 * rng.random((size, size))
    return graph, torch.from_numpy(scores.astype(np.float32))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # Linux: KiB


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise OSError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> float | None:
    """Reset the kernel's peak-RSS mark (VmHWM) and return the current RSS in MiB; None if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _status_mib("VmRSS")
    except OSError:
        return None


def run_case(method: str, size: int, channels: int, beta: float, logt: int, repeat: int, device: str,
             out_path: str, walk_method: str = "chebyshev", dtype: torch.dtype = torch.float64) -> None:
    """Worker: one method on one grid; writes time, memory, walked scores and labels to ``out_path``."""
    graph, scores = synthetic_inputs(size, channels)
    graph = AffinityGraph(graph.weights.to(device), graph.ind_from.to(device), graph.ind_to.to(device),
                          graph.feat_hw)
    scores = scores.to(device)
    walk_fn = (functools.partial(random_walk, dtype=dtype, method=walk_method) if method == "sparse"
               else dense_random_walk)
    # Warm up on a tiny grid: the first call pays one-off kernel and thread-pool start-up.
    warm_graph, warm_scores = synthetic_inputs(12, channels)
    walk_fn(AffinityGraph(warm_graph.weights.to(device), warm_graph.ind_from.to(device),
                          warm_graph.ind_to.to(device), warm_graph.feat_hw), warm_scores.to(device), beta, logt)
    rss_before = reset_peak_rss()
    peak_after = lambda: _status_mib("VmHWM")  # noqa: E731 - peak since the reset
    if rss_before is None:                       # no /proc reset: the high-water mark of the whole process
        rss_before, peak_after = peak_rss_mib(), peak_rss_mib
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        walked = walk_fn(graph, scores, beta, logt)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    if device == "cuda":
        walk_peak = (torch.cuda.max_memory_allocated() - base_alloc) / 2 ** 20
    else:
        walk_peak = peak_after() - rss_before
    labels = random_walk_labels(walked.cpu(), (size * 8, size * 8))
    np.savez(out_path, seconds=np.array(min(seconds)), walk_peak=np.array(walk_peak),
             process_peak=np.array(peak_rss_mib()), walked=walked.cpu().numpy(), labels=labels)


def spawn_case(method: str, size: int, threads: int, args: argparse.Namespace, folder: str) -> dict:
    out_path = os.path.join(folder, f"{method}_{size}_{threads}.npz")
    repeat = args.repeat if method == "sparse" else 1                     # the dense case is slow
    command = [sys.executable, "-m", "bench.bench_rw", "--worker", method, "--sizes", str(size),
               "--channels", str(args.channels), "--beta", str(args.beta), "--logt", str(args.logt),
               "--repeat", str(repeat), "--device", args.device, "--out", out_path, "--threads", str(threads),
               "--method", args.method, "--dtype", args.dtype]
    # Fixed mmap threshold: tensors over 64 KiB get their own pages and give them back when freed,
    # so RSS follows the live tensors instead of reused heap memory.
    subprocess.run(command, check=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    with np.load(out_path) as result:
        return {key: result[key] for key in result.files}


def label_margin(walked: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 score of the x8 upsampled scores, to tell near-ties from real differences."""
    upsampled = torch.nn.functional.interpolate(torch.from_numpy(walked)[None], scale_factor=8, mode="bilinear",
                                                align_corners=False)[0]
    top2 = torch.topk(upsampled, 2, dim=0).values
    return (top2[0] - top2[1]).numpy()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 48, 64, 80], help="feature grid sides")
    parser.add_argument("--channels", type=int, default=21, help="score channels (VOC: 21)")
    parser.add_argument("--beta", type=float, default=8)
    parser.add_argument("--logt", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of the sparse walk (best is kept)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 0],
                        help="torch CPU threads in each case, one table block per value; 0 = torch's default "
                             "(default: 1 0). The sparse walk is a chain of small products: on a CPU shared "
                             "with other jobs, 1 thread avoids waiting at thread barriers")
    parser.add_argument("--method", choices=WALK_METHODS, default="chebyshev", help="sparse walk method")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="sparse walk dtype")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        if args.threads[0] > 0:
            torch.set_num_threads(args.threads[0])
        run_case(args.worker, args.sizes[0], args.channels, args.beta, args.logt, args.repeat, args.device, args.out,
                 args.method, getattr(torch, args.dtype))
        return

    print(f"device {args.device}, torch {torch.__version__}, torch default threads {torch.get_num_threads()} "
          f"({os.cpu_count()} CPUs), {args.channels} channels, beta {args.beta:g}, logt {args.logt}; sparse = "
          f"{args.method} walk, {args.dtype}; time = best of {args.repeat} (sparse) / 1 run (dense); memory = "
          f"peak RSS increase during the walk (process peak)\n")
    rows = ["| threads | grid | N | load avg | dense time (s) | sparse time (s) | speed-up | "
            "dense walk peak MiB (process) | sparse walk peak MiB (process) | memory ratio | max rel. score diff | "
            "labels differing |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as folder:
        for threads, size in itertools.product(args.threads, args.sizes):
            load = os.getloadavg()[0]
            results = {method: spawn_case(method, size, threads, args, folder) for method in METHODS}
            sparse, dense = results["sparse"], results["dense"]
            scale = np.abs(dense["walked"]).max(axis=(1, 2), keepdims=True) + 1e-30
            score_diff = float((np.abs(sparse["walked"] - dense["walked"]) / scale).max())
            differ = sparse["labels"] != dense["labels"]
            margin_note = ""
            if differ.any():
                margin_note = f" (max margin there {label_margin(dense['walked'])[differ].max():.1e})"
            rows.append(
                f"| {threads or f'default ({torch.get_num_threads()})'} | {size}x{size} | {size * size} | "
                f"{load:.2f} | {float(dense['seconds']):.3f} | {float(sparse['seconds']):.3f} | "
                f"{float(dense['seconds']) / float(sparse['seconds']):.1f}x | "
                f"{float(dense['walk_peak']):.1f} ({float(dense['process_peak']):.0f}) | "
                f"{float(sparse['walk_peak']):.1f} ({float(sparse['process_peak']):.0f}) | "
                f"{float(dense['walk_peak']) / max(float(sparse['walk_peak']), 0.01):.0f}x | "
                f"{score_diff:.1e} | {int(differ.sum())} of {differ.size}{margin_note} |")
            print(rows[-1], flush=True)
    print("\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
