"""The whole workflow as a list of stages, each one real stage script run as its own process.

A stage is a name, a command built from the run's configuration and the results of earlier
stages (the best background threshold, say), and a marker file written when it succeeds, so an
interrupted run resumes at the first unfinished stage. The commands are exactly what a user
would type; they are printed so they can be copied.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
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
    # None: the dataset type follows the root (see dataset_for_root).
    "dataset": None,
    "train_list": "train", "eval_list": "train", "val_list": "val",
    # No ImageNet weights here: the classifier trains from scratch, and AffinityNet and DeepLab
    # start from its backbone (trained on the same images).
    "backbone_from_avc": True,
    # One compute thread a stage: on 2 shared cores, 2 torch threads beside the data workers thrash.
    "torch_threads": 1,
    "width_mult": 0.125, "num_workers": 1, "sample_images": 8,
    # Dropping whole channels of an 8..512-channel network stalls learning from scratch; the second
    # view is 0.5 (not 0.3) of a 112-pixel crop so its CAM grid is not a handful of cells.
    "train_avc": {"batch_size": 8, "max_epoches": 25, "lr": 0.02, "momentum": 0.9, "crop_size": 112,
                  "resize_long": (112, 144), "flags": ("--view_scale", "0.5", "--no-dropout")},
    "infer_seed": {"scales": (0.5, 1.0, 1.5, 2.0)},
    "train_aff": {"batch_size": 8, "max_epoches": 8, "lr": 0.02, "momentum": 0.9, "crop_size": 112},
    # Background exponent of the random walk: the one that reproduces the best seed threshold.
    # The walk runs 2^logt steps; VOC's logt 8 is for a 56 x 56 grid, this 14 x 14 grid has a
    # sixteenth of the pixels, so 2^4 steps spread as far (logt 6 and 8 blur objects into each
    # other). SEAM's --crf (one mean-field step) then snaps the walk to the image edges.
    "infer_aff": {"alpha_from_threshold": True, "beta": 8, "logt": 4, "flags": ("--crf",)},
    # BN momentum 0.1, not DeepLab's 0.0003: a short run must move the new heads' statistics.
    # lr is the published 0.001: at 0.01 the head collapses to all-background.
    "train_deeplab": {"batch_size": 8, "max_iters": 500, "lr": 0.001, "crop_size": 112,
                      "flags": ("--bn_momentum", "0.1")},
    # One scale: on 112-pixel images the 0.75 view's 11 x 11 grid costs more than fusion gains
    # (measured on val: 1.0 alone 27.6, 0.75/1.0/1.25 24.7, both with the CRF).
    "test_deeplab": {"scales": (1.0,)},
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
        "train_aff": {"batch_size": 8, "max_epoches": 8, "lr": 0.1, "momentum": 0.0, "crop_size": 448},
        "infer_aff": {"alpha": 6.0, "beta": 8, "logt": 8},
        "train_deeplab": {"batch_size": 10, "max_iters": 20000, "lr": 0.001, "crop_size": 448},
        "test_deeplab": {"scales": (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)},
        # A second 20k-iteration DeepLab run on the ground truth would double the GPU time.
        "deeplab_on_gt": False,
    },
}
PROFILES["coco14"] = {**PROFILES["voc12"], "dataset": "coco14", "train_list": "train", "eval_list": "train"}
# A one-minute version of the synthetic run for the end-to-end test (CI).
PROFILES["tiny"] = {
    **PROFILES["synthetic"],
    "synthetic": {"num_train": 24, "num_val": 8, "image_size": 64, "num_classes": 3, "seed": 0},
    "num_workers": 0, "sample_images": 3,
    "train_avc": {**PROFILES["synthetic"]["train_avc"], "max_epoches": 1, "crop_size": 64, "resize_long": (64, 72)},
    "infer_seed": {"scales": (1.0, 1.5)},
    "train_aff": {**PROFILES["synthetic"]["train_aff"], "max_epoches": 1, "crop_size": 64},
    "train_deeplab": {**PROFILES["synthetic"]["train_deeplab"], "max_iters": 4, "crop_size": 64},
    "test_deeplab": {"scales": (1.0,)},
}



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
    seed_png: str       # seed label maps
    crf: str            # prefix of the low/high-alpha CRF dict folders
    seed_curve: str     # evaluation curve of the seeds
    crf_masks: str
    rw_masks: str
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
                   checkpoints=sub("checkpoints"), cam=sub("seed/cam"), seed_png=sub("seed/seed_png"),
                   crf=sub("seed/crf"), seed_curve=sub("eval/seed_curve"), crf_masks=sub("masks/crf"),
                   rw_masks=sub("masks/rw"), deeplab_val=sub("deeplab/val"),
                   deeplab_gt_val=sub("deeplab_gt/val"),
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


@dataclass
class Context:
    profile_name: str
    profile: Mapping[str, Any]
    paths: Paths
    imagenet_weights: str | None = None   # ilsvrc-cls_rna-a1_cls1000_ep-0001.params
    results: dict[str, Any] = field(default_factory=dict)

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
             "--width_mult", ctx.profile["width_mult"], "--num_workers", ctx.profile["num_workers"],
             "--save_dir", ctx.paths.checkpoints, "--resume", "auto", *weights_flags(ctx, stage)]
    if "max_epoches" in settings:
        flags += ["--max_epoches", settings["max_epoches"]]
    if "momentum" in settings:
        flags += ["--momentum", settings["momentum"]]
    return flags + list(settings.get("flags", ()))


def weights_flags(ctx: Context, stage: str) -> list[str]:
    """``--weights`` of a training stage: ImageNet weights, else (synthetic) the AVC backbone."""
    if ctx.imagenet_weights:
        return ["--weights", ctx.imagenet_weights]
    if stage != "train_avc" and ctx.profile["backbone_from_avc"]:
        return ["--weights", os.path.join(ctx.paths.checkpoints, "avc.pth")]
    return []


def random_walk_flags(ctx: Context) -> list[str]:
    settings = dict(ctx.profile["infer_aff"])
    switches = list(settings.pop("flags", ()))
    if settings.pop("alpha_from_threshold", False):
        settings["alpha"] = round(alpha_for_threshold(clamped_threshold(ctx)), 3)
    return [f"--{name}={value}" for name, value in settings.items()] + switches


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
    avc_weights = os.path.join(p.checkpoints, "avc.pth")
    aff_weights = os.path.join(p.checkpoints, "aff.pth")
    deeplab_weights = os.path.join(p.checkpoints, "deeplab.pth")
    workers = str(profile["num_workers"])

    def checkpoint_files(session: str) -> tuple[str, ...]:
        return tuple(os.path.join(p.checkpoints, f"{session}{suffix}")
                     for suffix in (".pth", "_last.pth", "_log.csv", "_val.csv"))

    def evaluate(name: str, predict_dir: str, image_list: str, *extra: str) -> list[str]:
        return ["evaluation.py", "--list", image_list, "--predict_dir", predict_dir, *dataset_flags(ctx),
                "--num_workers", workers, "--comment", name, "--out_json", ctx.eval_json(name), *extra]

    def deeplab_stages(session: str, label_flags: list[str], val_dir: str, trained_on: str) -> list[Stage]:
        """Train DeepLab (labels: ``label_flags``, none = ground truth), predict val, evaluate."""
        weights = os.path.join(p.checkpoints, f"{session}.pth")
        return [
            Stage(f"train_{session}", lambda c: [
                "train_deeplab.py", *dataset_flags(c), "--train_list", train_list, *label_flags,
                "--session_name", session, *_strings(training_flags(c, "train_deeplab")),
                "--max_iters", str(profile["train_deeplab"]["max_iters"])],
                f"DeepLabV1 on {trained_on}", checkpoint_files(session)),
            Stage(f"test_{session}", lambda c: [
                "test_deeplab.py", *dataset_flags(c), "--weights", weights, "--infer_list", val_list,
                "--out_dir", val_dir, "--scales", *_strings(profile["test_deeplab"]["scales"]),
                "--num_workers", workers],
                f"predictions on val of DeepLab trained on {trained_on}", (val_dir,)),
            Stage(f"eval_{session}", lambda c: evaluate(session, val_dir, val_list, "--type", "png"),
                  f"val mIoU of DeepLab trained on {trained_on}"),
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
    stages += [
        Stage("prepare", lambda c: prepare, "image lists and cls_labels.npy"),
        Stage("train_avc", lambda c: [
            "train_avc.py", *dataset_flags(c), "--train_list", train_list, "--session_name", "avc",
            *_strings(training_flags(c, "train_avc")),
            "--resize_long", *_strings(profile["train_avc"]["resize_long"])],
            "AVC classifier", checkpoint_files("avc")),
        Stage("infer_seed", lambda c: [
            "infer_seed.py", *dataset_flags(c), "--weights", avc_weights, "--infer_list", train_list,
            "--scales", *_strings(profile["infer_seed"]["scales"]), "--out_cam", p.cam, "--out_crf", p.crf,
            "--out_cam_pred", p.seed_png, "--num_workers", workers],
            "CAM dicts, seed PNGs, low/high-alpha CRF dicts", (p.cam, p.seed_png, crf_dir(p.crf, LOW_ALPHA), crf_dir(p.crf, HIGH_ALPHA))),
        Stage("eval_seed", lambda c: evaluate("seed", p.cam, eval_list, "--type", "npy", "--curve",
                                              "--out_dir", p.seed_curve),
              "seed mIoU over background thresholds"),
        Stage("refine_mask", lambda c: [
            "refine_mask.py", *dataset_flags(c), "--list", eval_list, "--cam_dir", p.cam, "--out_dir", p.crf_masks,
            "--bg_threshold", f"{clamped_threshold(c):.2f}", "--num_workers", workers],
            "dense-CRF pseudo masks", (p.crf_masks,)),
        Stage("eval_crf", lambda c: evaluate("crf", p.crf_masks, eval_list, "--type", "png"), "CRF mask mIoU"),
        Stage("train_aff", lambda c: [
            "train_aff.py", *dataset_flags(c), "--train_list", train_list, "--session_name", "aff",
            "--la_crf_dir", crf_dir(p.crf, LOW_ALPHA), "--ha_crf_dir", crf_dir(p.crf, HIGH_ALPHA),
            *_strings(training_flags(c, "train_aff"))],
            "AffinityNet", checkpoint_files("aff")),
        Stage("infer_aff", lambda c: [
            "infer_aff.py", *dataset_flags(c), "--weights", aff_weights, "--infer_list", train_list,
            "--cam_dir", p.cam, "--out_rw", p.rw_masks, *random_walk_flags(c),
            "--num_workers", workers],
            "random-walk pseudo masks", (p.rw_masks,)),
        Stage("eval_rw", lambda c: evaluate("rw", p.rw_masks, eval_list, "--type", "png"),
              "random-walk mask mIoU"),
        *deeplab_stages("deeplab", ["--pseudo_dir", p.rw_masks], p.deeplab_val, "the random-walk masks"),
        Stage("test_deeplab_samples", lambda c: [
            "test_deeplab.py", *dataset_flags(c), "--weights", deeplab_weights, "--infer_list",
            write_samples_list(c, samples_list), "--out_dir", p.deeplab_samples,
            "--scales", *_strings(profile["test_deeplab"]["scales"]), "--num_workers", workers],
            "DeepLab predictions on the sample images of the results page", (p.deeplab_samples,)),
    ]
    if profile.get("deeplab_on_gt"):
        # The same recipe on the ground truth of the same images: the fully supervised bound.
        stages += deeplab_stages("deeplab_gt", [], p.deeplab_gt_val, "the ground-truth masks")
    return stages


def write_samples_list(ctx: Context, path: str) -> str:
    """The first ``sample_images`` ids of the evaluated list, for the results page."""
    ids = read_id_list(list_file(ctx, ctx.profile["eval_list"]))[: ctx.profile["sample_images"]]
    atomic_write_text(path, "\n".join(ids) + "\n")
    return path


# ----------------------------------------------------------------------------- running
def marker_path(ctx: Context, stage: Stage) -> str:
    return os.path.join(ctx.paths.stages, f"{stage.name}.json")


def stage_done(ctx: Context, stage: Stage) -> dict[str, Any] | None:
    """The stage's marker (command, seconds, time), or None if it has not finished."""
    return read_json_if_present(marker_path(ctx, stage))


def clear_outputs(stage: Stage) -> None:
    """Remove what a stage wrote earlier, so a forced rerun recomputes it."""
    for path in stage.outputs:
        if os.path.isdir(path):
            print(f"--- [{stage.name}] removing {path}/ to rerun it")
            shutil.rmtree(path)
        elif os.path.isfile(path):
            print(f"--- [{stage.name}] removing {path} to rerun it")
            os.remove(path)


def run_stage(ctx: Context, stage: Stage, python: str = sys.executable) -> dict[str, Any]:
    """Run one stage as a subprocess in the repository root; write its marker on success."""
    argv = [python, *stage.command(ctx)]
    threads = ctx.profile.get("torch_threads")
    printable = (f"OMP_NUM_THREADS={threads} " if threads else "") + shlex.join(["python", *argv[1:]])
    print(f"\n==> [{stage.name}] {stage.description}\n$ {printable}", flush=True)
    start = time.perf_counter()
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    completed = subprocess.run(argv, cwd=REPO_ROOT, env=env)
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        raise StageFailed(f"stage '{stage.name}' failed with exit code {completed.returncode} after "
                          f"{seconds:.0f} s; rerun it with --only {stage.name} once fixed:\n$ {printable}")
    record = {"stage": stage.name, "command": printable, "seconds": round(seconds, 2),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.makedirs(ctx.paths.stages, exist_ok=True)
    atomic_write_text(marker_path(ctx, stage), json.dumps(record, indent=2))
    return record


class StageFailed(RuntimeError):
    """A stage script exited with a non-zero code."""
