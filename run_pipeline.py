"""Run the whole AVC workflow, stage by stage, as the separate scripts a user would run.

    python run_pipeline.py                          # synthetic default dataset, generated first
    python run_pipeline.py --voc12_root VOC2012     # published VOC 2012 configuration
    python run_pipeline.py --coco_root COCO2014     # published COCO 2014 configuration
    python run_pipeline.py --from train_aff         # rerun from a stage on
    python run_pipeline.py --only eval_rw           # rerun one stage
    python run_pipeline.py --dry_run                # print every command and stop

Every command is printed before it runs. A finished stage leaves a marker in
``<work_dir>/stages/``; an interrupted run resumes at the first unfinished stage (the stage
scripts themselves also skip finished images and resume from their checkpoints). At the end
the results table is printed and written to ``<results_dir>/summary.md`` and ``summary.json``,
with ``index.html`` showing sample images through every stage.
"""
from __future__ import annotations

import argparse
import os
from typing import Sequence

from tool.cli import run_cli
from tool.fileio import read_id_list
from tool.pipeline import PROFILES, Context, Paths, build_stages, run_stages, stage_done, stale_stages


SUMMARY_FILES = ("summary.md", "summary.json", "index.html")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    roots = parser.add_mutually_exclusive_group()
    roots.add_argument("--voc12_root", help="PASCAL VOC 2012 root (+ SegmentationClassAug): published config")
    roots.add_argument("--coco_root", help="MS COCO 2014 root: published config")
    parser.add_argument("--weights", default=None,
                        help="ImageNet ResNet38 weights (ilsvrc-cls_rna-a1_cls1000_ep-0001.params) for "
                             "every training stage; required by the voc12 and coco14 profiles")
    parser.add_argument("--profile", choices=sorted(PROFILES), default=None,
                        help="configuration (default: synthetic, or voc12/coco14 when a root is given)")
    parser.add_argument("--work_dir", default=None, help="intermediate outputs (default: runs/<profile>)")
    parser.add_argument("--results_dir", default="results", help="summary.md, summary.json, index.html")
    order = parser.add_mutually_exclusive_group()
    order.add_argument("--from", dest="from_stage", metavar="STAGE", help="rerun this stage and all after it")
    order.add_argument("--only", metavar="STAGE", help="rerun only this stage")
    parser.add_argument("--dry_run", action="store_true", help="print the commands without running them")
    args = parser.parse_args(argv)
    if args.profile is None:
        args.profile = "voc12" if args.voc12_root else "coco14" if args.coco_root else "synthetic"
    args.work_dir = args.work_dir or os.path.join("runs", args.profile)
    if args.profile in ("voc12", "coco14") and not args.weights and not args.dry_run:
        parser.error(f"the {args.profile} profile starts from ImageNet weights: give --weights "
                     "ilsvrc-cls_rna-a1_cls1000_ep-0001.params")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    profile = PROFILES[args.profile]
    data_root = args.voc12_root or args.coco_root or os.path.join(args.work_dir, "data")
    ctx = Context(args.profile, profile, Paths.under(os.path.abspath(args.work_dir), os.path.abspath(data_root),
                                       os.path.abspath(args.results_dir)),
                  imagenet_weights=args.weights and os.path.abspath(args.weights))
    stages = build_stages(ctx)
    if run_stages(ctx, stages, only=args.only, from_stage=args.from_stage, dry_run=args.dry_run):
        return 1
    stale = [] if args.dry_run else stale_stages(ctx, stages)
    if stale:  # after --only: later stages were made from the earlier outputs
        for name in SUMMARY_FILES:  # an old summary would report numbers these stages no longer give
            path = os.path.join(ctx.paths.results_dir, name)
            if os.path.isfile(path):
                os.remove(path)
        print(f"\nno summary: {', '.join(stale)} are out of date with the current configuration and "
              f"earlier stages (the old summary was removed); run without --only to bring them up to date")
    elif not args.dry_run:
        print("\n" + build_report(ctx, stages))
    return 0


def build_report(ctx: Context, stages) -> str:
    """Write summary.md/json and index.html from the outputs of the finished stages."""
    from tool.datasets import get_dataset_info
    from tool.report import collect_results, write_page, write_summary

    paths = ctx.paths
    markers = [marker for marker in (stage_done(ctx, stage) for stage in stages) if marker]
    summary = collect_results(paths.eval, os.path.join(paths.seed_curve, "curve.json"), markers, ctx.profile_name,
                              {"train": ctx.profile["eval_list"], "val": ctx.profile["val_list"]})
    os.makedirs(paths.results_dir, exist_ok=True)
    text = write_summary(summary, paths.results_dir)
    samples = os.path.join(paths.lists, "samples.txt")
    if os.path.isfile(samples):
        info = get_dataset_info(ctx.profile["dataset"], paths.data_root)
        page = write_page(paths.results_dir, info, read_id_list(samples), paths.cam, ctx.best_threshold(),
                          {"CRF": paths.crf_masks, "random walk": paths.rw_masks,
                           "DeepLab": paths.deeplab_samples},
                          summary, os.path.join(paths.seed_curve, "curve.png"))
        text += f"\nPage: {page}\n"
    return text + f"Summary: {os.path.join(paths.results_dir, 'summary.md')}\n"


if __name__ == "__main__":
    run_cli(main)
