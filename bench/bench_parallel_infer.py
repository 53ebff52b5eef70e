"""Whole-run wall time of seed inference, DeepLab test and random walk: ours against the reference way.

    python -m bench.bench_parallel_infer                       # 3 stages, 12 images of 112 px, width 0.25
    python -m bench.bench_parallel_infer --stages seed --repeats 1

On the same synthetic images, the same (random) weights and the same cores, each stage runs as a
fresh process either as our script (``infer_seed.py``, ``test_deeplab.py``, ``infer_aff.py`` with
their default parallelism: ``tool/parallel.py``) or as the reference scripts schedule it
(``bench/reference_infer.py``: one forward per view over a thread pool, the CRF inline, torch's
default threads, ``--num_workers`` loader workers and view threads). Runs alternate (reference,
ours, reference, ...); the table gives the minimum wall time of ``--repeats`` runs, the CPU
utilisation of that run (CPU seconds of the process and its children / wall seconds) and the
1-minute load average before each run (the machine may be shared, so compare only the ratio of
one table). The outputs of both ways are compared: CAM/CRF dicts to float tolerance, label PNGs
pixel by pixel. It measures, it asserts no time.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from network.affinity import AffinityNet
from network.avc import AVCNet
from network.deeplab import DeepLabV1
from tool.device import resolve_precision
from voc12.prepare import prepare_voc
from voc12.synthetic import generate_dataset
from workflow.datasets import get_dataset_info

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("seed", "deeplab", "rw")
SCRIPTS = {"seed": "infer_seed.py", "deeplab": "test_deeplab.py", "rw": "infer_aff.py"}


def make_inputs(work: str, num_images: int, image_size: int, width_mult: float) -> dict[str, str]:
    """Synthetic VOC-layout images and random weights of the three networks at ``width_mult``."""
    root = os.path.join(work, "data")
    generate_dataset(root, num_train=num_images, num_val=1, image_size=image_size, num_classes=20, seed=0)
    info = get_dataset_info("synthetic", root)
    prepare_voc(info, workers=1)
    torch.manual_seed(0)
    paths = {"root": root, "list": os.path.join(root, "train.txt")}
    for name, model in (("avc", AVCNet(num_classes=info.num_classes, width_mult=width_mult)),
                        ("deeplab", DeepLabV1(num_classes=info.num_classes, width_mult=width_mult)),
                        ("aff", AffinityNet(width_mult=width_mult))):
        paths[name] = os.path.join(work, f"{name}.pth")
        torch.save({"model": model.state_dict(), "args": {"width_mult": width_mult}}, paths[name])
    return paths


def stage_flags(stage: str, paths: dict[str, str], out: str, num_workers: int) -> list[str]:
    common = ["--dataset", "synthetic", "--voc12_root", paths["root"], "--infer_list", paths["list"],
              "--num_workers", str(num_workers)]
    if stage == "seed":
        return common + ["--weights", paths["avc"], "--out_cam", os.path.join(out, "cam"),
                         "--out_cam_pred", os.path.join(out, "seed"), "--out_crf", os.path.join(out, "crf")]
    if stage == "deeplab":
        return common + ["--weights", paths["deeplab"], "--out_dir", out]
    return common + ["--weights", paths["aff"], "--cam_dir", paths["cam"], "--out_rw", out, "--crf",
                     "--device", "cpu"]


# The ways compared: the reference scheduling (float32, as the reference scripts), our script with
# its default precision (auto: bf16 on a CPU with native bf16, tool.device.resolve_precision) and,
# with --fp32, our script in float32 (the reference's precision: outputs to float tolerance).
WAYS = ("reference", "ours", "ours_fp32")


def command(stage: str, way: str, flags: Sequence[str]) -> list[str]:
    if way == "reference":
        return [sys.executable, "-m", "bench.reference_infer", stage, *flags]
    precision = ["--precision", "fp32"] if way == "ours_fp32" else []
    return [sys.executable, SCRIPTS[stage], *flags, *precision]


def timed_run(argv: Sequence[str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system of the process and its children) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def compare_outputs(stage: str, reference: str, ours: str) -> str:
    """How far our outputs are from the reference way's: max |difference| of dicts, PNG pixels differing."""
    worst, differing, pixels = 0.0, 0, 0
    for folder, _, names in os.walk(reference):
        for name in names:
            path = os.path.join(folder, name)
            other = os.path.join(ours, os.path.relpath(path, reference))
            if name.endswith(".npy"):
                a, b = np.load(path, allow_pickle=True).item(), np.load(other, allow_pickle=True).item()
                if sorted(a) != sorted(b):
                    return f"different keys in {name}"
                worst = max([worst] + [float(np.abs(a[key] - b[key]).max()) for key in a])
            elif name.endswith(".png"):
                a, b = np.asarray(Image.open(path)), np.asarray(Image.open(other))
                differing += int((a != b).sum())
                pixels += a.size
    return f"dicts max |diff| {worst:.1e}, PNG pixels differing {differing}/{pixels}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--num_images", type=int, default=12)
    parser.add_argument("--image_size", type=int, default=112)
    parser.add_argument("--width_mult", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num_workers", type=int, default=2,
                        help="the reference's loader workers and view threads (SEAM --num_workers)")
    parser.add_argument("--fp32", action="store_true",
                        help="also time our scripts with --precision fp32 (the reference's precision)")
    args = parser.parse_args(argv)
    ways = [way for way in WAYS if way != "ours_fp32" or args.fp32]
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="bench_parallel_") as work:
        paths = make_inputs(work, args.num_images, args.image_size, args.width_mult)
        paths["cam"] = os.path.join(work, "cam_for_rw", "cam")
        if "rw" in args.stages:  # the walk's CAM dicts, made once, untimed
            subprocess.run(command("seed", "ours", stage_flags("seed", paths, os.path.dirname(paths["cam"]),
                                                               args.num_workers)),
                           cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"{args.num_images} synthetic images {args.image_size} px, width {args.width_mult}, {cores} cores, "
              f"min of {args.repeats} alternating runs; ours = precision auto ({resolve_precision('auto', 'cpu')} "
              f"here)")
        print("| stage | way | wall s (CPU s, utilisation) | / reference | load (1 min) during the runs | "
              "outputs against the reference way |")
        print("|---|---|---|---|---|---|")
        for stage in args.stages:
            runs: dict[str, list[tuple[float, float]]] = {way: [] for way in ways}
            loads = []
            for _ in range(args.repeats):
                for way in runs:
                    out = os.path.join(work, stage, way)
                    shutil.rmtree(out, ignore_errors=True)
                    loads.append(os.getloadavg()[0])
                    runs[way].append(timed_run(command(stage, way, stage_flags(stage, paths, out, args.num_workers))))
            best = {way: min(times) for way, times in runs.items()}
            for way, (wall, cpu) in best.items():
                ratio = "" if way == "reference" else f"**{wall / best['reference'][0]:.2f}**"
                agreement = "" if way == "reference" else compare_outputs(
                    stage, os.path.join(work, stage, "reference"), os.path.join(work, stage, way))
                print(f"| {stage} | {way} | {wall:.2f} ({cpu:.1f} CPU s, {cpu / wall:.2f}) | {ratio} | "
                      f"{min(loads):.2f}-{max(loads):.2f} | {agreement} |", flush=True)


if __name__ == "__main__":
    main()
