"""Stage 3a: CRF pseudo masks from CAM dicts (dense CRF over [background, CAMs] -> palette PNG).

For each image: background = (1 - max CAM)^alpha, dense CRF over [background, CAMs] on the
RGB image, label = argmax of the marginals (0 = background, c + 1 = class c), written as
``<out_dir>/<id>.png``. Existing PNGs are skipped, so an interrupted run resumes.

Background alpha: by default it is derived from ``--bg_threshold`` (default 0.26, SEAM's
seed threshold) as alpha = ln(t) / ln(1 - t) = 4.47, the alpha for which the pre-CRF
argmax over [(1 - m)^alpha, CAMs] equals the seed's argmax over [t, CAMs]. The CRF then
only moves boundaries, so "+CRF" refines the seed rather than re-thresholding it. Give
the best threshold of the evaluation curve, or an explicit ``--bg_alpha``.

    python refine_mask.py --voc12_root VOC2012 --cam_dir out/cam --out_dir out/crf_mask --list train.txt
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
from typing import Sequence

from tqdm import tqdm

from tool.cam import SEAM_SEED_BG_THRESHOLD, alpha_for_threshold
from tool.cli import add_dataset_args, add_overwrite_arg, add_parallel_args, positive_int, run_cli
from tool.contract import crf_dir
from tool.crf import SEED_CRF, CrfParams, crf_label, write_crf_dicts
from tool.datasets import DatasetInfo
from tool.fileio import (IMAGE_CHECK_CACHE, DataError, check_images_decode, load_score_dict, pending_ids,
                         read_id_list, read_rgb_image, require_files, save_palette_png)
from tool.logs import config_dict, setup_logging
from tool.outputs import OutputRecord
from tool.parallel import plan_workers, run_in_flight
from workflow.datasets import DATASET_NAMES, get_dataset_info

logger = logging.getLogger("refine_mask")


@dataclasses.dataclass(frozen=True)
class RefineJob:
    """The files of one image."""

    image_id: str
    image_path: str
    cam_path: str
    out_path: str
    out_crf: str | None = None   # prefix of the CRF dict folders (``--out_crf``), or None


@dataclasses.dataclass(frozen=True)
class RefineSettings:
    num_classes: int
    bg_alpha: float
    crf: CrfParams = SEED_CRF
    crf_alphas: tuple[float, ...] = ()  # alphas of the CRF dicts written beside the mask


def refine_image(job: RefineJob, settings: RefineSettings) -> str:
    """Read the image and CAM dict, run the CRF and write the palette PNG; returns the image id."""
    image = read_rgb_image(job.image_path)
    cam_dict = load_score_dict(job.cam_path, settings.num_classes)
    first_cam = next(iter(cam_dict.values()), None)  # load_score_dict checked that all sizes agree
    if first_cam is not None and first_cam.shape != image.shape[:2]:
        raise DataError(f"{job.cam_path}: CAM size {first_cam.shape[0]}x{first_cam.shape[1]} does not "
                        f"match image {job.image_path} ({image.shape[0]}x{image.shape[1]})")
    save_palette_png(job.out_path, crf_label(image, cam_dict, settings.bg_alpha, settings.crf))
    if job.out_crf and settings.crf_alphas:
        write_crf_dicts(image, cam_dict, job.image_id, job.out_crf, settings.crf_alphas, settings.crf)
    return job.image_id


def refine_all(jobs: Sequence[RefineJob], settings: RefineSettings, threads: int | None = None) -> None:
    """Refine every job, one image in flight per core (``tool.parallel``), with a progress bar."""
    work = functools.partial(refine_image, settings=settings)
    for _ in tqdm(run_in_flight(work, jobs, plan_workers(threads, len(jobs))), total=len(jobs),
                  desc="refine_mask", unit="img"):
        pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--cam_dir", required=True, help="folder of CAM dicts <id>.npy")
    parser.add_argument("--out_dir", required=True, help="folder for the pseudo-mask PNGs")
    add_dataset_args(parser, DATASET_NAMES)
    parser.add_argument("--list", "--infer_list", dest="list", default=None,
                        help="image id list; none: the dataset's train list")
    parser.add_argument("--bg_threshold", type=float, default=SEAM_SEED_BG_THRESHOLD,
                        help="seed background threshold the default alpha is derived from")
    parser.add_argument("--bg_alpha", type=float, default=None,
                        help="background = (1 - max CAM)^alpha; none: ln(t)/ln(1-t) of --bg_threshold")
    parser.add_argument("--out_crf", default=None,
                        help="also write CRF dicts <out_crf>_<alpha>/<id>.npy (AffinityNet's la/ha labels, "
                             "as infer_seed.py --out_crf) for each --crf_alpha")
    parser.add_argument("--crf_alphas", type=float, nargs="+", default=(),
                        help="background exponents of the --out_crf dicts")
    parser.add_argument("--num_workers", type=positive_int, default=None,
                        help="CRF processes (1: in this process; default: --threads)")
    add_parallel_args(parser, batching=False)
    add_overwrite_arg(parser)
    crf = parser.add_argument_group("dense CRF (defaults: SEAM's seed CRF)")
    crf.add_argument("--crf_iters", type=int, default=SEED_CRF.iterations, help="mean-field iterations")
    crf.add_argument("--crf_gauss_sxy", type=float, default=SEED_CRF.gauss_sxy,
                     help="Gaussian kernel position scale")
    crf.add_argument("--crf_gauss_compat", type=float, default=SEED_CRF.gauss_compat,
                     help="Gaussian kernel weight")
    crf.add_argument("--crf_bilateral_sxy", type=float, default=SEED_CRF.bilateral_sxy,
                     help="bilateral kernel position scale")
    crf.add_argument("--crf_bilateral_srgb", type=float, default=SEED_CRF.bilateral_srgb,
                     help="bilateral kernel colour scale")
    crf.add_argument("--crf_bilateral_compat", type=float, default=SEED_CRF.bilateral_compat,
                     help="bilateral kernel weight")
    return parser


def resolve_settings(args: argparse.Namespace, num_classes: int) -> RefineSettings:
    """Settings from the flags; invalid values raise DataError."""
    if args.bg_alpha is None:
        if not 0.0 < args.bg_threshold < 1.0:
            raise DataError(f"--bg_threshold must be in (0, 1), got {args.bg_threshold}")
        args.bg_alpha = alpha_for_threshold(args.bg_threshold)
    if args.bg_alpha <= 0:
        raise DataError(f"--bg_alpha must be positive, got {args.bg_alpha}")
    if args.crf_iters < 1:
        raise DataError(f"--crf_iters must be at least 1, got {args.crf_iters}")
    crf = CrfParams(iterations=args.crf_iters, gauss_sxy=args.crf_gauss_sxy, gauss_compat=args.crf_gauss_compat,
                    bilateral_sxy=args.crf_bilateral_sxy, bilateral_srgb=args.crf_bilateral_srgb,
                    bilateral_compat=args.crf_bilateral_compat)
    alphas = tuple(args.crf_alphas)
    if any(alpha <= 0 for alpha in alphas):
        raise DataError(f"CRF dict alphas must be positive, got {alphas}")
    if bool(alphas) != bool(args.out_crf):
        raise DataError("--out_crf and --crf_alphas go together")
    return RefineSettings(num_classes=num_classes, bg_alpha=args.bg_alpha, crf=crf, crf_alphas=alphas)


def job_outputs(image_id: str, out_dir: str, out_crf: str | None = None,
                crf_alphas: Sequence[float] = ()) -> list[str]:
    """The files one image's job writes: the mask PNG, and a CRF dict per alpha."""
    dicts = [os.path.join(crf_dir(out_crf, alpha), f"{image_id}.npy") for alpha in crf_alphas] if out_crf else []
    return [os.path.join(out_dir, image_id + ".png"), *dicts]


def plan_jobs(image_ids: Sequence[str], dataset_info: DatasetInfo, cam_dir: str,
              out_dir: str, out_crf: str | None = None,
              crf_alphas: Sequence[float] = ()) -> tuple[list[RefineJob], int]:
    """Jobs for the images whose outputs are not all written yet, and how many were skipped;
    inputs must exist."""
    todo = pending_ids(dict.fromkeys(image_ids), lambda image_id: job_outputs(image_id, out_dir, out_crf, crf_alphas))
    jobs = [RefineJob(image_id, dataset_info.image_path(image_id), os.path.join(cam_dir, image_id + ".npy"),
                      os.path.join(out_dir, image_id + ".png"), out_crf) for image_id in todo]
    require_files([job.cam_path for job in jobs], "CAM dicts", cam_dir)
    require_files([job.image_path for job in jobs], "images", dataset_info.root)
    check_images_decode([job.image_path for job in jobs], os.path.join(dataset_info.root, IMAGE_CHECK_CACHE))
    return jobs, len(set(image_ids)) - len(todo)


def run(args: argparse.Namespace) -> None:
    info = get_dataset_info(args.dataset, args.voc12_root)
    image_ids = read_id_list(args.list) if args.list else info.read_list("train")
    settings = resolve_settings(args, info.num_classes)
    logger.info("configuration: %s", config_dict(args))
    def outputs(image_id: str) -> list[str]:
        return job_outputs(image_id, args.out_dir, args.out_crf, settings.crf_alphas)
    OutputRecord("refine_mask", args, outputs).start(image_ids)
    jobs, skipped = plan_jobs(image_ids, info, args.cam_dir, args.out_dir, args.out_crf, settings.crf_alphas)
    logger.info("%d images in the list, %d already done, %d to refine (alpha %.4g%s)",
                len(set(image_ids)), skipped, len(jobs), settings.bg_alpha,
                f"; CRF dicts at alphas {', '.join(map(str, settings.crf_alphas))}" if settings.crf_alphas else "")
    os.makedirs(args.out_dir, exist_ok=True)
    refine_all(jobs, settings, args.num_workers or args.threads)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging()
    run(args)


if __name__ == "__main__":
    run_cli(main)
