"""AVC ablation: SEAM vs AVC vs each AVC term alone, over training seeds and small datasets.

For every (dataset, configuration, training seed) it runs the CPU profile's Stage 1 and 2
(``train_avc.py`` with the synthetic profile's flags, ``infer_seed.py`` with its scales) and
``evaluation.py --curve`` on the train list, then writes a markdown table of the seed mIoU
(mean, sample standard deviation and range over the seeds) to ``<out>/ablation.md``.

Seed mIoU = the best point of the background-threshold curve 0.00..0.59, chosen on the ground
truth as SEAM's evaluation does; the same rule for every configuration. Finished runs (their
``curve.json`` exists) are skipped, so an interrupted ablation resumes. Example (the README's)::

    .venv/bin/python -m bench.avc_ablation --out runs/avc_ablation --max_epoches 10 --seeds 0 1 2

Datasets: ``default`` is the synthetic profile's generated set (6 classes, generator seed 0);
``d2`` the same generator with another seed and class count (8 classes, seed 1).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from tool.fileio import atomic_write_text
from workflow.pipeline import PROFILES

PROFILE = PROFILES["synthetic"]
DATASETS: dict[str, dict[str, int]] = {
    "default": dict(PROFILE["synthetic"]),
    "d2": {**PROFILE["synthetic"], "num_classes": 8, "seed": 1},
}
# Configuration -> train_avc.py flags. "avc_cross" / "avc_sem": that AVC term alone.
CONFIGS: dict[str, tuple[str, ...]] = {
    "seam": ("--avc_weight", "0"),
    "avc": (),
    "avc_cross": ("--avc_sem_weight", "0"),
    "avc_sem": ("--avc_cross_weight", "0"),
}


def _run(argv: Sequence[str], log_path: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log_path, "w") as log:
        subprocess.run([sys.executable, *argv], check=True, stdout=log, stderr=subprocess.STDOUT, env=env)


def make_dataset(out: str, name: str) -> str:
    root = os.path.join(out, "data", name)
    if not os.path.isfile(os.path.join(root, "cls_labels.npy")):
        spec = DATASETS[name]
        os.makedirs(os.path.dirname(root), exist_ok=True)
        _run(["-m", "voc12.synthetic", "--out", root, "--prepare",
              *[f"--{k}={v}" for k, v in spec.items()]], root + ".log")
    return root


def train_command(root: str, run_dir: str, config: str, seed: int, max_epoches: int) -> list[str]:
    settings = PROFILE["train_avc"]
    return ["train_avc.py", "--dataset", "synthetic", "--voc12_root", root,
            "--train_list", os.path.join(root, "train.txt"), "--session_name", "m", "--save_dir", run_dir,
            "--batch_size", str(settings["batch_size"]), "--lr", str(settings["lr"]),
            "--momentum", str(settings["momentum"]), "--crop_size", str(settings["crop_size"]),
            "--resize_long", *[str(v) for v in settings["resize_long"]], *settings.get("flags", ()),
            "--width_mult", str(PROFILE["width_mult"]), "--num_workers", str(PROFILE["num_workers"]),
            "--max_epoches", str(max_epoches), "--seed", str(seed), "--overwrite", *CONFIGS[config]]


def run_one(root: str, run_dir: str, config: str, seed: int, max_epoches: int) -> dict:
    result_path = os.path.join(run_dir, "curve.json")
    if not os.path.isfile(result_path):
        os.makedirs(run_dir, exist_ok=True)
        start = time.time()
        _run(train_command(root, run_dir, config, seed, max_epoches), os.path.join(run_dir, "train.log"))
        _run(["infer_seed.py", "--dataset", "synthetic", "--voc12_root", root,
              "--weights", os.path.join(run_dir, "m.pth"), "--infer_list", os.path.join(root, "train.txt"),
              "--out_cam", os.path.join(run_dir, "cam"), "--num_workers", "1", "--threads", "1",
              "--scales", *[str(s) for s in PROFILE["infer_seed"]["scales"]], "--overwrite"],
             os.path.join(run_dir, "infer.log"))
        _run(["evaluation.py", "--dataset", "synthetic", "--voc12_root", root,
              "--list", os.path.join(root, "train.txt"), "--predict_dir", os.path.join(run_dir, "cam"),
              "--type", "npy", "--curve", "--out_json", result_path], os.path.join(run_dir, "eval.log"))
        print(f"{run_dir}: {time.time() - start:.0f} s", flush=True)
    return read_result(run_dir)


def read_result(run_dir: str) -> dict:
    """Best point of a finished run's threshold curve (mIoU in %)."""
    with open(os.path.join(run_dir, "curve.json")) as f:
        curve = json.load(f)
    return {"miou": 100 * curve["best_miou"], "threshold": curve["best_threshold"]}


def table(results: dict, datasets: Sequence[str], configs: Sequence[str], seeds: Sequence[int],
          max_epoches: int) -> str:
    """Markdown table: per seed, mean, sample std and range; the gain over SEAM is the mean of the
    per-seed differences (paired: the same training seed gives the same data order and CAM path).
    Runs missing from ``results`` show as '-' and are left out of the statistics."""
    lines = [f"Seed mIoU (%) on train, training seeds {', '.join(map(str, seeds))}, {max_epoches} epochs; "
             "best of the threshold curve 0.00..0.59 (chosen on GT, as SEAM's evaluation).",
             "", "| dataset | configuration | per seed | mean | std | range | - SEAM (paired, per seed) |",
             "|---|---|---|---|---|---|---|"]
    for dataset in datasets:
        for config in configs:
            done = [s for s in seeds if (dataset, config, s) in results]
            if not done:
                continue
            values = [results[dataset, config, s]["miou"] for s in done]
            mean = statistics.mean(values)
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            per_seed = " / ".join(f"{results[dataset, config, s]['miou']:.1f}" if s in done else "-" for s in seeds)
            gain = ""
            paired = [s for s in done if (dataset, "seam", s) in results]
            if config != "seam" and paired:
                diffs = [results[dataset, config, s]["miou"] - results[dataset, "seam", s]["miou"] for s in paired]
                gain = f"{statistics.mean(diffs):+.1f} ({' / '.join(f'{d:+.1f}' for d in diffs)})"
            lines.append(f"| {dataset} | {config} | {per_seed} | {mean:.1f} | {std:.1f} | "
                         f"{min(values):.1f}..{max(values):.1f} | {gain} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/avc_ablation")
    parser.add_argument("--max_epoches", type=int, default=PROFILE["train_avc"]["max_epoches"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=["default", "d2"])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (one thread each)")
    parser.add_argument("--table_only", action="store_true",
                        help="only tabulate the finished runs (missing ones show as '-')")
    args = parser.parse_args(argv)

    keys = [(d, c, s) for s in args.seeds for d in args.datasets for c in args.configs]

    def run_dir(key) -> str:
        dataset, config, seed = key
        return os.path.join(args.out, f"e{args.max_epoches}", dataset, f"{config}_s{seed}")

    if args.table_only:
        results = {key: read_result(run_dir(key)) for key in keys
                   if os.path.isfile(os.path.join(run_dir(key), "curve.json"))}
    else:
        roots = {name: make_dataset(args.out, name) for name in args.datasets}

        def job(key):
            return key, run_one(roots[key[0]], run_dir(key), key[1], key[2], args.max_epoches)

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            results = dict(pool.map(job, keys))
    text = table(results, args.datasets, args.configs, args.seeds, args.max_epoches)
    atomic_write_text(os.path.join(args.out, f"ablation_e{args.max_epoches}.md"), text)
    print(text)


if __name__ == "__main__":
    main()
