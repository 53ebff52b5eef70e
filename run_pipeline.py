"""Run the whole AVC workflow, stage by stage, as the separate scripts a user would run.

    python run_pipeline.py                          # synthetic default dataset, generated first
    python run_pipeline.py --voc12_root VOC2012     # published VOC 2012 configuration
    python run_pipeline.py --coco_root COCO2014     # published COCO 2014 configuration
    python run_pipeline.py --voc12_root DATA --profile small   # CPU-sized run on your own VOC-layout data
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
import sys
from typing import Sequence

from tool.cli import run_cli
from tool.fileio import DataError, read_id_list
from tool.pipeline import (PROFILES, Context, Paths, StageFailed, build_stages, clear_outputs,
                           profile_for_root, run_stage, stage_done)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    roots = parser.add_mutually_exclusive_group()
    roots.add_argument("--voc12_root", help="PASCAL VOC 2012 root (+ SegmentationClassAug): published config")
    roots.add_argument("--coco_root", help="MS COCO 2014 root: published config")
    parser.add_argument("--weights", default=None,
                        help="ImageNet ResNet38 weights (ilsvrc-cls_rna-a1_cls1000_ep-0001.params) for "
                             "every training stage; required by the voc12 and coco14 profiles")
    parser.add_argument("--profile", choices=sorted(PROFILES), default=None,
                        help="configuration (default: synthetic, or voc12/coco14 when a root is given); "
                             "'small' is the CPU-sized configuration of the synthetic default, on the "
                             "VOC-layout data of --voc12_root")
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
    if PROFILES[args.profile]["dataset"] is None and not args.voc12_root:
        parser.error(f"the {args.profile} profile runs on your own data: give --voc12_root, a folder in "
                     "the VOC layout (JPEGImages, SegmentationClass[Aug], ImageSets/Segmentation)")
    if args.profile in ("voc12", "coco14") and not args.weights and not args.dry_run:
        parser.error(f"the {args.profile} profile starts from ImageNet weights: give --weights "
                     "ilsvrc-cls_rna-a1_cls1000_ep-0001.params")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    data_root = args.voc12_root or args.coco_root or os.path.join(args.work_dir, "data")
    profile = profile_for_root(args.profile, data_root)
    ctx = Context(args.profile, profile, Paths.under(os.path.abspath(args.work_dir), os.path.abspath(data_root),
                                       os.path.abspath(args.results_dir)),
                  imagenet_weights=args.weights and os.path.abspath(args.weights))
    stages = build_stages(ctx)
    names = [stage.name for stage in stages]
    chosen = args.only or args.from_stage
    if chosen and chosen not in names:
        raise DataError(f"unknown stage {chosen!r}; the stages are: {', '.join(names)}")
    first = names.index(chosen) if chosen else 0
    for index, stage in enumerate(stages):
        if args.only and stage.name != args.only:
            continue
        forced = args.only is not None or (args.from_stage is not None and index >= first)
        if stage_done(ctx, stage) and not forced:
            print(f"--- [{stage.name}] done earlier (marker {os.path.join(ctx.paths.stages, stage.name)}.json)")
            continue
        if args.dry_run:
            try:
                print(f"[{stage.name}] python {' '.join(stage.command(ctx))}")
            except DataError as error:  # a flag that comes from an earlier stage's result
                print(f"[{stage.name}] (command known once earlier stages ran: {error})")
            continue
        if forced:
            clear_outputs(stage)
        try:
            run_stage(ctx, stage)
        except StageFailed as error:
            print(f"\n{error}", file=sys.stderr)
            return 1
    if not args.dry_run:
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
