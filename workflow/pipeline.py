"""The whole workflow as a list of stages, each one real stage script run as its own process.

A stage is a name, a command built from the run's configuration and the results of earlier
stages (the best background threshold, say), and a marker file written when it succeeds, so an
interrupted run resumes at the first unfinished stage. The commands are exactly what a user
would type; they are printed so they can be copied.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from tool.cam import alpha_for_threshold
from tool.contract import HIGH_ALPHA, LOW_ALPHA, crf_dir
from tool.fileio import DataError, atomic_write_text, read_id_list, read_json_if_present
from voc12.layout import CLASS_NAMES_FILE

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- configuration
# Flags of each stage per profile. 'small' is the CPU-sized configuration (2 cores, one thread a
# stage), for any small dataset in the VOC layout given with --voc12_root; 'synthetic', the
# embedded default, is the same configuration on the generated dataset. 'voc12' and 'coco14' are
# the published configurations (DESIGN.md), for a GPU machine.
SMALL_PROFILE: dict[str, Any] = {
    # None: the dataset type follows the root (see profile_for_root).
    "dataset": None,
    "train_list": "train", "eval_list": "train", "val_list": "val",
    # No ImageNet weights here: the classifier trains from scratch, and AffinityNet and DeepLab
    # start from its backbone (trained on the same images).
    "backbone_from_avc": True,
    # One compute thread a training stage: on 2 shared cores, 2 torch threads beside the data workers
    # thrash. The inference stages (PARALLEL_STAGES) keep one image in flight per core instead.
    "torch_threads": 1,
    "width_mult": 0.125, "num_workers": 1, "sample_images": 8,
    # Dropping whole channels of an 8..512-channel network stalls learning from scratch; the second
    # view is 0.5 (not 0.3) of a 112-pixel crop so its CAM grid is not a handful of cells.
    # lr 0.005 (new layers 10x: 0.05), measured by the seed mIoU (best of the curve) after these 25
    # epochs, training seeds 0 / 1 on the synthetic default: lr 0.02 36.2 / 21.2, 0.01 45.1 / 45.6,
    # 0.005 56.0 / 45.6 (0.05: 24.3, 0.0025: 51.3, seed 0); on a second set (8 classes, generator
    # seed 1), seed 0: 22.3 / 27.4 / 30.5. At 0.02 the cls loss ends at 0.40-0.42, at 0.005 at 0.36-0.37.
    "train_avc": {"batch_size": 8, "max_epoches": 25, "lr": 0.005, "momentum": 0.9, "crop_size": 112,
                  "resize_long": (112, 144), "flags": ("--view_scale", "0.5", "--no-dropout")},
    "infer_seed": {"scales": (0.5, 1.0, 1.5, 2.0)},
    # SIPE / AE-SIPE (--method sipe|ae_sipe): from scratch at this width the reference's lr 0.1 with
    # momentum 1e-4 does not learn; SGD momentum 0.9 at lr 0.02 as for AVC. SIPE's scales.
    "train_sipe": {"batch_size": 8, "max_epoches": 25, "lr": 0.02, "momentum": 0.9, "crop_size": 112,
                   "resize_long": (112, 144)},
    "infer_sipe": {"scales": (1.0, 0.5, 1.5, 2.0)},
    # MSA (--method msa|msa_sal): the shortened schedules of the README's measured CPU runs. The
    # superpixel FCN (Adam, constant lr) at width 0.25, lr 5e-4 for 12 epochs of 200 images (the
    # published 5e-5 runs 50 epochs of 10582); the classifier as SIPE's section (SGD momentum 0.9 at
    # lr 0.02, Nesterov as the reference), 16 epochs.
    "train_scn": {"batch_size": 8, "max_epoches": 12, "lr": 5e-4, "crop_size": 112, "resize_long": (72, 144),
                  "width_mult": 0.25},
    "train_msa": {"batch_size": 8, "max_epoches": 16, "lr": 0.02, "momentum": 0.9, "crop_size": 112,
                  "resize_long": (112, 144)},
    # Seeds without AP (ap_steps 0; the reference's 8 steps at 0.6 stay in the voc12 profile and in
    # training). Measured without ground truth (python -m bench.msa_affinity: images and image labels
    # only, 20 train images, this profile's checkpoints after 16 / 6 epochs): 90 / 92 % of the scratch
    # width-0.125 network's layer-3 cosine affinities are >= 0.6 (median 0.79 / 0.84), so each AP
    # step averages a CAM over most of the grid; after 8 steps a CAM that fires is >= half its peak
    # on 97 / 100 % of the image (26 / 28 % without AP): the propagated CAMs no longer locate objects.
    "infer_msa": {"scales": (0.5, 1.0, 1.5, 2.0), "ap_steps": 0, "ap_threshold": 0.6},
    "train_aff": {"batch_size": 8, "max_epoches": 8, "lr": 0.02, "momentum": 0.9, "crop_size": 112},
    # AffinityNet's la/ha labels at (1, 6) x the seed's own alpha (from the best threshold), written
    # by refine_mask, instead of VOC's fixed 4 / 24. VOC's la 4 is about the alpha of its seed
    # threshold (0.26 -> 4.47), so la foreground = seed foreground; here the threshold is 0.47
    # (alpha 1.19) and la 4 labels CAM > 0.28 as foreground: measured on train (a diagnostic
    # against the ground truth, not a selection), 18.5 % of the pixels at 55.6 % correct, against
    # 9.7 % at 82.1 % with la 1.2, and ha 7.1 labels 70.6 % of the pixels background (92.8 %
    # correct) where ha 24 labelled 32.8 %. Random-walk mask 38.9 -> 39.6.
    "aff_crf_alphas": (1.0, 6.0),
    # Background exponent of the random walk: the one that reproduces the best seed threshold.
    # The walk runs 2^logt steps; VOC's logt 8 is for a 56 x 56 grid, this 14 x 14 grid has a
    # sixteenth of the pixels, so 2^4 steps spread as far (logt 6 and 8 blur objects into each
    # other). SEAM's --crf (one mean-field step) then snaps the walk to the image edges.
    # walk_from crf: the walk propagates the seeds' dense-CRF marginals (the la dicts above) rather
    # than the raw CAMs with (1 - max CAM)^alpha: pooled to the 14 x 14 grid, the raw CAMs of small
    # or weakly activated objects lose to the background before the walk starts, while the CRF has
    # already snapped them to the image at full resolution. Mask 39.6 -> 41.4 (logt 2 / 3 from the
    # CAMs: 40.1 / 39.9).
    "infer_aff": {"alpha_from_threshold": True, "beta": 8, "logt": 4, "walk_from": "crf", "flags": ("--crf",)},
    # IRN: its backbone is ResNet-50 (AVC's ResNet38 cannot start it), so without ImageNet weights it
    # stays random and frozen, as the reference freezes it. 2^8 steps on VOC's ~94 x 125 grid; this
    # 28 x 28 grid has 1/15 of the nodes, so 2^4 steps spread as far (the infer_aff reasoning).
    "train_irn": {"batch_size": 8, "max_epoches": 3, "lr": 0.1, "momentum": 1e-4, "crop_size": 112},
    "make_seg_labels": {"beta": 10, "logt": 4, "crop_size": 112},
    # DeepLab trains on the CRF masks, not the random-walk masks: measured on the synthetic default
    # (seed 36.3, +CRF 44.1, walk 41.4 on train), the same recipe gives 33.2 on val on the CRF masks
    # and 27.6 on the walk's (of the earlier recipe, 38.9 on train): the walk at this 14 x 14 grid
    # still loses small and weakly activated objects the full-resolution CRF keeps. The walk's row
    # stays in the table. None: DeepLab trains on the refinement's masks (--refine).
    "deeplab_masks": "crf",
    # BN momentum 0.1, not DeepLab's 0.0003: a short run must move the new heads' statistics.
    # lr is the published 0.001: at 0.01 the head collapses to all-background.
    "train_deeplab": {"batch_size": 8, "max_iters": 500, "lr": 0.001, "crop_size": 112,
                      "flags": ("--bn_momentum", "0.1")},
    # DeepLabV2 (--segmenter deeplabv2_resnet101) from scratch at width 0.125: batch 2 x 2, lr
    # 0.002 (at 0.01 the summed ASPP logits blow up), BatchNorm trains (momentum 0.1).
    "train_deeplabv2": {"batch_size": 4, "iter_size": 2, "max_iters": 200, "lr": 0.002, "crop_size": 112},
    # One scale: on 112-pixel images the 0.75 view's 11 x 11 grid costs more than fusion gains
    # (measured on val: 1.0 alone 27.6, 0.75/1.0/1.25 24.7, both with the CRF).
    "test_deeplab": {"scales": (1.0,)},
    "test_deeplabv2": {"scales": (1.0,)},
    # DeepLab trained with the same recipe on the ground truth: the fully supervised bound of the table.
    "deeplab_on_gt": True,
}
PROFILES: dict[str, dict[str, Any]] = {
    "small": SMALL_PROFILE,
    "synthetic": {
        **SMALL_PROFILE,
        "dataset": "synthetic",
        "synthetic": {"num_train": 200, "num_val": 50, "image_size": 112, "num_classes": 6, "seed": 0},
    },
    "voc12": {
        "dataset": "voc12",
        "train_list": "train_aug", "eval_list": "train", "val_list": "val",
        "backbone_from_avc": False,  # every network starts from the ImageNet weights (--weights)
        "torch_threads": None,
        "width_mult": 1.0, "num_workers": 8, "sample_images": 12,
        "train_avc": {"batch_size": 8, "max_epoches": 8, "lr": 0.01, "momentum": 0.0, "crop_size": 448,
                      "resize_long": (448, 768)},
        "infer_seed": {"scales": (0.5, 1.0, 1.5, 2.0)},
        # The reference schedule (network/methods.py: effective momentum 1e-4, clip 1.0).
        "train_sipe": {"batch_size": 16, "max_epoches": 5, "lr": 0.1, "momentum": 1e-4, "crop_size": 512,
                       "resize_long": (320, 640)},
        "infer_sipe": {"scales": (1.0, 0.5, 1.5, 2.0)},
        # MSA's published schedules (train_scn.py / train_msa.py: Adam 5e-5; Nesterov SGD whose
        # momentum is the reference's 4e-5) and its evaluator: AP 8 steps at 0.6.
        "train_scn": {"batch_size": 16, "max_epoches": 50, "lr": 5e-5, "crop_size": 512, "resize_long": (320, 640)},
        "train_msa": {"batch_size": 16, "max_epoches": 12, "lr": 0.1, "momentum": 4e-5, "crop_size": 480,
                      "resize_long": (320, 640)},
        "infer_msa": {"scales": (0.5, 1.0, 1.5, 2.0), "ap_steps": 8, "ap_threshold": 0.6},
        "train_aff": {"batch_size": 8, "max_epoches": 8, "lr": 0.1, "momentum": 0.0, "crop_size": 448},
        "infer_aff": {"alpha": 6.0, "beta": 8, "logt": 8},
        "train_irn": {"batch_size": 32, "max_epoches": 3, "lr": 0.1, "momentum": 1e-4, "crop_size": 512},
        "make_seg_labels": {"beta": 10, "logt": 8, "crop_size": 512},
        "train_deeplab": {"batch_size": 10, "max_iters": 20000, "lr": 0.001, "crop_size": 448},
        "test_deeplab": {"scales": (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)},
        # The published DeepLabV2 schedule (its MSC 1, 0.5, 0.75 runs inside the network).
        "train_deeplabv2": {"batch_size": 10, "iter_size": 2, "max_iters": 20000, "lr": 2.5e-4, "crop_size": 321},
        "test_deeplabv2": {"scales": (1.0,)},
        # A second 20k-iteration DeepLab run on the ground truth would double the GPU time.
        "deeplab_on_gt": False,
    },
}
PROFILES["coco14"] = {**PROFILES["voc12"], "dataset": "coco14", "train_list": "train", "eval_list": "train"}
# A one-minute version of the synthetic run for the end-to-end test (CI). Measured (train baseline
# 19.9, val 19.3): AffinityNet's 8 epochs are the synthetic profile's (3 steps an epoch here, +1 s):
# after 1 epoch its affinities scramble the walk (mask 9.8, no walk 24.2), after 8 the mask is 25.4.
# DeepLab: 80 steps at lr 0.01 (+20 s a run): 4 steps at 0.001 stay at the all-background plateau
# (loss 0.59, val 19.3 on the ground truth), 80 steps at 0.01 reach 57.4 on the ground truth.
PROFILES["tiny"] = {
    **PROFILES["synthetic"],
    "synthetic": {"num_train": 24, "num_val": 8, "image_size": 64, "num_classes": 3, "seed": 0},
    "num_workers": 0, "sample_images": 3,
    "train_avc": {**PROFILES["synthetic"]["train_avc"], "max_epoches": 1, "crop_size": 64, "resize_long": (64, 72)},
    "infer_seed": {"scales": (1.0, 1.5)},
    "train_sipe": {**PROFILES["synthetic"]["train_sipe"], "max_epoches": 1, "crop_size": 64, "resize_long": (64, 72)},
    "infer_sipe": {"scales": (1.0, 1.5)},
    "train_scn": {**PROFILES["synthetic"]["train_scn"], "max_epoches": 1, "crop_size": 64, "resize_long": (64, 72)},
    "train_msa": {**PROFILES["synthetic"]["train_msa"], "max_epoches": 1, "crop_size": 64, "resize_long": (64, 72)},
    "infer_msa": {**PROFILES["synthetic"]["infer_msa"], "scales": (1.0,)},
    "train_aff": {**PROFILES["synthetic"]["train_aff"], "crop_size": 64},
    "train_irn": {**PROFILES["synthetic"]["train_irn"], "max_epoches": 1, "crop_size": 80},
    "make_seg_labels": {**PROFILES["synthetic"]["make_seg_labels"], "crop_size": 80},
    "train_deeplab": {**PROFILES["synthetic"]["train_deeplab"], "max_iters": 80, "lr": 0.01, "crop_size": 64},
    "train_deeplabv2": {**PROFILES["synthetic"]["train_deeplabv2"], "max_iters": 4, "crop_size": 64},
    "test_deeplab": {"scales": (1.0,)},
}


# Stages that spread their images over the cores themselves (tool/parallel.py: workers and torch
# threads from os.sched_getaffinity), so the profile's torch_threads does not apply to them.
PARALLEL_STAGES = frozenset({"infer_seed", "refine_mask", "infer_aff", "make_ir_labels", "make_seg_labels",
                             "test_deeplab", "test_deeplab_samples", "test_deeplab_gt"})

# How the seeds become DeepLab's pseudo masks: the CRF masks, AffinityNet's random walk, or IRN's
# boundary random walk (SIPE / AE-SIPE).
REFINEMENTS = ("crf", "affinitynet", "irn")


def profile_for_root(name: str, data_root: str) -> dict[str, Any]:
    """The profile ``name`` with its dataset type settled for ``data_root``.

    The small profile runs on any VOC-layout root: one with its own ``class_names.txt``
    (background first, as the generator writes it) is read with those classes (the registry's
    'synthetic' entry), one without with the 20 VOC classes.
    """
    profile = dict(PROFILES[name])
    if profile["dataset"] is None:
        has_names = os.path.isfile(os.path.join(data_root, CLASS_NAMES_FILE))
        profile["dataset"] = "synthetic" if has_names else "voc12"
    return profile

@dataclass(frozen=True)
class Paths:
    """Where every stage of one run reads and writes."""

    work_dir: str
    data_root: str
    results_dir: str
    checkpoints: str
    cam: str            # CAM dicts
    cam_bg: str         # one-based CAM dicts with the method's own background (SIPE / AE-SIPE)
    seed_png: str       # seed label maps
    crf: str            # prefix of the low/high-alpha CRF dict folders
    seed_curve: str     # evaluation curve of the seeds
    crf_masks: str
    aff_crf: str        # prefix of the la/ha CRF dict folders refine_mask writes (profile aff_crf_alphas)
    rw_masks: str
    saliency: str       # msa_sal: generated saliency stand-ins
    ir_labels: str      # IRN's confident regions
    irn_masks: str
    deeplab_val: str
    deeplab_gt_val: str  # predictions of the DeepLab trained on the ground truth
    deeplab_samples: str
    eval: str           # one JSON of results per evaluation
    stages: str         # one marker per finished stage
    lists: str

    @classmethod
    def under(cls, work_dir: str, data_root: str, results_dir: str) -> "Paths":
        def sub(relative: str) -> str:
            return os.path.join(work_dir, relative)
        return cls(work_dir=work_dir, data_root=data_root, results_dir=results_dir,
                   checkpoints=sub("checkpoints"), cam=sub("seed/cam"), cam_bg=sub("seed/cam_bg"), seed_png=sub("seed/seed_png"),
                   crf=sub("seed/crf"), seed_curve=sub("eval/seed_curve"), crf_masks=sub("masks/crf"),
                   saliency=sub("saliency_standin"), aff_crf=sub("masks/aff_crf/crf"),
                   rw_masks=sub("masks/rw"), ir_labels=sub("masks/ir_label"), irn_masks=sub("masks/irn"),
                   deeplab_val=sub("deeplab/val"), deeplab_gt_val=sub("deeplab_gt/val"),
                   deeplab_samples=sub("deeplab/samples"), eval=sub("eval"), stages=sub("stages"),
                   lists=sub("lists"))


@dataclass
class Stage:
    """One step: ``command(context)`` is the argv (script first) run with the project's Python.

    ``outputs`` are the files and folders a forced rerun (``--from`` / ``--only``) removes first:
    the stage scripts skip finished images and resume finished training, so without this a
    rerun would keep the old results.
    """

    name: str
    command: Callable[["Context"], list[str]]
    description: str = ""
    outputs: tuple[str, ...] = ()
    # The stages whose outputs this one reads (None: every earlier stage). Its fingerprint covers
    # those stages' markers only, so it can start before the stages listed between them and it.
    needs: tuple[str, ...] | None = None
    # Start this stage in the background when stage ``beside`` starts (both on one compute thread:
    # the second core of a 2-core machine is idle during a one-thread training); needs ``needs``.
    beside: str | None = None


@dataclass
class Context:
    profile_name: str
    profile: Mapping[str, Any]
    paths: Paths
    imagenet_weights: str | None = None   # ilsvrc-cls_rna-a1_cls1000_ep-0001.params
    refine: str = "affinitynet"           # how the seeds become pseudo masks: one of REFINEMENTS
    irn_weights: str | None = None        # ImageNet ResNet-50 (resnet50-19c8e357.pth) for IRN's backbone
    irn_variant: str = "irn"              # IR-label / background rule of IRN (sipe, ae_sipe: their own)
    results: dict[str, Any] = field(default_factory=dict)
    method: str = "avc"                   # the seed method (network/methods.py)
    seed_imagenet_weights: str | None = None  # ImageNet file of a non-ResNet38 seed backbone (resnet50-19c8e357.pth)
    sal_dir: str | None = None  # msa_sal: the saliency PNGs (PoolNet's); None = stand-ins (synthetic, small)

    @property
    def seed_method(self):
        from network.methods import get_seed_method  # imported here: the dry run and the report need no torch
        return get_seed_method(self.method)

    @property
    def seed_session(self) -> str:
        """The seed classifier's checkpoint name: ``avc`` for AVC (as before), else the method's name."""
        return self.method

    @property
    def seed_on_resnet38(self) -> bool:
        return self.seed_method.backbones[0] == "resnet38"

    @property
    def seed_family(self) -> str:
        """'avc' (ResNet38: AVC, SEAM), 'sipe' (SIPE, AE-SIPE) or 'msa' (MSA, MSA-saliency)."""
        return {"seam": "avc", "sipe": "sipe", "msa": "msa"}[self.seed_method.fusion]

    @property
    def own_background(self) -> bool:
        """The seed method has its own background channel (SIPE / AE-SIPE's seed PNGs, IRN variants)."""
        return self.seed_family == "sipe"

    @property
    def msa_saliency(self) -> bool:
        return self.seed_family == "msa" and self.seed_method.variant == "saliency"
    # Stages 4-5: a name of network.segmenters.SEGMENTERS, and its start (DeepLabV2: the COCO
    # or torchvision ResNet-101 file; None = DeepLabV1's usual start, or DeepLabV2 from scratch).
    segmenter: str = "deeplabv1_resnet38"
    segmenter_title: str = "DeepLabV1-ResNet38"
    segmenter_weights: str | None = None

    @property
    def deeplab_masks(self) -> str:
        """Which masks DeepLab trains on: the profile's ``deeplab_masks`` (the CRF masks) for the
        AffinityNet refinement, else the refinement's own masks."""
        chosen = self.profile.get("deeplab_masks")
        return chosen if chosen and self.refine == "affinitynet" else self.refine

    @property
    def is_deeplabv2(self) -> bool:
        return self.segmenter == "deeplabv2_resnet101"

    @property
    def deeplab_session(self) -> str:
        """Checkpoint/config name of stage 4; one per network, so switching never resumes the other."""
        return "deeplabv2" if self.is_deeplabv2 else "deeplab"

    def segmenter_settings(self, stage: str) -> str:
        """Profile key of a DeepLab stage's settings (``train_deeplab`` -> ``train_deeplabv2``)."""
        return f"{stage}v2" if self.is_deeplabv2 else stage

    def eval_json(self, name: str) -> str:
        return os.path.join(self.paths.eval, f"{name}.json")

    def best_threshold(self) -> float:
        curve_path = os.path.join(self.paths.seed_curve, "curve.json")
        if not os.path.isfile(curve_path):
            raise DataError(f"{curve_path}: the seed curve is missing; run the stage 'eval_seed' first")
        with open(curve_path, encoding="utf-8") as handle:
            return float(json.load(handle)["best_threshold"])


def list_file(ctx: Context, split: str) -> str:
    return os.path.join(ctx.paths.data_root, f"{split}.txt")


def dataset_flags(ctx: Context) -> list[str]:
    return ["--dataset", ctx.profile["dataset"], "--voc12_root", ctx.paths.data_root]


def training_flags(ctx: Context, stage: str) -> list[str]:
    settings = ctx.profile[stage]
    flags = ["--batch_size", settings["batch_size"], "--lr", settings["lr"], "--crop_size", settings["crop_size"],
             "--width_mult", settings.get("width_mult", ctx.profile["width_mult"]),
             "--num_workers", ctx.profile["num_workers"],
             "--save_dir", ctx.paths.checkpoints, "--resume", "auto", *weights_flags(ctx, stage)]
    if "max_epoches" in settings:
        flags += ["--max_epoches", settings["max_epoches"]]
    if "momentum" in settings:
        flags += ["--momentum", settings["momentum"]]
    if "iter_size" in settings:
        flags += ["--iter_size", settings["iter_size"]]
    return flags + list(settings.get("flags", ()))


def weights_flags(ctx: Context, stage: str) -> list[str]:
    """``--weights`` of a training stage: ImageNet weights, else (synthetic) the seed classifier's
    ResNet38 backbone (AffinityNet and DeepLabV1 are ResNet38 networks: a SIPE seed classifier's
    ResNet-50 cannot start them, so they train from scratch there); DeepLabV2 has its own
    ResNet-101 start (``segmenter_weights``) or none (scratch); IRN's ResNet-50 takes its own
    ImageNet file (AVC's ResNet38 cannot start it)."""
    if stage == "train_irn":
        return ["--weights", ctx.irn_weights] if ctx.irn_weights else []
    if stage == "train_scn":  # the superpixel FCN always starts from scratch (the reference's does)
        return []
    if stage.startswith("train_deeplabv2"):
        return ["--weights", ctx.segmenter_weights] if ctx.segmenter_weights else []
    if stage in ("train_avc", "train_sipe", "train_msa") and not ctx.seed_on_resnet38:
        return ["--weights", ctx.seed_imagenet_weights] if ctx.seed_imagenet_weights else []
    if ctx.imagenet_weights:
        return ["--weights", ctx.imagenet_weights]
    if stage != "train_avc" and ctx.profile["backbone_from_avc"] and ctx.seed_on_resnet38:
        return ["--weights", os.path.join(ctx.paths.checkpoints, f"{ctx.seed_session}.pth")]
    return []


def irn_mask_flags(ctx: Context) -> list[str]:
    return [f"--{name}={value}" for name, value in ctx.profile["make_seg_labels"].items()]


def random_walk_flags(ctx: Context) -> list[str]:
    settings = dict(ctx.profile["infer_aff"])
    switches = list(settings.pop("flags", ()))
    if settings.pop("alpha_from_threshold", False) and settings.get("walk_from") != "crf":  # crf: no alpha
        settings["alpha"] = round(alpha_for_threshold(clamped_threshold(ctx)), 3)
    return [f"--{name}={value}" for name, value in settings.items()] + switches


def affinity_label_alphas(ctx: Context) -> tuple[float, float]:
    """The la/ha background exponents of AffinityNet's CRF dicts: the profile's ``aff_crf_alphas``
    multiples of the seed's alpha (refine_mask writes them), else VOC's fixed 4 / 24 (infer_seed)."""
    factors = ctx.profile.get("aff_crf_alphas")
    if not factors:
        return LOW_ALPHA, HIGH_ALPHA
    seed_alpha = alpha_for_threshold(float(f"{clamped_threshold(ctx):.2f}"))  # refine_mask's --bg_threshold
    low, high = (round(factor * seed_alpha, 1) for factor in factors)
    return low, high


def clamped_threshold(ctx: Context) -> float:
    """The best seed threshold, kept inside (0, 1) where the exponent ln(t)/ln(1-t) exists."""
    return min(max(ctx.best_threshold(), 0.01), 0.99)


def _strings(values: Sequence[Any]) -> list[str]:
    return [str(value) for value in values]


def build_stages(ctx: Context) -> list[Stage]:
    """The workflow of DESIGN.md, in order.

    Seeds and masks are made for the training list (VOC: train_aug) that AffinityNet and
    DeepLab learn from, and evaluated on the evaluation list (VOC: train, as published).
    """
    p, profile = ctx.paths, ctx.profile
    train_list = list_file(ctx, profile["train_list"])
    eval_list = list_file(ctx, profile["eval_list"])
    val_list = list_file(ctx, profile["val_list"])
    samples_list = os.path.join(p.lists, "samples.txt")
    method = ctx.seed_method
    avc_weights = os.path.join(p.checkpoints, f"{ctx.seed_session}.pth")  # the seed classifier, any method
    aff_weights = os.path.join(p.checkpoints, "aff.pth")
    irn_weights = os.path.join(p.checkpoints, "irn.pth")
    if ctx.refine not in REFINEMENTS:
        raise DataError(f"unknown refinement {ctx.refine!r}; expected one of {', '.join(REFINEMENTS)}")
    # DeepLab's training masks; the CRF masks then have to cover the training list too.
    pseudo_dir = {"crf": p.crf_masks, "affinitynet": p.rw_masks, "irn": p.irn_masks}[ctx.deeplab_masks]
    # AffinityNet's la/ha CRF dicts: from refine_mask at the seed's alpha (profile aff_crf_alphas),
    # else from infer_seed at VOC's fixed alphas.
    dicts_from_refine = ctx.refine == "affinitynet" and bool(profile.get("aff_crf_alphas"))
    aff_crf = p.aff_crf if dicts_from_refine else p.crf
    crf_list = train_list if ctx.deeplab_masks == "crf" or dicts_from_refine else eval_list
    walk_from_crf = profile["infer_aff"].get("walk_from") == "crf"
    # IRN's sipe / ae_sipe variants read the one-based dicts with the method's own background.
    irn_cams = p.cam if ctx.irn_variant == "irn" else p.cam_bg
    deeplab_weights = os.path.join(p.checkpoints, f"{ctx.deeplab_session}.pth")
    workers = str(profile["num_workers"])
    train_settings, test_settings = ctx.segmenter_settings("train_deeplab"), ctx.segmenter_settings("test_deeplab")

    def checkpoint_files(session: str) -> tuple[str, ...]:
        return tuple(os.path.join(p.checkpoints, f"{session}{suffix}")
                     for suffix in (".pth", "_last.pth", "_log.csv", "_val.csv"))

    def evaluate(name: str, predict_dir: str, image_list: str, *extra: str) -> list[str]:
        return ["evaluation.py", "--list", image_list, "--predict_dir", predict_dir, *dataset_flags(ctx),
                "--num_workers", workers, "--comment", name, "--out_json", ctx.eval_json(name), *extra]

    def deeplab_stages(name: str, session: str, label_flags: list[str], val_dir: str, trained_on: str,
                       needs: tuple[str, ...] | None = None, beside: str | None = None) -> list[Stage]:
        """Train the run's segmenter (labels: ``label_flags``, none = ground truth) as checkpoint
        ``session``, predict val, evaluate into ``<name>.json``; stages ``train_<name>`` ...
        (the training with ``needs`` and ``beside``, see Stage)."""
        weights = os.path.join(p.checkpoints, f"{session}.pth")
        return [
            Stage(f"train_{name}", lambda c: [
                "train_deeplab.py", *dataset_flags(c), "--arch", c.segmenter, "--train_list", train_list,
                *label_flags, "--session_name", session, *_strings(training_flags(c, train_settings)),
                "--max_iters", str(profile[train_settings]["max_iters"])],
                f"{ctx.segmenter_title} on {trained_on}", checkpoint_files(session), needs, beside),
            Stage(f"test_{name}", lambda c: [
                "test_deeplab.py", *dataset_flags(c), "--weights", weights, "--infer_list", val_list,
                "--out_dir", val_dir, "--scales", *_strings(profile[test_settings]["scales"]),
                "--num_workers", workers],
                f"predictions on val of DeepLab trained on {trained_on}", (val_dir,)),
            Stage(f"eval_{name}", lambda c: evaluate(name, val_dir, val_list, "--type", "png"),
                  f"val mIoU of DeepLab trained on {trained_on}", (ctx.eval_json(name),)),
        ]

    stages = []
    if "synthetic" in profile:  # the embedded default generates its data; 'small' reads the user's
        synthetic = profile["synthetic"]
        stages.append(Stage("generate", lambda c: [
            "-m", "voc12.synthetic", "--out", p.data_root, *(f"--{k}={v}" for k, v in synthetic.items())],
            "write the synthetic dataset in the VOC layout"))
    prepare_module = "coco14.prepare" if profile["dataset"] == "coco14" else "voc12.prepare"
    root_flag = "--coco_root" if profile["dataset"] == "coco14" else "--voc12_root"
    prepare = ["-m", prepare_module, root_flag, p.data_root]
    if profile["dataset"] == "synthetic":
        prepare += ["--dataset", "synthetic"]
    stages.append(Stage("prepare", lambda c: prepare, "image lists and cls_labels.npy"))
    if ctx.seed_family == "msa":
        stages += msa_input_stages(ctx, train_list, val_list, checkpoint_files)
    stages += [
        Stage("train_msa" if ctx.seed_family == "msa" else "train_avc", lambda c: seed_training_command(c, train_list),
              f"seed classifier ({method.name}: {method.summary})", checkpoint_files(ctx.seed_session)),
        Stage("infer_seed", lambda c: [
            "infer_seed.py", *dataset_flags(c), "--weights", avc_weights, "--infer_list", train_list,
            "--scales", *_strings(profile[seed_settings(c, "infer")]["scales"]), "--out_cam", p.cam,
            *([] if dicts_from_refine else ["--out_crf", p.crf]), "--out_cam_pred", p.seed_png, "--num_workers", workers,
            *(["--out_cam_bg", p.cam_bg] if c.own_background else []), *msa_inference_flags(c)],
            "CAM dicts, seed PNGs" + ("" if dicts_from_refine else ", low/high-alpha CRF dicts"),
            (p.cam, p.seed_png) + (() if dicts_from_refine else (crf_dir(p.crf, LOW_ALPHA), crf_dir(p.crf, HIGH_ALPHA)))
            + ((p.cam_bg,) if ctx.own_background else ())),
    ]
    if ctx.own_background:  # SIPE's seed PNGs: the arg-max with its own background channel, no threshold
        stages.append(Stage("eval_seed_png", lambda c: evaluate("seed_png", p.seed_png, eval_list, "--type", "png"),
                            "seed PNG mIoU (the method's own background)"))
    stages += [
        Stage("eval_seed", lambda c: evaluate("seed", p.cam, eval_list, "--type", "npy", "--curve",
                                              "--out_dir", p.seed_curve),
              "seed mIoU over background thresholds", (ctx.eval_json("seed"), p.seed_curve)),
        Stage("refine_mask", lambda c: [
            "refine_mask.py", *dataset_flags(c), "--list", crf_list, "--cam_dir", p.cam, "--out_dir", p.crf_masks,
            "--bg_threshold", f"{clamped_threshold(c):.2f}",
            *(["--out_crf", p.aff_crf, "--crf_alphas", *_strings(affinity_label_alphas(c))] if dicts_from_refine else [])],
            "dense-CRF pseudo masks" + (" and AffinityNet's la/ha CRF dicts" if dicts_from_refine else ""),
            (p.crf_masks,) + ((os.path.dirname(p.aff_crf),) if dicts_from_refine else ())),
        Stage("eval_crf", lambda c: evaluate("crf", p.crf_masks, eval_list, "--type", "png"), "CRF mask mIoU",
              (ctx.eval_json("crf"),)),
    ]
    affinitynet = [
        Stage("train_aff", lambda c: [
            "train_aff.py", *dataset_flags(c), "--train_list", train_list, "--session_name", "aff",
            "--la_crf_dir", crf_dir(aff_crf, affinity_label_alphas(c)[0]),
            "--ha_crf_dir", crf_dir(aff_crf, affinity_label_alphas(c)[1]),
            *_strings(training_flags(c, "train_aff"))],
            "AffinityNet", checkpoint_files("aff")),
        Stage("infer_aff", lambda c: [
            "infer_aff.py", *dataset_flags(c), "--weights", aff_weights, "--infer_list", train_list,
            # walk_from crf: the la dicts are the seeds' CRF marginals at the seed's own alpha.
            "--cam_dir", crf_dir(aff_crf, affinity_label_alphas(c)[0]) if walk_from_crf else p.cam,
            "--out_rw", p.rw_masks, *random_walk_flags(c),
            "--num_workers", workers],
            "random-walk pseudo masks", (p.rw_masks,)),
        Stage("eval_rw", lambda c: evaluate("rw", p.rw_masks, eval_list, "--type", "png"),
              "random-walk mask mIoU", (ctx.eval_json("rw"),)),
    ]
    irn = [
        Stage("make_ir_labels", lambda c: [
            "make_ir_labels.py", *dataset_flags(c), "--infer_list", train_list, "--cam_dir", irn_cams,
            "--out_ir_label", p.ir_labels, "--variant", c.irn_variant],
            "IRN's IR labels (confident foreground / background)", (p.ir_labels,)),
        Stage("train_irn", lambda c: [
            "train_irn.py", *dataset_flags(c), "--train_list", train_list, "--mean_list", eval_list,
            "--ir_label_dir", p.ir_labels, "--session_name", "irn", *_strings(training_flags(c, "train_irn"))],
            "IRN boundary network", checkpoint_files("irn")),
        Stage("make_seg_labels", lambda c: [
            "make_seg_labels.py", *dataset_flags(c), "--weights", irn_weights, "--infer_list", train_list,
            "--cam_dir", irn_cams, "--out_dir", p.irn_masks, "--variant", c.irn_variant, *irn_mask_flags(c),
            "--num_workers", workers],
            "IRN pseudo masks (boundary random walk)", (p.irn_masks,)),
        Stage("eval_irn", lambda c: evaluate("irn", p.irn_masks, eval_list, "--type", "png"), "IRN mask mIoU",
              (ctx.eval_json("irn"),)),
    ]
    stages += {"crf": [], "affinitynet": affinitynet, "irn": irn}[ctx.refine]
    stages += deeplab_stages("deeplab", ctx.deeplab_session, ["--pseudo_dir", pseudo_dir], p.deeplab_val,
                             f"the {ctx.deeplab_masks} pseudo masks")
    stages += [
        Stage("test_deeplab_samples", lambda c: [
            "test_deeplab.py", *dataset_flags(c), "--weights", deeplab_weights, "--infer_list",
            write_samples_list(c, samples_list), "--out_dir", p.deeplab_samples,
            "--scales", *_strings(profile[test_settings]["scales"]), "--num_workers", workers],
            "DeepLab predictions on the sample images of the results page", (p.deeplab_samples,)),
    ]
    if profile.get("deeplab_on_gt"):
        # The same recipe on the ground truth of the same images: the fully supervised bound. It
        # reads the data and the seed classifier's backbone only, so its training runs beside the
        # one on the pseudo masks (one thread each: on 2 cores, measured in the README).
        seed_training = next(index for index, stage in enumerate(stages) if stage.name in ("train_avc", "train_msa"))
        stages += deeplab_stages("deeplab_gt", f"{ctx.deeplab_session}_gt", [], p.deeplab_gt_val,
                                 "the ground-truth masks", tuple(stage.name for stage in stages[:seed_training + 1]),
                                 beside="train_deeplab")
    return stages


def seed_settings(ctx: Context, kind: str) -> str:
    """The profile section of the seed stage ``kind`` ('train' or 'infer') for the run's method family."""
    family = ctx.seed_family
    return {"train": f"train_{family}", "infer": "infer_seed" if family == "avc" else f"infer_{family}"}[kind]


def spixel_weights(ctx: Context) -> str:
    """MSA's superpixel FCN (stage train_scn)."""
    return os.path.join(ctx.paths.checkpoints, f"{SPIXEL_SESSION}.pth")


SPIXEL_SESSION = "spixel"


def saliency_dir(ctx: Context) -> str:
    """msa_sal's saliency PNGs: the user's (``--sal_dir``) or the generated stand-ins."""
    return ctx.sal_dir or ctx.paths.saliency


def msa_input_stages(ctx: Context, train_list: str, val_list: str,
                     checkpoint_files: Callable[[str], tuple[str, ...]]) -> list[Stage]:
    """MSA's inputs: the superpixel FCN (and its scores on val), and for msa_sal without
    ``--sal_dir`` the saliency stand-ins."""
    settings = ctx.profile["train_scn"]
    stages = [
        Stage("train_scn", lambda c: [
            "train_scn.py", *dataset_flags(c), "--train_list", train_list, "--session_name", SPIXEL_SESSION,
            *_strings(training_flags(c, "train_scn")), "--resize_long", *_strings(settings["resize_long"])],
            "superpixel FCN (MSA; images only, no labels)", checkpoint_files(SPIXEL_SESSION)),
        Stage("eval_spixel", lambda c: [
            "eval_spixel.py", *dataset_flags(c), "--weights", spixel_weights(c), "--infer_list", val_list,
            "--out", c.eval_json("spixel")],
            "superpixel boundary recall / precision / ASA on val (and the regular grid's)", (ctx.eval_json("spixel"),)),
    ]
    if ctx.msa_saliency and ctx.sal_dir is None:
        stages.append(Stage("saliency_standin", lambda c: [
            "-m", "voc12.saliency", *dataset_flags(c), "--list", train_list, "--out", c.paths.saliency],
            "saliency STAND-INS from the ground truth (pixel labels; no saliency detector here)",
            (ctx.paths.saliency,)))
    return stages


def msa_inference_flags(ctx: Context) -> list[str]:
    """infer_seed.py's flags of an MSA checkpoint: its superpixel FCN and the profile's AP setting."""
    if ctx.seed_family != "msa":
        return []
    settings = ctx.profile["infer_msa"]
    return ["--spixel_weights", spixel_weights(ctx), "--ap_steps", str(settings["ap_steps"]),
            "--ap_threshold", str(settings["ap_threshold"])]


def result_notes(ctx: Context) -> list[str]:
    """Lines the results table carries beside its rows: MSA's superpixel scores (stage eval_spixel)
    and msa_sal's supervision (its saliency maps)."""
    notes = []
    spixel = read_json_if_present(ctx.eval_json("spixel")) if ctx.seed_family == "msa" else None
    if spixel:
        def scores(name: str) -> str:
            return " / ".join(f"{100 * spixel[name][key]:.1f}" for key in ("boundary_recall", "boundary_precision", "asa"))
        notes.append(f"Superpixel FCN on {ctx.profile['val_list']} (boundary recall / precision / ASA, %, tolerance "
                     f"{spixel['tolerance']}): {scores('spixel_fcn')}; regular 16 x 16 grid: {scores('regular_grid')}.")
    if ctx.msa_saliency and ctx.sal_dir is None:
        from voc12.saliency import STANDIN_NOTE  # no torch import
        notes.append(f"Saliency maps: {STANDIN_NOTE}, so these results are pixel-supervised, not image-level only.")
    elif ctx.msa_saliency:
        notes.append(f"Saliency maps from {ctx.sal_dir} (a saliency detector, trained with pixel labels): these "
                     f"results are not image-level supervised only.")
    return notes


def seed_training_command(ctx: Context, train_list: str) -> list[str]:
    """train_avc.py for AVC (``--method seam`` for SEAM), train_msa.py for MSA (with its superpixel
    FCN, and saliency maps for msa_sal), train_seed.py --method for the others."""
    section = seed_settings(ctx, "train")
    settings = ctx.profile[section]
    if ctx.seed_family == "msa":
        variant = ["--variant", "saliency", "--sal_dir", saliency_dir(ctx)] if ctx.msa_saliency else []
        return ["train_msa.py", *dataset_flags(ctx), "--train_list", train_list, "--session_name", ctx.seed_session,
                "--spixel_weights", spixel_weights(ctx), *_strings(training_flags(ctx, section)),
                "--resize_long", *_strings(settings["resize_long"]), *variant]
    if ctx.seed_on_resnet38:
        script, method_flags = ["train_avc.py"], ([] if ctx.method == "avc" else ["--method", ctx.method])
    else:
        script, method_flags = ["train_seed.py", "--method", ctx.method], []
    return [*script, *dataset_flags(ctx), "--train_list", train_list, "--session_name", ctx.seed_session,
            *_strings(training_flags(ctx, section)), "--resize_long", *_strings(settings["resize_long"]),
            *method_flags]


def write_samples_list(ctx: Context, path: str) -> str:
    """The first ``sample_images`` ids of the evaluated list, for the results page."""
    ids = read_id_list(list_file(ctx, ctx.profile["eval_list"]))[: ctx.profile["sample_images"]]
    atomic_write_text(path, "\n".join(ids) + "\n")
    return path


# ----------------------------------------------------------------------------- running
# A stage's marker says what its outputs were made from: its ``fingerprint`` is a digest of the
# profile, the exact command and the identity (digest) of every earlier stage's marker. A stage
# is done only when its marker's fingerprint is the one the run would make now, so a changed
# configuration, or a rerun earlier stage, reruns it. The marker is removed before the stage's
# outputs are, and a "started" marker (the fingerprint alone) lets an interrupted stage resume
# with its outputs kept only when it is started again with the same fingerprint.
def marker_path(ctx: Context, stage: Stage) -> str:
    return os.path.join(ctx.paths.stages, f"{stage.name}.json")


def started_path(ctx: Context, stage: Stage) -> str:
    return os.path.join(ctx.paths.stages, f"{stage.name}.started.json")


def stage_done(ctx: Context, stage: Stage) -> dict[str, Any] | None:
    """The stage's marker (command, fingerprint, seconds, time), or None if it has not finished."""
    try:
        return read_json_if_present(marker_path(ctx, stage))
    except ValueError:  # a marker cut short by hand: the stage is not done
        return None


def marker_identity(marker: Mapping[str, Any] | None) -> str:
    """The digest a later stage's fingerprint includes ('none' for a stage that has not run)."""
    if marker is None:
        return "none"
    return hashlib.sha256(json.dumps(marker, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def stage_fingerprint(ctx: Context, argv: Sequence[str], upstream: Sequence[str]) -> str:
    """Digest of what a stage's outputs are made from: profile, command, earlier markers."""
    made_from = {"profile": ctx.profile_name, "command": shlex.join(argv), "upstream": list(upstream)}
    return hashlib.sha256(json.dumps(made_from, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _remove(path: str) -> None:
    if os.path.isfile(path):
        os.remove(path)


def stage_upstream(stage: Stage, identities: Mapping[str, str]) -> list[str]:
    """The marker identities a stage's fingerprint covers: of the stages it ``needs``, else of every
    earlier stage (``identities``: name -> identity of the stages before it, in order)."""
    if stage.needs is None:
        return list(identities.values())
    return [identities[name] for name in stage.needs if name in identities]


def stale_stages(ctx: Context, stages: Sequence[Stage]) -> list[str]:
    """The stages whose marker is missing or was made from another configuration than now."""
    stale, identities = [], {}
    for stage in stages:
        marker = stage_done(ctx, stage)
        try:
            current = marker is not None and marker.get("fingerprint") == stage_fingerprint(
                ctx, stage.command(ctx), stage_upstream(stage, identities))
        except DataError:  # its command needs an earlier stage's result that is missing
            current = False
        if not current:
            stale.append(stage.name)
        identities[stage.name] = marker_identity(marker)
    return stale


def can_run_beside(ctx: Context) -> bool:
    """Two one-thread stages at once only where each gets a core of its own."""
    threads = ctx.profile.get("torch_threads")
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return bool(threads) and cores >= 2 * threads


def run_stages(ctx: Context, stages: Sequence[Stage], only: str | None = None, from_stage: str | None = None,
               dry_run: bool = False, python: str = sys.executable) -> int:
    """Run the stages that are not done with the current configuration; 0, or 1 at a failure.

    ``only`` reruns one stage, ``from_stage`` a stage and every later one; a stage that is rerun
    has its marker removed first, then its outputs (unless it resumes an interrupted start of
    the same fingerprint), and gets its marker back only when its command succeeds. A stage with
    ``beside`` starts in the background with that stage when the cores allow it (its output goes
    to ``<stages>/<name>.log``) and is waited for at its own place in the list.
    """
    names = [stage.name for stage in stages]
    chosen = only or from_stage
    if chosen and chosen not in names:
        raise DataError(f"unknown stage {chosen!r}; the stages are: {', '.join(names)}")
    first = names.index(chosen) if chosen else 0
    identities: dict[str, str] = {}
    background: dict[str, tuple[RunningStage, str]] = {}  # name -> (process, fingerprint)

    def planned(index: int, stage: Stage) -> tuple[list[str], str, dict[str, Any] | None, bool]:
        """Its command, fingerprint, marker and whether the flags force a rerun."""
        argv = stage.command(ctx)
        fingerprint = stage_fingerprint(ctx, argv, stage_upstream(stage, identities))
        forced = only is not None or (from_stage is not None and index >= first)
        return argv, fingerprint, stage_done(ctx, stage), forced

    def current(marker: Mapping[str, Any] | None, fingerprint: str) -> bool:
        return marker is not None and marker.get("fingerprint") == fingerprint

    def start_beside(name: str) -> None:
        """Start in the background the stages to run beside stage ``name`` whose inputs are done."""
        if only or dry_run or not can_run_beside(ctx):
            return
        for index, stage in enumerate(stages):
            if stage.beside != name or stage.name in background or stage.needs is None:
                continue
            if any(names.index(need) >= names.index(name) for need in stage.needs if need in names):
                continue  # it reads what has not been made yet
            try:
                argv, fingerprint, marker, forced = planned(index, stage)
            except DataError:
                continue
            if forced or not current(marker, fingerprint):
                prepare_rerun(ctx, stage, marker, fingerprint, forced)
                log = os.path.join(ctx.paths.stages, f"{stage.name}.log")
                background[stage.name] = (start_stage(ctx, stage, python, argv, log_path=log, beside=name),
                                          fingerprint)

    def finish_background(failed: bool) -> int:
        """Wait for the background stages; their markers are written when they succeed."""
        code = 1 if failed else 0
        for name, (running, fingerprint) in list(background.items()):
            if failed:
                print(f"--- [{name}] waiting for it to finish (beside {running.beside})", flush=True)
            try:
                finish_stage(ctx, running, fingerprint)
            except StageFailed as error:
                print(f"\n{error}", file=sys.stderr)
                code = 1
            del background[name]
        return code

    try:
        for index, stage in enumerate(stages):
            if only and stage.name != only:
                identities[stage.name] = marker_identity(stage_done(ctx, stage))
                continue
            if stage.name in background:  # started beside an earlier stage: wait for it here
                running, fingerprint = background.pop(stage.name)
            else:
                try:
                    argv, fingerprint, marker, forced = planned(index, stage)
                except DataError as error:  # a flag that comes from an earlier stage's result
                    if not dry_run:
                        raise
                    print(f"[{stage.name}] (command known once earlier stages ran: {error})")
                    identities[stage.name] = "pending"
                    continue
                if current(marker, fingerprint) and not forced:
                    print(f"--- [{stage.name}] done earlier (marker {marker_path(ctx, stage)})")
                    identities[stage.name] = marker_identity(marker)
                    continue
                if dry_run:
                    where = f" (beside {stage.beside}, when the cores allow)" if stage.beside else ""
                    print(f"[{stage.name}]{where} python {' '.join(argv)}")
                    identities[stage.name] = "pending"
                    continue
                prepare_rerun(ctx, stage, marker, fingerprint, forced)
                start_beside(stage.name)
                running = start_stage(ctx, stage, python, argv)
            try:
                marker = finish_stage(ctx, running, fingerprint)
            except StageFailed as error:
                print(f"\n{error}", file=sys.stderr)
                return finish_background(failed=True)
            identities[stage.name] = marker_identity(marker)
        return 0
    finally:
        for running, _ in background.values():  # interrupted: the children got the signal too
            running.process.wait()


def prepare_rerun(ctx: Context, stage: Stage, marker: Mapping[str, Any] | None, fingerprint: str,
                  forced: bool) -> None:
    """Before a stage runs: its marker goes first (outputs being replaced never have one), then its
    outputs unless it resumes an interrupted start of the same fingerprint; a started marker is left."""
    try:
        started = read_json_if_present(started_path(ctx, stage))
    except ValueError:
        started = None
    resume = not forced and marker is None and started is not None and started.get("fingerprint") == fingerprint
    _remove(marker_path(ctx, stage))
    if resume:
        print(f"--- [{stage.name}] resuming an interrupted run of the same configuration")
    else:
        if marker is not None and not forced:
            print(f"--- [{stage.name}] made with another configuration (profile, command or an earlier "
                  f"stage changed): rerunning it")
        clear_outputs(stage)
    os.makedirs(ctx.paths.stages, exist_ok=True)
    atomic_write_text(started_path(ctx, stage), json.dumps({"fingerprint": fingerprint}) + "\n")


def clear_outputs(stage: Stage) -> None:
    """Remove what a stage wrote earlier, so a forced rerun recomputes it."""
    for path in stage.outputs:
        if os.path.isdir(path):
            print(f"--- [{stage.name}] removing {path}/ to rerun it")
            shutil.rmtree(path)
        elif os.path.isfile(path):
            print(f"--- [{stage.name}] removing {path} to rerun it")
            os.remove(path)


@dataclass
class RunningStage:
    """A stage script started as a subprocess (``log_path``: where its output goes, None: ours)."""

    stage: Stage
    process: subprocess.Popen
    printable: str
    started_at: float
    log_path: str | None = None
    beside: str | None = None


def start_stage(ctx: Context, stage: Stage, python: str, argv: Sequence[str], log_path: str | None = None,
                beside: str | None = None) -> RunningStage:
    """Start one stage (``argv``: its command) as a subprocess in the repository root, its output
    appended to ``log_path`` when given (a rerun never truncates an earlier run's log)."""
    threads = None if stage.name in PARALLEL_STAGES else ctx.profile.get("torch_threads")
    printable = (f"OMP_NUM_THREADS={threads} " if threads else "") + shlex.join(["python", *argv])
    where = f" (beside {beside}; its output: {log_path})" if beside else ""
    print(f"\n==> [{stage.name}] {stage.description}{where}\n$ {printable}", flush=True)
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    started_at = time.time()
    if log_path is None:
        process = subprocess.Popen([python, *argv], cwd=REPO_ROOT, env=env)
    else:
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"\n$ {printable}\n")
            log.flush()
            process = subprocess.Popen([python, *argv], cwd=REPO_ROOT, env=env, stdout=log,
                                       stderr=subprocess.STDOUT)
    return RunningStage(stage, process, printable, started_at, log_path, beside)


def finish_stage(ctx: Context, running: RunningStage, fingerprint: str | None = None) -> dict[str, Any]:
    """Wait for a started stage; on success write its marker, with ``fingerprint``, and remove its
    started marker (the one that lets an interrupted start resume)."""
    code = running.process.wait()
    ended_at = time.time()
    seconds = ended_at - running.started_at
    name = running.stage.name
    if code != 0:
        where = f" (its output: {running.log_path})" if running.log_path else ""
        raise StageFailed(f"stage '{name}' failed with exit code {code} after {seconds:.0f} s{where}; "
                          f"rerun it with --only {name} once fixed:\n$ {running.printable}")
    if running.beside:
        print(f"--- [{name}] (beside {running.beside}) finished in {seconds:.0f} s", flush=True)
    record = {"stage": name, "profile": ctx.profile_name, "command": running.printable,
              "fingerprint": fingerprint, "seconds": round(seconds, 2),
              "started_at": round(running.started_at, 2), "ended_at": round(ended_at, 2),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
              "run_id": uuid.uuid4().hex[:12]}  # a rerun with the same command is still another input
    if running.beside:
        record["beside"] = running.beside
    os.makedirs(ctx.paths.stages, exist_ok=True)
    atomic_write_text(marker_path(ctx, running.stage), json.dumps(record, indent=2))
    _remove(started_path(ctx, running.stage))
    return record


class StageFailed(RuntimeError):
    """A stage script exited with a non-zero code."""
