"""Run the whole workflow, stage by stage, as the separate scripts a user would run.

    python run_pipeline.py                          # synthetic default dataset, generated first
    python run_pipeline.py --method sipe            # SIPE seeds (avc, seam, sipe, ae_sipe: network/methods.py)
    python run_pipeline.py --method msa             # MSA: superpixel FCN, then the MSA classifier's seeds
    python run_pipeline.py --method all --until eval_seed   # every method on the same data: comparison.md
    python run_pipeline.py --voc12_root VOC2012     # published VOC 2012 configuration
    python run_pipeline.py --coco_root COCO2014     # published COCO 2014 configuration
    python run_pipeline.py --voc12_root DATA --profile small   # CPU-sized run on your own VOC-layout data
    python run_pipeline.py --from train_aff         # rerun from a stage on
    python run_pipeline.py --only eval_rw           # rerun one stage
    python run_pipeline.py --dry_run                # print every command and stop
    python run_pipeline.py --refine irn             # IRN's boundary random walk instead of AffinityNet

Every command is printed before it runs. A finished stage leaves a marker in
``<work_dir>/stages/``; an interrupted run resumes at the first unfinished stage (the stage
scripts themselves also skip finished images and resume from their checkpoints). At the end
the results table is printed and written to ``<results_dir>/summary.md`` and ``summary.json``,
with ``index.html`` showing sample images through every stage. ``--method all`` runs every
seed method (msa_sal where it has saliency maps: the generated stand-ins, or ``--sal_dir``) in
``<work_dir>/<method>/`` on one dataset (``<work_dir>/data``), each method's
results in ``<results_dir>/<method>/``, and writes ``<results_dir>/comparison.md`` and
``comparison.json`` (every method's mIoU of each row, side by side).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Sequence

from network.segmenters import ALIASES, SEGMENTERS, get_segmenter
from tool.cli import run_cli
from tool.fileio import DataError, atomic_write_text, read_id_list, read_json_if_present
from workflow.pipeline import (PROFILES, REFINEMENTS, Context, Paths, build_stages, profile_for_root, result_notes,
                               run_stages, stage_done, stale_stages)


SUMMARY_FILES = ("summary.md", "summary.json", "index.html")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    roots = parser.add_mutually_exclusive_group()
    roots.add_argument("--voc12_root", help="PASCAL VOC 2012 root (+ SegmentationClassAug): published config")
    roots.add_argument("--coco_root", help="MS COCO 2014 root: published config")
    parser.add_argument("--weights", default=None,
                        help="ImageNet ResNet38 weights (ilsvrc-cls_rna-a1_cls1000_ep-0001.params) for "
                             "every training stage; required by the voc12 and coco14 profiles")
    parser.add_argument("--method", choices=(*SEED_METHODS, "all"), default="avc",
                        help="seed method (default avc); 'all' runs each on the same data and compares them")
    parser.add_argument("--seed_weights", default=None,
                        help="ImageNet weights of a ResNet-50 seed classifier (sipe, ae_sipe, msa, msa_sal): "
                             "torchvision's resnet50-19c8e357.pth; required by the voc12 and coco14 profiles for those")
    parser.add_argument("--sal_dir", default=None,
                        help="msa_sal: saliency PNGs <sal_dir>/<id>.png (PoolNet's; a detector trained with pixel "
                             "labels); required by the voc12 and coco14 profiles, else stand-ins are generated "
                             "from the ground truth")
    parser.add_argument("--until", metavar="STAGE", default=None,
                        help="stop after this stage (e.g. eval_seed for a quick seed comparison)")
    parser.add_argument("--seed_epochs", type=int, default=None,
                        help="epochs of the seed classifier instead of the profile's (a shorter comparison)")
    parser.add_argument("--segmenter", choices=[*SEGMENTERS, *ALIASES], default="deeplabv1_resnet38",
                        help="segmentation network of stages 4-5 (default deeplabv1_resnet38)")
    parser.add_argument("--segmenter_weights", default=None, metavar="PATH",
                        help="DeepLabV2 start: deeplabv1_resnet101-coco.pth (COCO segmentation, i.e. pixel "
                             "supervision) or torchvision's resnet101-63fe2227.pth (ImageNet); default scratch")
    parser.add_argument("--refine", choices=REFINEMENTS, default=None,
                        help="pseudo masks for DeepLab: crf (the CRF masks), affinitynet (its random walk) or "
                             "irn (IRN's boundary random walk; default for sipe / ae_sipe, else affinitynet). In a work "
                             "dir that ran another refinement, add --from <its first stage> so DeepLab retrains")
    parser.add_argument("--irn_weights", default=None,
                        help="ImageNet ResNet-50 (resnet50-19c8e357.pth) for IRN's frozen backbone; without it "
                             "(synthetic) the backbone stays random")
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
    if (args.profile in ("voc12", "coco14") and args.method in (*RESNET50_METHODS, "all")
            and not args.seed_weights and not args.dry_run):
        parser.error(f"SIPE/AE-SIPE/MSA on the {args.profile} profile start from ImageNet ResNet-50 weights: "
                     "give --seed_weights resnet50-19c8e357.pth")
    if args.profile in ("voc12", "coco14") and args.method == "msa_sal" and not args.sal_dir and not args.dry_run:
        parser.error(f"msa_sal on the {args.profile} profile reads saliency maps: give --sal_dir (PoolNet's PNGs)")
    return args


# network/methods.py's entries, METHODS then MSA_METHODS (kept here: no torch import).
SEED_METHODS = ("avc", "seam", "sipe", "ae_sipe", "msa", "msa_sal")
OWN_BACKGROUND_METHODS = ("sipe", "ae_sipe")  # also the names of their IRN variants
RESNET50_METHODS = ("sipe", "ae_sipe", "msa", "msa_sal")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.method != "all":
        return run_method(args, args.method, args.work_dir, args.results_dir)
    data_root = args.voc12_root or args.coco_root or os.path.join(args.work_dir, "data")
    methods = methods_for_all(args)
    for method in methods:
        print(f"\n######## seed method {method}", flush=True)
        code = run_method(args, method, os.path.join(args.work_dir, method),
                          os.path.join(args.results_dir, method), data_root)
        if code:
            return code
    if not args.dry_run:
        print("\n" + write_comparison(args.results_dir, methods))
    return 0


def methods_for_all(args: argparse.Namespace) -> tuple[str, ...]:
    """``--method all``: every seed method; msa_sal only where it has saliency maps (``--sal_dir``, or
    the stand-ins the synthetic and small profiles generate)."""
    if args.profile in ("voc12", "coco14") and not args.sal_dir:
        print("--method all: msa_sal left out (no --sal_dir saliency maps on this profile)")
        return tuple(m for m in SEED_METHODS if m != "msa_sal")
    return SEED_METHODS


def write_comparison(results_dir: str, methods: Sequence[str]) -> str:
    """``comparison.md`` / ``.json``: each method's summary rows side by side (same data, same evaluation)."""
    summaries = {m: read_json_if_present(os.path.join(results_dir, m, "summary.json")) for m in methods}
    # Row order of the fullest summary (SIPE's has the own-background seed row after "Seed").
    fullest = max(summaries.values(), key=lambda summary: len((summary or {}).get("rows", [])))
    rows = [row["row"] for row in (fullest or {}).get("rows", [])]

    def cell(method: str, row_name: str) -> str:
        row = next((r for r in (summaries[method] or {}).get("rows", []) if r["row"] == row_name), None)
        if row is None or row["miou"] is None:
            return "-"
        threshold = f" (bg {row['bg_threshold']:.2f})" if row.get("bg_threshold") is not None else ""
        return f"{row['miou']:.1f}{threshold}"

    lines = ["# Seed methods compared (mIoU %, same data and evaluation)", "",
             "| | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    cells = {name: [cell(m, name) for m in methods] for name in rows}
    lines += [f"| {name} | " + " | ".join(cells[name]) + " |" for name in rows
              if any(value != "-" for value in cells[name])]  # stages not run (--until) leave no row
    # A method whose results carry notes (msa_sal: pixel-supervised saliency maps) says so under the table.
    notes = [f"- {m}: {note}" for m in methods for note in (summaries[m] or {}).get("notes", ())]
    text = "\n".join(lines + ([""] + notes if notes else [])) + "\n"
    os.makedirs(results_dir, exist_ok=True)
    atomic_write_text(os.path.join(results_dir, "comparison.md"), text)
    atomic_write_text(os.path.join(results_dir, "comparison.json"), json.dumps(summaries, indent=2))
    return text


def run_method(args: argparse.Namespace, method: str, work_dir: str, results_dir: str,
               data_root: str | None = None) -> int:
    """The stages of one seed method; 0 on success."""
    data_root = data_root or args.voc12_root or args.coco_root or os.path.join(work_dir, "data")
    profile = profile_for_root(args.profile, data_root)
    # SIPE / AE-SIPE refine with IRN, reading their own background (the published workflow).
    refine = args.refine or ("irn" if method in OWN_BACKGROUND_METHODS else "affinitynet")
    if args.seed_epochs:
        for section in ("train_avc", "train_sipe", "train_msa"):
            profile[section] = {**profile[section], "max_epoches": args.seed_epochs}
    ctx = Context(args.profile, profile, Paths.under(os.path.abspath(work_dir), os.path.abspath(data_root),
                                       os.path.abspath(results_dir)),
                  imagenet_weights=args.weights and os.path.abspath(args.weights), method=method,
                  seed_imagenet_weights=args.seed_weights and os.path.abspath(args.seed_weights),
                  segmenter=get_segmenter(args.segmenter).name, segmenter_title=get_segmenter(args.segmenter).title,
                  segmenter_weights=args.segmenter_weights and os.path.abspath(args.segmenter_weights),
                  refine=refine, irn_variant=method if refine == "irn" and method in OWN_BACKGROUND_METHODS else "irn",
                  irn_weights=args.irn_weights and os.path.abspath(args.irn_weights),
                  sal_dir=args.sal_dir and os.path.abspath(args.sal_dir))
    stages = build_stages(ctx)
    names = [stage.name for stage in stages]
    if args.until:
        if args.until not in names:
            raise DataError(f"unknown stage {args.until!r}; the stages are: {', '.join(names)}")
        stages = stages[:names.index(args.until) + 1]
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
    from workflow.datasets import get_dataset_info
    from workflow.report import collect_results, write_page, write_summary

    paths = ctx.paths
    markers = [marker for marker in (stage_done(ctx, stage) for stage in stages) if marker]
    summary = collect_results(paths.eval, os.path.join(paths.seed_curve, "curve.json"), markers, ctx.profile_name,
                              {"train": ctx.profile["eval_list"], "val": ctx.profile["val_list"]}, ctx.method,
                              segmenter_row(ctx), result_notes(ctx))
    os.makedirs(paths.results_dir, exist_ok=True)
    text = write_summary(summary, paths.results_dir)
    samples = os.path.join(paths.lists, "samples.txt")
    if os.path.isfile(samples):
        info = get_dataset_info(ctx.profile["dataset"], paths.data_root)
        page = write_page(paths.results_dir, info, read_id_list(samples), paths.cam, ctx.best_threshold(),
                          {"CRF": paths.crf_masks, "random walk": paths.rw_masks, "IRN": paths.irn_masks,
                           "DeepLab": paths.deeplab_samples},
                          summary, os.path.join(paths.seed_curve, "curve.png"))
        text += f"\nPage: {page}\n"
    return text + f"Summary: {os.path.join(paths.results_dir, 'summary.md')}\n"


def segmenter_row(ctx: Context) -> str:
    """The segmentation row's label: which network, and its init as the training recorded it."""
    config = read_json_if_present(os.path.join(ctx.paths.checkpoints, f"{ctx.deeplab_session}_config.json")) or {}
    masks = f" on the {ctx.deeplab_masks.upper()} masks" if ctx.deeplab_masks != ctx.refine else ""
    return f"{ctx.segmenter_title}{masks} (init: {config.get('init_description', 'not recorded')})"


if __name__ == "__main__":
    run_cli(main)
