"""One prepared GPU check: every stage measured on CUDA in one short command.

On a machine with one CUDA GPU (an H200 for about 15 minutes: the suite takes at most
about 7 minutes, its own set-up included; 17 stages at 12 s per measurement)::

    bash bench/gpu_suite.sh --out gpu_out           # picks a python with torch, then runs:
    python -m bench.gpu_suite --out gpu_out         # full width, VOC-sized images, device cuda
    python -m bench.gpu_suite --tiny --device cpu --out /tmp/s   # the same code at tiny sizes (seconds)

It writes ``<out>/gpu_suite.json`` (every number, the settings, torch/CUDA/GPU) and
``<out>/gpu_suite.md`` (the tables the README takes), and prints both tables. Nothing is
read from disk: the images are VOC-sized (500 x 375) synthetic scenes drawn on the fly
(``voc12.synthetic.generate_sample``, 20 classes), written into a temporary VOC-layout folder
so the project's real datasets read them. Networks are randomly initialised at width 1.0
(throughput does not depend on the weights; the bf16/fp32 guard then compares untrained CAMs).

Stages (``STAGES``: name -> function; each runs the project's own code):

* ``avc_train``: AVC classifier training step through ``tool.trainer.build_trainer`` /
  ``Trainer.step`` and ``network.avc.avc_training_losses`` (two views, every loss term, bf16
  autocast and channels_last on CUDA), crop 448, batch 8, batches from
  ``voc12.data.ClassificationDataset``. It also times the same step without the Trainer
  (no NaN guard, no CSV log: the guard's one device-to-host read per step) to measure
  what the Trainer costs.
* ``avc_loader``: images/s that ``make_loader`` over ``ClassificationDataset`` delivers with
  ``--num_workers`` workers: whether the data loader can feed the GPU.
* ``cam_guard``: bf16 autocast CAMs against float32 CAMs on the same images (max abs
  difference of the raw and fused CAMs, arg-max agreement).
* ``seed_infer`` / ``seed_infer_crf``: seed inference (4 scales x flip, views batched by
  ``tool.multiscale.forward_views``, ``tool.cam`` fusion and seed), without and with the
  low/high-alpha CRF dicts written by a process pool beside the network, as infer_seed.py.
* ``aff_train``: AffinityNet training step (``voc12.affinity_dataset.AffinityDataset`` batches,
  ``affinity_loss``, the Trainer), crop 448, batch 8.
* ``random_walk``: per image, the AffinityNet graph, then the sparse walk
  (``tool.random_walk.random_walk``) on the GPU and on the CPU, and the dense matrix power
  (``bench.dense_rw_baseline``) where its N x N matrices fit; label agreement.
* ``deeplab_train``: DeepLabV1 training step (``SegmentationDataset`` batches,
  ``network.segmenters.segmentation_loss``, the Trainer), crop 448, batch 10.
* ``deeplab_test``: DeepLabV1 test (6 scales + flip, ``test_deeplab.predict_probabilities``).
* ``ddp_step``: one 2-process ``torchrun`` training step (AVC, and DeepLab with SyncBatchNorm)
  on the one GPU with NCCL; if NCCL refuses two processes on one GPU, one process. On CPU:
  2 processes with gloo. Checks that both ranks end with the same weights.

The later methods (after ``ddp_step``, so a run short of time skips them first):

* ``sipe_train``: SIPE training step (``network.methods.METHODS["sipe"]``: ``build_network``, its
  ``losses`` with the valid mask, ``build_trainer`` with its ``group_specs`` and gradient clip),
  crop 512, batch 16, bf16 autocast on CUDA.
* ``sipe_infer``: SIPE seed inference (``network.methods.image_cams``: the method's 4 scales x
  flip, IS-CAM fusion, arg-max seed with its own background).
* ``irn_train``: IRN training step (``voc12.irn_dataset.IrLabelDataset`` pair labels from the
  ground truth as IR labels, ``network.irn.IRNet``, ``boundary_training_terms``), crop 512, batch 32.
* ``irn_seg_labels``: IRN pseudo mask per image as make_seg_labels.py --variant sipe
  (``SegLabelDataset`` items, ``inference_edge`` at crop 512, ``split_cam_dict``,
  ``tool.irn_walk.seg_label``; the CAM dicts are the one-hot ground truth).
* ``msa_train``: MSA classifier training step as train_msa.py (frozen ``SpixelNet``
  association, ``msa_losses`` of the image variant, ``msa_optimizer``, poly 0.5, clip 1), crop
  480, batch 16, from scratch (BatchNorm trains).
* ``deeplabv2_train`` / ``deeplabv2_test``: DeepLabV2-ResNet101 (``SEGMENTERS["deeplabv2_resnet101"]``)
  training step as train_deeplab.py --arch deeplabv2 (``build_model``, ``accumulate_step``: batch
  10 in 2 sub-batches, crop 321, the MSC loss; from scratch) and its test forward
  (``test_deeplab.predict_probabilities`` with the test recipe: full image, no flip).

Every measurement is bounded: ``--warmup`` untimed iterations, then iterations until
``--budget_s`` seconds have passed (at least one); the whole suite stops starting stages when
``--deadline_s`` is near. A stage that fails records its error and the suite goes on. Peak GPU
memory (``torch.cuda.max_memory_allocated``) is reset before each stage.

Adding a stage: write ``def stage_x(suite: Suite) ->
dict`` that builds its network and batches from ``suite`` (``suite.config``, ``suite.info``,
``suite.ids``, ``suite.measure``) and returns its numbers (``rate`` in images/s and ``unit`` for
the table), then add one entry to ``STAGES`` (and, for a projection, one line to
``PROJECTIONS``).

Projections assume linear scaling to 8 GPUs (DDP at the same global batch; the AVC batch of 8
is then one image per GPU, so the 8-GPU figures are an upper bound on the speed-up).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from multiprocessing import get_context
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import default_collate

from bench.dense_rw_baseline import dense_random_walk
from network.affinity import AffinityNet, affinity_loss
from network.avc import AVCNet, avc_training_losses
from network.deeplab import DEEPLAB_BN_MOMENTUM, DeepLabV1
from network.irn import INFERENCE_CROP, IRNet, boundary_training_terms, inference_edge
from network.methods import METHODS, build_network, image_cams
from network.msa import IPC_WEIGHT, IPC_VARIANTS, MSANet, msa_losses, msa_optimizer
from network.segmenters import SEGMENTERS, segmentation_loss
from network.spixel import SpixelNet
from make_seg_labels import SegLabelDataset
from test_deeplab import DEFAULT_SCALES as DEEPLAB_TEST_SCALES, multiscale_views, predict_probabilities
from tool import transforms as T
from tool.cam import cam_dict_from, fuse_cams, seed_from_cam_dict
from tool.cli import run_cli
from tool.contract import HIGH_ALPHA, IGNORE_LABEL, LOW_ALPHA
from tool.crf import write_crf_dicts
from tool.datasets import DatasetInfo
from tool.device import images_to_device, unwrap_model
from tool.distributed import DistInfo, all_gather_object, cleanup, setup_distributed
from tool.fileio import (atomic_write_text, read_label_png, read_rgb_image, save_npy, save_palette_png,
                         save_rgb_image)
from tool.multiscale import forward_views
from tool.random_walk import padded_size, random_walk, random_walk_labels, rw_scores_from_cam_dict
from tool.ir_label import split_cam_dict
from tool.irn_walk import SEG_LABEL_VARIANTS, seg_label
from tool.path_index import INFER_RADIUS
from tool.sampler import EpochBatchSampler, make_loader
from tool.trainer import build_trainer
from train_deeplab import accumulate_step
from train_deeplab import build_model as build_deeplab
from train_irn import LOSS_TERMS as IRN_LOSS_TERMS
from train_msa import LOSS_TERMS as MSA_LOSS_TERMS
from voc12 import layout as voc_layout
from voc12.affinity_dataset import AffinityDataset
from voc12.irn_dataset import IrLabelDataset
from voc12.msa_data import MSAClassificationDataset
from voc12.data import ClassificationDataset, MultiScaleDataset, SegmentationDataset
from voc12.synthetic import class_definitions, generate_sample

# Dataset sizes and schedules the projections use (VOC 2012 + SBD; the published settings).
VOC_TRAIN_AUG = 10582
VOC_TRAIN = 1464
VOC_VAL = 1449
AVC_EPOCHS = 8
AFF_EPOCHS = 8
DEEPLAB_ITERS = 20000
# DeepLabV1's training augmentation (train_deeplab.py's recipe; the constants moved into the table).
SCALE_RANGE = SEGMENTERS["deeplabv1_resnet38"].train.scale_range
HSV_SHIFT = SEGMENTERS["deeplabv1_resnet38"].train.hsv_shift
SIPE_EPOCHS = METHODS["sipe"].training["max_epoches"]
IRN_EPOCHS = 3   # train_irn.py --max_epoches
MSA_EPOCHS = 12  # train_msa.py --max_epoches
DEEPLABV2_ITERS = SEGMENTERS["deeplabv2_resnet101"].train.max_iters  # the published batch, not the profile's
DEEPLABV2_BATCH = SEGMENTERS["deeplabv2_resnet101"].train.batch_size
GOAL_AVC_TRAIN_MIN = 20.0
GOAL_SEED_TRAIN_MIN = 2.0
SEED_SCALES = (0.5, 1.0, 1.5, 2.0)
RW_ALPHA = 6.0  # the VOC command's infer_aff.py --alpha (beta 8, logt 8: random_walk's defaults)
NUM_CLASSES = 20


@dataclasses.dataclass
class SuiteConfig:
    """Sizes and budgets of one run; ``PROFILES`` holds the full (GPU) and tiny (CPU test) ones."""

    width: float
    image_hw: tuple[int, int]
    crop: int
    avc_batch: int
    aff_batch: int
    deeplab_batch: int
    sipe_crop: int       # SIPE (train_seed.py --method sipe): 512, batch 16
    sipe_batch: int
    irn_crop: int        # train_irn.py: 512, batch 32 (the crop's stride-4 grid must fit radius-10 paths)
    irn_batch: int
    irn_infer_crop: int  # make_seg_labels.py --crop_size (each image zero-padded to it)
    msa_crop: int        # train_msa.py: 480, batch 16 (a multiple of the superpixel cell, 16)
    msa_batch: int
    v2_crop: int         # train_deeplab.py --arch deeplabv2: 321, batch 10 in 2 sub-batches
    v2_batch: int
    num_images: int
    warmup: int
    budget_s: float
    deadline_s: float
    num_workers: int
    ddp_timeout_s: float
    max_dense_nodes: int
    threads: int | None  # torch CPU threads (None: torch's default)


PROFILES: dict[str, dict[str, Any]] = {
    # VOC-sized images, ResNet38 at width 1.0, the published crops and batches.
    "full": dict(width=1.0, image_hw=(375, 500), crop=448, avc_batch=8, aff_batch=8, deeplab_batch=10,
                 sipe_crop=512, sipe_batch=16, irn_crop=512, irn_batch=32, irn_infer_crop=INFERENCE_CROP,
                 msa_crop=480, msa_batch=16, v2_crop=SEGMENTERS["deeplabv2_resnet101"].train.crop_size,
                 v2_batch=SEGMENTERS["deeplabv2_resnet101"].train.batch_size,
                 # 17 stages: 12 s per measurement keeps the run (set-up included) near 6.5 minutes.
                 num_images=8, warmup=2, budget_s=12.0, deadline_s=380.0,
                 num_workers=min(8, os.cpu_count() or 1), ddp_timeout_s=90.0, max_dense_nodes=12000,
                 threads=None),
    # The same code at sizes the 2-core CPU runs in seconds (the test suite's run).
    "tiny": dict(width=0.0625, image_hw=(48, 64), crop=48, avc_batch=2, aff_batch=2, deeplab_batch=2,
                 sipe_crop=48, sipe_batch=2, irn_crop=80, irn_batch=2, irn_infer_crop=64,
                 msa_crop=48, msa_batch=2, v2_crop=48, v2_batch=2,
                 num_images=2, warmup=1, budget_s=0.2, deadline_s=600.0, num_workers=0,
                 ddp_timeout_s=180.0, max_dense_nodes=12000,
                 # One thread: at these sizes more threads only wait at barriers, and on a busy
                 # 2-core machine they made a 1-second stage take 50.
                 threads=1),
}


# --------------------------------------------------------------------------- suite state
class Suite:
    """What every stage needs: settings, device, the synthetic images and their VOC-layout folder."""

    def __init__(self, config: SuiteConfig, device: torch.device, work_dir: str) -> None:
        self.config = config
        self.device = device
        self.work_dir = work_dir
        self.started = time.perf_counter()
        self.dist = DistInfo(rank=0, world_size=1, local_rank=0, device=device, is_main=True)
        self.info, self.ids, self.cls_labels = write_synthetic_dataset(work_dir, config)
        self.results: dict[str, dict[str, Any]] = {}

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def measure(self, step: Callable[[], int], budget_s: float | None = None,
                warmup: int | None = None) -> dict[str, float]:
        """Run ``step`` (returns the items it did) ``warmup`` times untimed, then until the budget.

        The budget is checked on the host between iterations; the device is synchronised
        before the clock starts and before it stops, so queued work is counted.
        """
        budget_s = self.config.budget_s if budget_s is None else budget_s
        for _ in range(self.config.warmup if warmup is None else warmup):
            step()
        self.synchronize()
        start = time.perf_counter()
        items = iterations = 0
        while True:
            items += step()
            iterations += 1
            if time.perf_counter() - start >= budget_s:
                break
        self.synchronize()
        seconds = time.perf_counter() - start
        return {"rate": items / seconds, "items": items, "iterations": iterations, "seconds": seconds}


def synthetic_image(rng: np.random.Generator, classes: list, image_hw: tuple[int, int]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """One landscape synthetic scene of exactly ``image_hw`` (VOC's typical 375 x 500) and its label."""
    height, width = image_hw
    image, label = generate_sample(rng, classes, max(image_hw), min_aspect=min(image_hw) / max(image_hw))
    if image.shape[0] > image.shape[1]:  # portrait draw: turn it, objects and labels alike
        image, label = image.transpose(1, 0, 2), label.T
    return np.ascontiguousarray(image[:height, :width]), np.ascontiguousarray(label[:height, :width])


def write_synthetic_dataset(root: str, config: SuiteConfig) -> tuple[DatasetInfo, list[str], dict[str, np.ndarray]]:
    """``num_images`` synthetic scenes in the VOC layout under ``root`` (JPEG, label PNG, la/ha dicts).

    The la/ha "CRF" dicts that AffinityNet trains from are the one-hot ground truth (the
    speed of its loader and step does not depend on where the scores came from).
    """
    classes = class_definitions(NUM_CLASSES)
    info = voc_layout.dataset_info("synthetic", root, class_names=["background"] + [
        f"class{index}" for index in range(1, NUM_CLASSES + 1)])
    ids, cls_labels = [], {}
    for index in range(config.num_images):
        image_id = f"suite_{index:03d}"
        image, label = synthetic_image(np.random.default_rng((2026, index)), classes, config.image_hw)
        save_rgb_image(info.image_path(image_id), image)
        save_palette_png(info.gt_path(image_id), label)
        present = sorted(int(value) for value in np.unique(label) if 0 < value != IGNORE_LABEL)
        multi_hot = np.zeros(NUM_CLASSES, dtype=np.float32)
        multi_hot[[value - 1 for value in present]] = 1
        cls_labels[image_id] = multi_hot
        scores = {key: (label == key).astype(np.float32) for key in [0] + present}
        for folder in ("crf_la", "crf_ha"):
            save_npy(os.path.join(root, folder, f"{image_id}.npy"), scores)
        ids.append(image_id)
    return info, ids, cls_labels


def training_args(suite: Suite, session: str, batch_size: int, lr: float, momentum: float) -> argparse.Namespace:
    """The flags ``build_trainer`` reads, as the train scripts would pass them (no resume, no saving)."""
    return argparse.Namespace(lr=lr, wt_dec=5e-4, momentum=momentum, batch_size=batch_size, seed=0,
                              max_epoches=1, save_dir=os.path.join(suite.work_dir, "train"),
                              session_name=session, save_every=0, amp=True, resume=None)


def fixed_batches(dataset: torch.utils.data.Dataset, batch_size: int, count: int = 2) -> list:
    """``count`` collated batches of ``dataset`` (indices cycled), built once outside the timing."""
    return [default_collate([dataset[(start * batch_size + offset) % len(dataset)] for offset in range(batch_size)])
            for start in range(count)]


def pinned(batch: Any, suite: Suite) -> Any:
    """Pin a CPU batch on CUDA machines, as ``make_loader`` (pin_memory) delivers it."""
    if isinstance(batch, torch.Tensor):
        return batch.pin_memory() if suite.cuda else batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(pinned(item, suite) for item in batch)
    return batch


def train_rates(suite: Suite, trainer, batches: list, forward_loss: Callable[[Any], tuple]) -> dict[str, Any]:
    """Images/s of ``forward_loss`` + ``Trainer.step``, and of the same step without the Trainer.

    ``forward_loss(batch)`` returns (total loss, logged terms, batch size). The second rate
    (plain zero_grad/backward/SGD/schedule) isolates what the Trainer adds per step: the NaN
    guard's device-to-host read, the CSV line, the all-reduce.
    """
    counter = {"index": 0}

    def next_batch() -> Any:
        counter["index"] += 1
        return batches[counter["index"] % len(batches)]

    def with_trainer() -> int:
        total, terms, size = forward_loss(next_batch())
        trainer.step(total, terms)
        return size

    def plain() -> int:
        total, _, size = forward_loss(next_batch())
        trainer.optimizer.zero_grad(set_to_none=True)
        total.backward()
        trainer.optimizer.step()
        trainer.scheduler.step()
        return size

    half = suite.config.budget_s / 2
    trained = suite.measure(with_trainer, half)
    raw = suite.measure(plain, half, warmup=1)
    result = {"rate": trained["rate"], "unit": "images/s", "steps": trained["iterations"],
              "rate_without_trainer": raw["rate"], "trainer_cost": raw["rate"] / trained["rate"] - 1.0}
    if suite.cuda:
        result["host_syncs_per_step"] = count_host_syncs(with_trainer)
        result["host_syncs_per_step_without_trainer"] = count_host_syncs(plain)
    return result


def count_host_syncs(step: Callable[[], Any]) -> int:
    """How many times one call of ``step`` makes the host wait for the GPU (CUDA only).

    ``torch.cuda.set_sync_debug_mode('warn')`` warns at every synchronising CUDA call (a
    ``.item()``, ``.tolist()``, a blocking copy); the warnings of one step are counted.
    """
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(warning.message).lower() for warning in caught)


# --------------------------------------------------------------------------- stages
def stage_avc_train(suite: Suite) -> dict[str, Any]:
    config = suite.config
    torch.manual_seed(0)
    dataset = ClassificationDataset(suite.info, suite.ids, suite.cls_labels, crop_size=config.crop,
                                    resize_long=(config.crop, round(config.crop * 768 / 448)), seed=0)
    model = AVCNet(num_classes=NUM_CLASSES, width_mult=config.width)
    trainer, _ = build_trainer(model, 1000 * config.avc_batch, training_args(suite, "avc", config.avc_batch, 0.01, 0.0),
                               suite.dist, ("cls", "min_pool", "er", "ecr", "avc_cross", "avc_sem"),
                               max_step=10 ** 6)
    trainer.model.train()
    batches = [pinned(batch, suite) for batch in fixed_batches(dataset, config.avc_batch)]
    layouts = {}

    def forward_loss(batch: Any) -> tuple:
        _, images, labels = batch
        images = trainer.images_to_device(images)
        layouts["input_channels_last"] = images.is_contiguous(memory_format=torch.channels_last)
        with trainer.autocast():
            terms = avc_training_losses(trainer.model, images, labels.to(suite.device, non_blocking=True),
                                        scale=0.3)
        return terms.pop("total"), terms, images.shape[0]

    result = train_rates(suite, trainer, batches, forward_loss)
    weight = unwrap_model(trainer.model).conv1a.weight  # a 3x3 kernel: 1x1 ones are contiguous either way
    return {**result, **layouts, "batch": config.avc_batch, "crop": config.crop,
            "model_channels_last": weight.is_contiguous(memory_format=torch.channels_last),
            "autocast": "bf16" if suite.cuda else "none (CPU)"}


def stage_avc_loader(suite: Suite) -> dict[str, Any]:
    config = suite.config
    # A long epoch (as train_aug's 1322 batches), so worker start-up at each epoch weighs as little as there.
    ids = suite.ids * (1 + 4096 // len(suite.ids))
    dataset = ClassificationDataset(suite.info, ids, suite.cls_labels, crop_size=config.crop,
                                    resize_long=(config.crop, round(config.crop * 768 / 448)), seed=0)
    sampler = EpochBatchSampler(len(dataset), config.avc_batch, seed=0)
    epoch = {"iterator": None, "number": 0}

    def next_batch() -> int:
        while True:
            if epoch["iterator"] is None:
                sampler.set_epoch(epoch["number"])
                epoch["number"] += 1
                epoch["iterator"] = iter(make_loader(dataset, sampler, config.num_workers))
            try:
                _, images, _ = next(epoch["iterator"])
                return images.shape[0]
            except StopIteration:
                epoch["iterator"] = None

    measured = suite.measure(next_batch, warmup=1)  # the warm-up batch starts the workers
    epoch["iterator"] = None
    return {"rate": measured["rate"], "unit": "images/s", "num_workers": config.num_workers,
            "batches": measured["iterations"]}


def eval_model(model: torch.nn.Module, suite: Suite) -> torch.nn.Module:
    """Eval mode on the device, channels_last on CUDA (as ``load_for_inference``)."""
    model = model.to(suite.device).eval()
    return model.to(memory_format=torch.channels_last) if suite.cuda else model


def seed_items(suite: Suite) -> list[dict[str, Any]]:
    dataset = MultiScaleDataset(suite.info, suite.ids, suite.cls_labels, scales=SEED_SCALES)
    return [dataset[index] for index in range(len(dataset))]


def stage_cam_guard(suite: Suite) -> dict[str, Any]:
    """bf16 autocast against float32 CAMs of the same untrained network on the same images.

    On CUDA the bf16 side is the pipeline's own path (``forward_views(amp=True)``); on CPU, where
    the pipeline runs float32, the check wraps the same call in a CPU bf16 autocast so that
    the comparison still computes something.
    """
    torch.manual_seed(0)
    model = eval_model(AVCNet(num_classes=NUM_CLASSES, width_mult=suite.config.width), suite)

    def class_cams(batch: torch.Tensor) -> torch.Tensor:
        return model.forward_cam(batch)[:, 1:]

    raw_diff = fused_diff = 0.0
    raw_scale = 0.0
    argmax_same = argmax_total = seed_same = seed_total = 0
    for item in seed_items(suite)[:4]:
        hw = item["image"].shape[:2]
        label = item["label"].numpy()
        with full_float32():
            fp32 = forward_views(class_cams, item["views"], hw, device=suite.device, amp=False)
        if suite.cuda:
            bf16 = forward_views(class_cams, item["views"], hw, device=suite.device, amp=True)
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                bf16 = forward_views(class_cams, item["views"], hw, device=suite.device, amp=False)
        raw_diff = max(raw_diff, float((bf16.float() - fp32).abs().max()))
        raw_scale = max(raw_scale, float(fp32.abs().max()))
        fused = [fuse_cams(cams.float().cpu().numpy(), label, clip=True) for cams in (fp32, bf16)]
        fused_diff = max(fused_diff, float(np.abs(fused[0] - fused[1]).max()))
        argmax = [cams.float().sum(0).argmax(0) for cams in (fp32, bf16)]
        argmax_same += int((argmax[0] == argmax[1]).sum())
        argmax_total += argmax[0].numel()
        seeds = [seed_from_cam_dict(cam_dict_from(norm, label), NUM_CLASSES, 0.26, hw) for norm in fused]
        seed_same += int((seeds[0] == seeds[1]).sum())
        seed_total += seeds[0].size
    return {"rate": None, "unit": "", "raw_cam_max_abs_diff": raw_diff, "raw_cam_max_abs": raw_scale,
            "fused_cam_max_abs_diff": fused_diff, "argmax_agreement": argmax_same / argmax_total,
            "seed_agreement": seed_same / seed_total,
            "autocast": "cuda bf16 (pipeline path)" if suite.cuda else "cpu bf16 (explicit)",
            "reference": "float32, TF32 off"}


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """No TF32 in the block (cuDNN convolutions use it by default on CUDA): a true float32 reference."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def seed_rate(suite: Suite, with_crf: bool) -> dict[str, Any]:
    """Images/s of infer_seed.py's per-image work: views -> CAMs -> fusion -> seed (-> CRF dicts)."""
    torch.manual_seed(0)
    model = eval_model(AVCNet(num_classes=NUM_CLASSES, width_mult=suite.config.width), suite)
    items = seed_items(suite)
    out_crf = os.path.join(suite.work_dir, "crf_out", "crf")
    workers = suite.config.num_workers
    # As infer_seed.py: the CRF in a process pool beside the network, inline without workers.
    pool = get_context("spawn").Pool(workers) if with_crf and workers > 0 else None
    pending: list = []
    counter = {"index": 0}

    def class_cams(batch: torch.Tensor) -> torch.Tensor:
        return model.forward_cam(batch)[:, 1:]

    def one_image() -> int:
        item = items[counter["index"] % len(items)]
        counter["index"] += 1
        label = item["label"].numpy()
        hw = item["image"].shape[:2]
        cams = forward_views(class_cams, item["views"], hw, align_corners=False, device=suite.device)
        cam_dict = cam_dict_from(fuse_cams(cams.float().cpu().numpy(), label, clip=True), label)
        seed_from_cam_dict(cam_dict, NUM_CLASSES, 0.26, hw)
        crf_args = (item["image"], cam_dict, item["id"], out_crf, (LOW_ALPHA, HIGH_ALPHA))
        if with_crf and pool is None:
            write_crf_dicts(*crf_args)
        elif pool is not None:
            pending.append(pool.apply_async(write_crf_dicts, crf_args))
            while len(pending) > 4 * workers:  # infer_seed.py's bound on the queue
                pending.pop(0).get()
        return 1

    try:
        if pool is not None:  # start the workers (spawn imports) outside the timing
            for _ in range(workers):
                one_image()
            while pending:
                pending.pop(0).get()
        suite.synchronize()
        start = time.perf_counter()
        measured = suite.measure(one_image, warmup=0 if pool is not None else None)
        while pending:
            pending.pop(0).get()
        seconds = time.perf_counter() - start
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    result = {"rate": measured["items"] / seconds, "unit": "images/s", "images": measured["items"],
              "views": 2 * len(SEED_SCALES)}
    if suite.cuda and pool is None:
        result["host_syncs_per_image"] = count_host_syncs(one_image)
    if with_crf:
        result["crf_processes"] = workers if pool is not None else "inline"
    return result


def stage_seed_infer(suite: Suite) -> dict[str, Any]:
    return seed_rate(suite, with_crf=False)


def stage_seed_infer_crf(suite: Suite) -> dict[str, Any]:
    return seed_rate(suite, with_crf=True)


def stage_aff_train(suite: Suite) -> dict[str, Any]:
    config = suite.config
    torch.manual_seed(0)
    dataset = AffinityDataset(suite.info, suite.ids, os.path.join(suite.work_dir, "crf_la"),
                              os.path.join(suite.work_dir, "crf_ha"), crop_size=config.crop, radius=5, seed=0)
    model = AffinityNet(width_mult=config.width, radius=5)
    trainer, _ = build_trainer(model, 1000 * config.aff_batch, training_args(suite, "aff", config.aff_batch, 0.1, 0.0),
                               suite.dist, ("bg", "fg", "neg"), max_step=10 ** 6)
    trainer.model.train()
    batches = [pinned(batch, suite) for batch in fixed_batches(dataset, config.aff_batch)]

    def forward_loss(batch: Any) -> tuple:
        _, images, pair_labels = batch
        images = trainer.images_to_device(images)
        bg_pos, fg_pos, neg = (labels.to(suite.device, non_blocking=True) for labels in pair_labels)
        with trainer.autocast():
            affinities = trainer.model(images)
        terms = affinity_loss(affinities, bg_pos, fg_pos, neg)
        return terms.pop("total"), terms, images.shape[0]

    return {**train_rates(suite, trainer, batches, forward_loss), "batch": config.aff_batch, "crop": config.crop}


def stage_random_walk(suite: Suite) -> dict[str, Any]:
    """Seconds per image: AffinityNet graph, sparse walk on GPU and CPU, dense matrix power."""
    torch.manual_seed(0)
    model = eval_model(AffinityNet(width_mult=suite.config.width, radius=5), suite)
    cases = []
    for image_id in suite.ids[:2]:
        image = T.normalize(read_rgb_image(suite.info.image_path(image_id)))
        hw = image.shape[:2]
        padded_h, padded_w = padded_size(hw)
        padded = np.pad(image, ((0, padded_h - hw[0]), (0, padded_w - hw[1]), (0, 0)))
        label = read_label_png(suite.info.gt_path(image_id))
        cam_dict = {int(key) - 1: (label == key).astype(np.float32) for key in np.unique(label)
                    if 0 < key != IGNORE_LABEL}
        cases.append((torch.from_numpy(T.hwc_to_chw(padded))[None], cam_dict, hw))
    counter = {"index": 0}

    def graph_of(case: tuple):
        with torch.inference_mode():
            return model.affinity_graph(images_to_device(case[0], suite.device))

    graphs = [graph_of(case) for case in cases]
    graphs_cpu = [type(graph)(graph.weights.cpu(), graph.ind_from.cpu(), graph.ind_to.cpu(), graph.feat_hw)
                  for graph in graphs]
    scores = [rw_scores_from_cam_dict(case[1], NUM_CLASSES, RW_ALPHA, case[2]) for case in cases]
    budget = suite.config.budget_s / 5
    result: dict[str, Any] = {"rate": None, "unit": "", "nodes": graphs[0].num_nodes,
                              "grid": list(graphs[0].feat_hw)}

    def per_image(walk: Callable[[int], Any], name: str) -> list:
        outputs = {}

        def step() -> int:
            index = counter["index"] % len(cases)
            counter["index"] += 1
            outputs[index] = walk(index)
            return 1

        if suite.cuda:  # each variant's own peak; the stage's is the largest of them
            result["peak_gpu_mib"] = max(result.get("peak_gpu_mib", 0.0),
                                         torch.cuda.max_memory_allocated(suite.device) / 2 ** 20)
            torch.cuda.reset_peak_memory_stats(suite.device)
        measured = suite.measure(step, budget, warmup=1)
        result[f"{name}_s_per_image"] = measured["seconds"] / measured["items"]
        if suite.cuda:
            result[f"{name}_peak_gpu_mib"] = torch.cuda.max_memory_allocated(suite.device) / 2 ** 20
        return [outputs[index] for index in sorted(outputs)]

    with torch.inference_mode():
        per_image(lambda index: graph_of(cases[index]), "affinity_graph")
        gpu = per_image(lambda index: random_walk(graphs[index], scores[index]), "sparse_device")
        sparse_cpu = per_image(lambda index: random_walk(graphs_cpu[index], scores[index]), "sparse_cpu")
        labels = [random_walk_labels(walked, case[2]) for walked, case in zip(sparse_cpu, cases)]
        result["sparse_device_vs_cpu_label_agreement"] = float(np.mean(
            [np.mean(random_walk_labels(walked, case[2]) == ref) for walked, case, ref in zip(gpu, cases, labels)]))
        result["sparse_cpu_over_device"] = result["sparse_cpu_s_per_image"] / result["sparse_device_s_per_image"]
        if graphs[0].num_nodes <= suite.config.max_dense_nodes:
            for name, chosen in (("dense_device", graphs), ("dense_cpu", graphs_cpu)):
                dense = per_image(lambda index: dense_random_walk(chosen[index], scores[index]), name)
                result[f"{name}_over_sparse_device"] = (result[f"{name}_s_per_image"]
                                                        / result["sparse_device_s_per_image"])
                result[f"{name}_label_agreement"] = float(np.mean(
                    [np.mean(random_walk_labels(walked, case[2]) == ref)
                     for walked, case, ref in zip(dense, cases, labels)]))
        else:
            result["dense"] = f"skipped: {graphs[0].num_nodes} nodes > --max_dense_nodes"
    result["rate"] = 1.0 / (result["affinity_graph_s_per_image"] + result["sparse_device_s_per_image"])
    result["unit"] = "images/s (graph + walk)"
    return result


def stage_deeplab_train(suite: Suite) -> dict[str, Any]:
    config = suite.config
    torch.manual_seed(0)
    dataset = SegmentationDataset(suite.info, suite.ids, label_dir=None, crop_size=config.crop,
                                  scale_range=SCALE_RANGE, seed=0, augment=True, hsv_shift=HSV_SHIFT)
    model = DeepLabV1(num_classes=NUM_CLASSES, width_mult=config.width, bn_momentum=DEEPLAB_BN_MOMENTUM)
    trainer, _ = build_trainer(model, 1000 * config.deeplab_batch,
                               training_args(suite, "deeplab", config.deeplab_batch, 0.001, 0.9),
                               suite.dist, ("ce",), max_step=10 ** 6)
    trainer.model.train()
    batches = [pinned(batch, suite) for batch in fixed_batches(dataset, config.deeplab_batch)]

    def forward_loss(batch: Any) -> tuple:
        _, images, labels = batch
        images = trainer.images_to_device(images)
        labels = labels.to(suite.device, non_blocking=True)
        with trainer.autocast():
            logits = trainer.model(images)
        loss = segmentation_loss(logits, labels)
        return loss, {"ce": loss}, images.shape[0]

    return {**train_rates(suite, trainer, batches, forward_loss), "batch": config.deeplab_batch,
            "crop": config.crop}


def stage_deeplab_test(suite: Suite) -> dict[str, Any]:
    torch.manual_seed(0)
    model = eval_model(DeepLabV1(num_classes=NUM_CLASSES, width_mult=suite.config.width), suite)
    images = [read_rgb_image(suite.info.image_path(image_id)) for image_id in suite.ids]
    views = [multiscale_views(image, DEEPLAB_TEST_SCALES, flip=True) for image in images]
    counter = {"index": 0}

    def one_image() -> int:
        index = counter["index"] % len(images)
        counter["index"] += 1
        probs = predict_probabilities(model, views[index], images[index].shape[:2], device=suite.device)
        np.argmax(probs, axis=0)
        return 1

    measured = suite.measure(one_image)
    return {"rate": measured["rate"], "unit": "images/s", "views": 2 * len(DEEPLAB_TEST_SCALES),
            "images": measured["items"]}


def stage_ddp_step(suite: Suite) -> dict[str, Any]:
    """A real ``torchrun`` with 2 processes (NCCL on the one GPU, gloo on CPU); 1 process if 2 fail."""
    attempts = [(2, suite.cuda)]
    if suite.cuda:
        attempts.append((1, True))
    errors = []
    for nproc, use_cuda in attempts:
        result_path = os.path.join(suite.work_dir, f"ddp_{nproc}.json")
        outcome = run_torchrun(suite, nproc, use_cuda, result_path)
        if outcome is None:
            with open(result_path, encoding="utf-8") as handle:
                result = json.load(handle)
            result.update(rate=None, unit="", attempts_failed=errors)
            if not result["ranks_agree"]:
                result.update(status="failed", error="the ranks ended the step with different weights")
            return result
        errors.append(f"{nproc} process(es), {'nccl' if use_cuda else 'gloo'}: {outcome}")
    raise RuntimeError("; ".join(errors))


def run_torchrun(suite: Suite, nproc: int, use_cuda: bool, result_path: str) -> str | None:
    """None when the run wrote its result; else the reason (exit status and output tail)."""
    config = suite.config
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "bench.gpu_suite", "--ddp_worker", result_path, "--width", str(config.width),
               "--crop", str(config.crop), "--batch", str(max(config.avc_batch, nproc)),
               "--device", "cuda" if use_cuda else "cpu"]
    timeout = max(10.0, min(config.ddp_timeout_s, config.deadline_s - suite.elapsed()))
    # Its own process group, so a hung run (NCCL waiting on a peer) is killed with its ranks.
    process = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return f"timed out after {timeout:.0f} s"
    if process.returncode == 0 and os.path.isfile(result_path):
        return None
    lines = output.strip().splitlines()
    # The first error lines name the cause; torchrun's own summary at the end does not.
    errors = [line.strip() for line in lines if "error" in line.lower() and "errors.html" not in line][:3]
    return f"exit {process.returncode}: " + " | ".join(errors or lines[-4:])


def ddp_worker(result_path: str, width: float, crop: int, batch: int, use_cuda: bool) -> None:
    """One torchrun rank: 2 AVC steps and 1 DeepLab (SyncBatchNorm on CUDA) step; ranks must agree."""
    dist = setup_distributed(use_cuda=use_cuda)
    try:
        work_dir = tempfile.mkdtemp(prefix="gpu_suite_ddp_")
        args = argparse.Namespace(lr=0.01, wt_dec=5e-4, momentum=0.0, batch_size=batch, seed=0, max_epoches=1,
                                  save_dir=work_dir, session_name=f"avc{dist.rank}", save_every=0, amp=True,
                                  resume=None, width_mult=width, bn_momentum=0.1, weights=None,
                                  arch="deeplabv1_resnet38")
        generator = torch.Generator().manual_seed(1000 + dist.rank)  # each rank its own half batch
        per_rank = batch // dist.world_size
        torch.manual_seed(0)
        avc, _ = build_trainer(AVCNet(num_classes=NUM_CLASSES, width_mult=width), 1000 * batch, args, dist,
                               ("cls", "min_pool", "er", "ecr", "avc_cross", "avc_sem"), max_step=100)
        avc.model.train()
        start = time.perf_counter()
        for _ in range(2):
            images = avc.images_to_device(torch.randn(per_rank, 3, crop, crop, generator=generator))
            labels = (torch.rand(per_rank, NUM_CLASSES, generator=generator) > 0.8).float().to(dist.device)
            with avc.autocast():
                terms = avc_training_losses(avc.model, images, labels)
            avc.step(terms.pop("total"), terms)
        torch.manual_seed(0)
        deeplab_model = build_deeplab(args, SimpleNamespace(num_classes=NUM_CLASSES), dist)
        sync_bn = any(isinstance(module, torch.nn.SyncBatchNorm) for module in deeplab_model.modules())
        deeplab, _ = build_trainer(deeplab_model, 1000 * batch,
                                   argparse.Namespace(**{**vars(args), "session_name": f"deeplab{dist.rank}"}),
                                   dist, ("ce",), max_step=100)
        deeplab.model.train()
        images = deeplab.images_to_device(torch.randn(per_rank, 3, crop, crop, generator=generator))
        labels = torch.randint(0, NUM_CLASSES + 1, (per_rank, crop, crop), generator=generator).to(dist.device)
        with deeplab.autocast():
            logits = deeplab.model(images)
        loss = segmentation_loss(logits, labels)
        deeplab.step(loss, {"ce": loss})
        if dist.device.type == "cuda":
            torch.cuda.synchronize(dist.device)
        seconds = time.perf_counter() - start
        sums = [float(sum(p.detach().double().sum() for p in unwrap_model(trainer.model).parameters()))
                for trainer in (avc, deeplab)]
        gathered = all_gather_object(sums)
        if dist.is_main:
            backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
            agree = all(other == gathered[0] for other in gathered)
            atomic_write_text(result_path, json.dumps({
                "processes": dist.world_size, "backend": backend, "device": str(dist.device),
                "ranks_agree": agree, "sync_batchnorm": sync_bn, "seconds": seconds,
                "per_rank_batch": per_rank}))
        shutil.rmtree(work_dir, ignore_errors=True)
    finally:
        cleanup()


# --------------------------------------------------------------------------- SIPE, IRN, MSA, DeepLabV2
def scaled_resize_long(resize_long: Sequence[int], crop: int, published_crop: int) -> tuple[int, int]:
    """A method's long-side resize range at another crop (the tiny profile), in the same proportion."""
    low, high = (max(1, round(value * crop / published_crop)) for value in resize_long)
    return low, high


def method_flag_defaults(add_flags: Callable[[argparse.ArgumentParser], None]) -> argparse.Namespace:
    """The defaults of a method's own flags (its loss weights), as its training script parses them."""
    parser = argparse.ArgumentParser(add_help=False)
    add_flags(parser)
    return parser.parse_args([])


def stage_sipe_train(suite: Suite) -> dict[str, Any]:
    """train_seed.py --method sipe's step: METHODS["sipe"] network, losses, groups and clipping."""
    config, method = suite.config, METHODS["sipe"]
    torch.manual_seed(0)
    dataset = ClassificationDataset(suite.info, suite.ids, suite.cls_labels, crop_size=config.sipe_crop,
                                    resize_long=scaled_resize_long(method.training["resize_long"], config.sipe_crop,
                                                                   method.training["crop_size"]),
                                    seed=0, color_jitter=method.color_jitter, valid_mask=method.valid_mask)
    method_args = method_flag_defaults(method.add_flags)
    model = build_network(method, NUM_CLASSES, None, config.width, method_args)
    args = training_args(suite, "sipe", config.sipe_batch, method.training["lr"], method.momentum)
    args.wt_dec = method.training["wt_dec"]
    trainer, _ = build_trainer(model, 1000 * config.sipe_batch, args, suite.dist, method.loss_terms,
                               max_step=10 ** 6, group_specs=method.group_specs, clip_grad_norm=method.clip_grad_norm)
    trainer.model.train()
    batches = [pinned(batch, suite) for batch in fixed_batches(dataset, config.sipe_batch)]

    def forward_loss(batch: Any) -> tuple:
        images = trainer.images_to_device(batch[1])
        tensors = {"images": images, "labels": batch[2].to(suite.device, non_blocking=True),
                   "valid": batch[3].to(suite.device, non_blocking=True)}
        with trainer.autocast():
            terms = method.losses(trainer.model, tensors, method_args)
        return terms.pop("total"), terms, images.shape[0]

    return {**train_rates(suite, trainer, batches, forward_loss), "batch": config.sipe_batch,
            "crop": config.sipe_crop, "backbone": method.backbones[0],
            "autocast": "bf16" if suite.cuda else "none (CPU)"}


def stage_sipe_infer(suite: Suite) -> dict[str, Any]:
    """infer_seed.py's SIPE work per image: the method's scales x flip, IS-CAM fusion, arg-max seed."""
    method = METHODS["sipe"]
    torch.manual_seed(0)
    model = eval_model(build_network(method, NUM_CLASSES, None, suite.config.width), suite)
    dataset = MultiScaleDataset(suite.info, suite.ids, suite.cls_labels, scales=method.scales)
    items = [dataset[index] for index in range(len(dataset))]
    counter = {"index": 0}

    def one_image() -> int:
        item = items[counter["index"] % len(items)]
        counter["index"] += 1
        cams = image_cams(method, model, item["views"], item["label"].numpy(), item["image"].shape[:2], suite.device)
        cams.keys[np.argmax(cams.is_cam, axis=0)]  # the seed: arg-max with SIPE's own background
        return 1

    measured = suite.measure(one_image)
    result = {"rate": measured["rate"], "unit": "images/s", "views": 2 * len(method.scales),
              "images": measured["items"]}
    if suite.cuda:
        result["host_syncs_per_image"] = count_host_syncs(one_image)
    return result


def stage_irn_train(suite: Suite) -> dict[str, Any]:
    """train_irn.py's step: IrLabelDataset pair labels (the ground truth as IR labels), IRNet,
    boundary_training_terms, the Trainer (frozen backbone)."""
    config = suite.config
    torch.manual_seed(0)
    ir_label_dir = os.path.dirname(suite.info.gt_path(suite.ids[0]))
    dataset = IrLabelDataset(suite.info, suite.ids, ir_label_dir, crop_size=config.irn_crop, seed=0)
    model = IRNet(width_mult=config.width)
    args = training_args(suite, "irn", config.irn_batch, 0.1, 1e-4)  # train_irn.py's defaults
    args.wt_dec = 1e-4
    trainer, _ = build_trainer(model, 1000 * config.irn_batch, args, suite.dist, IRN_LOSS_TERMS, max_step=10 ** 6)
    trainer.model.train()
    batches = [pinned(batch, suite) for batch in fixed_batches(dataset, config.irn_batch)]
    path_index = dataset.path_index

    def forward_loss(batch: Any) -> tuple:
        _, images, pair_labels = batch
        images = trainer.images_to_device(images)
        bg_pos, fg_pos, neg = (labels.to(suite.device, non_blocking=True) for labels in pair_labels)
        with trainer.autocast():
            edge_out, dp_out = trainer.model(images)
        terms = boundary_training_terms(edge_out, dp_out, path_index, bg_pos, fg_pos, neg)
        return terms["total"], {name: terms[name] for name in IRN_LOSS_TERMS}, images.shape[0]

    return {**train_rates(suite, trainer, batches, forward_loss), "batch": config.irn_batch, "crop": config.irn_crop}


def stage_irn_seg_labels(suite: Suite) -> dict[str, Any]:
    """make_seg_labels.py --variant sipe per image: SegLabelDataset items (one-based CAM dicts with
    the background, here the one-hot ground truth), inference_edge, split_cam_dict, seg_label."""
    config, variant = suite.config, SEG_LABEL_VARIANTS["sipe"]
    cam_dir = os.path.join(suite.work_dir, "irn_cam")
    for image_id in suite.ids:
        label = read_label_png(suite.info.gt_path(image_id))
        save_npy(os.path.join(cam_dir, f"{image_id}.npy"),
                 {int(key): (label == key).astype(np.float32) for key in np.unique(label) if key != IGNORE_LABEL})
    dataset = SegLabelDataset(suite.info, suite.ids, cam_dir, variant.own_background)
    items = [dataset[index] for index in range(len(dataset))]
    torch.manual_seed(0)
    model = eval_model(IRNet(width_mult=config.width), suite)
    counter = {"index": 0}

    def one_image() -> int:
        item = items[counter["index"] % len(items)]
        counter["index"] += 1
        image_hw = tuple(item["image_hw"])
        with torch.inference_mode():
            edge = inference_edge(model, images_to_device(item["input"], suite.device), config.irn_infer_crop)
        class_ids, cams, background = split_cam_dict(item["cam_dict"], variant.own_background, image_hw,
                                                     source=item["cam_path"])
        seg_label(variant, edge.float(), class_ids, cams, background, image_hw, INFER_RADIUS, 10.0, 8)
        return 1

    measured = suite.measure(one_image)
    return {"rate": measured["rate"], "unit": "images/s (boundary + walk)", "images": measured["items"],
            "crop": config.irn_infer_crop, "variant": variant.name}


def stage_msa_train(suite: Suite) -> dict[str, Any]:
    """train_msa.py's step (image variant): the frozen SpixelNet's association, msa_losses (DCR, AP
    8 steps, IPC), msa_optimizer, poly 0.5, clip 1. From scratch (BatchNorm trains), as train_msa
    without --weights."""
    config = suite.config
    torch.manual_seed(0)
    dataset = MSAClassificationDataset(suite.info, suite.ids, suite.cls_labels, crop_size=config.msa_crop,
                                       resize_long=scaled_resize_long((320, 640), config.msa_crop, 480), seed=0)
    spixel = eval_model(SpixelNet(width_mult=config.width), suite)
    for parameter in spixel.parameters():
        parameter.requires_grad_(False)
    model = MSANet(NUM_CLASSES, config.width, widened=False, fixed_bn=False)
    args = training_args(suite, "msa", config.msa_batch, 0.1, 4e-5)  # train_msa.py's defaults
    args.wt_dec = 4e-5
    trainer, _ = build_trainer(model, 1000 * config.msa_batch, args, suite.dist, MSA_LOSS_TERMS, max_step=10 ** 6,
                               optimizer=msa_optimizer(model, args.lr, args.wt_dec, args.momentum),
                               poly_power=IPC_VARIANTS["image"].poly_power, clip_grad_norm=1.0)
    trainer.model.train()
    batches = [pinned(batch, suite) for batch in fixed_batches(dataset, config.msa_batch)]

    def forward_loss(batch: Any) -> tuple:
        _, images, labels, _ = batch
        images, labels = trainer.images_to_device(images), labels.to(suite.device, non_blocking=True)
        with torch.no_grad():  # the superpixel FCN is frozen
            association = spixel(images)
        with trainer.autocast():
            terms = msa_losses(trainer.model, images, labels, association, "image", ipc_weight=IPC_WEIGHT)
        return terms.pop("total"), terms, images.shape[0]

    return {**train_rates(suite, trainer, batches, forward_loss), "batch": config.msa_batch, "crop": config.msa_crop,
            "init": "scratch (BatchNorm trains)"}


def stage_deeplabv2_train(suite: Suite) -> dict[str, Any]:
    """train_deeplab.py --arch deeplabv2's step: its recipe's dataset, build_model (scratch: the
    BatchNorms train), accumulate_step over iter_size sub-batches (MSC loss), the Trainer."""
    config, segmenter = suite.config, SEGMENTERS["deeplabv2_resnet101"]
    recipe = segmenter.train
    torch.manual_seed(0)
    dataset = SegmentationDataset(suite.info, suite.ids, label_dir=None, crop_size=config.v2_crop,
                                  scale_range=recipe.scale_range, seed=0, augment=True, hsv_shift=recipe.hsv_shift,
                                  scale_choices=recipe.scale_choices)
    args = training_args(suite, "deeplabv2", config.v2_batch, recipe.lr, recipe.momentum)
    args.wt_dec, args.lr_update_every = recipe.wt_dec, recipe.lr_update_every
    args.arch, args.width_mult, args.weights, args.bn_momentum = segmenter.name, config.width, None, recipe.bn_momentum
    with contextlib.redirect_stdout(sys.stderr):  # its "training from scratch" line
        model = build_deeplab(args, SimpleNamespace(num_classes=NUM_CLASSES), suite.dist)
    trainer, _ = build_trainer(model, 1000 * config.v2_batch, args, suite.dist, segmenter.loss_names, max_step=10 ** 6)
    trainer.model.train()
    batches = [pinned(batch, suite) for batch in fixed_batches(dataset, config.v2_batch)]
    counter = {"index": 0}

    def step() -> int:
        counter["index"] += 1
        _, images, labels = batches[counter["index"] % len(batches)]
        images = trainer.images_to_device(images)
        labels = labels.to(suite.device, non_blocking=True)
        accumulate_step(trainer, trainer.model, segmenter, images, labels, recipe.iter_size, args.input_convention)
        return images.shape[0]

    measured = suite.measure(step)
    result = {"rate": measured["rate"], "unit": "images/s", "steps": measured["iterations"],
              "batch": config.v2_batch, "iter_size": recipe.iter_size, "crop": config.v2_crop, "init": args.init}
    if suite.cuda:
        result["host_syncs_per_step"] = count_host_syncs(step)
    return result


def stage_deeplabv2_test(suite: Suite) -> dict[str, Any]:
    """test_deeplab.py's DeepLabV2 forward: its test recipe (full image, MSC inside, no flip, bilinear)."""
    segmenter = SEGMENTERS["deeplabv2_resnet101"]
    recipe = segmenter.test
    torch.manual_seed(0)
    with contextlib.redirect_stdout(sys.stderr):
        model, start = segmenter.build(NUM_CLASSES, suite.config.width, None, segmenter.train.bn_momentum)
    model = eval_model(model, suite)
    images = [read_rgb_image(suite.info.image_path(image_id)) for image_id in suite.ids]
    views = [multiscale_views(image, recipe.scales, flip=recipe.flip) for image in images]
    counter = {"index": 0}

    def one_image() -> int:
        index = counter["index"] % len(images)
        counter["index"] += 1
        probs = predict_probabilities(model, views[index], images[index].shape[:2], device=suite.device,
                                      align_corners=recipe.align_corners, convention=start.input_convention)
        np.argmax(probs, axis=0)
        return 1

    measured = suite.measure(one_image)
    return {"rate": measured["rate"], "unit": "images/s", "views": len(recipe.scales) * (2 if recipe.flip else 1),
            "images": measured["items"]}


STAGES: dict[str, Callable[[Suite], dict[str, Any]]] = {
    "avc_train": stage_avc_train,
    "avc_loader": stage_avc_loader,
    "cam_guard": stage_cam_guard,
    "seed_infer": stage_seed_infer,
    "seed_infer_crf": stage_seed_infer_crf,
    "aff_train": stage_aff_train,
    "random_walk": stage_random_walk,
    "deeplab_train": stage_deeplab_train,
    "deeplab_test": stage_deeplab_test,
    "ddp_step": stage_ddp_step,
    # The later methods, after the original suite: a run short of time skips these first.
    "sipe_train": stage_sipe_train,
    "sipe_infer": stage_sipe_infer,
    "irn_train": stage_irn_train,
    "irn_seg_labels": stage_irn_seg_labels,
    "msa_train": stage_msa_train,
    "deeplabv2_train": stage_deeplabv2_train,
    "deeplabv2_test": stage_deeplabv2_test,
}

# name -> (stage, images processed, goal in minutes on one GPU or None)
PROJECTIONS: dict[str, tuple[str, float, float | None]] = {
    f"AVC training, train_aug x {AVC_EPOCHS} epochs": ("avc_train", VOC_TRAIN_AUG * AVC_EPOCHS, GOAL_AVC_TRAIN_MIN),
    "seed inference, VOC train": ("seed_infer", VOC_TRAIN, GOAL_SEED_TRAIN_MIN),
    "seed inference + CRF dicts, VOC train": ("seed_infer_crf", VOC_TRAIN, None),
    "seed inference, train_aug": ("seed_infer", VOC_TRAIN_AUG, None),
    "seed inference + CRF dicts, train_aug": ("seed_infer_crf", VOC_TRAIN_AUG, None),
    f"AffinityNet training, train_aug x {AFF_EPOCHS} epochs": ("aff_train", VOC_TRAIN_AUG * AFF_EPOCHS, None),
    "random walk (graph + walk), train_aug": ("random_walk", VOC_TRAIN_AUG, None),
    f"DeepLab training, {DEEPLAB_ITERS} iterations": ("deeplab_train", None, None),
    "DeepLab test, VOC val": ("deeplab_test", VOC_VAL, None),
    f"SIPE training, train_aug x {SIPE_EPOCHS} epochs": ("sipe_train", VOC_TRAIN_AUG * SIPE_EPOCHS, None),
    "SIPE seed inference, train_aug": ("sipe_infer", VOC_TRAIN_AUG, None),
    f"IRN training, train_aug x {IRN_EPOCHS} epochs": ("irn_train", VOC_TRAIN_AUG * IRN_EPOCHS, None),
    "IRN pseudo masks, train_aug": ("irn_seg_labels", VOC_TRAIN_AUG, None),
    f"MSA training, train_aug x {MSA_EPOCHS} epochs": ("msa_train", VOC_TRAIN_AUG * MSA_EPOCHS, None),
    f"DeepLabV2 training, {DEEPLABV2_ITERS} iterations x {DEEPLABV2_BATCH}":
        ("deeplabv2_train", DEEPLABV2_ITERS * DEEPLABV2_BATCH, None),
    "DeepLabV2 test, VOC val": ("deeplabv2_test", VOC_VAL, None),
}


# --------------------------------------------------------------------------- running and reporting
def run_stage(suite: Suite, name: str) -> dict[str, Any]:
    """One stage with its peak GPU memory and wall time; a failure is recorded, not raised."""
    left = suite.config.deadline_s - suite.elapsed()
    if left < 2 * suite.config.budget_s:
        return {"status": "skipped", "error": f"suite deadline: {left:.0f} s left of --deadline_s", "wall_s": 0.0}
    gc.collect()
    if suite.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(suite.device)
    start = time.perf_counter()
    try:
        result = {"status": "ok", **STAGES[name](suite)}
    except Exception as error:  # the suite goes on; the JSON says what broke and where
        result = {"status": "failed", "error": f"{type(error).__name__}: {error}",
                  "traceback": traceback.format_exc().strip().splitlines()[-8:]}
    result["wall_s"] = time.perf_counter() - start
    if suite.cuda:  # a stage that resets the peak itself (per variant) reports the earlier maximum
        result["peak_gpu_mib"] = max(result.get("peak_gpu_mib", 0.0),
                                     torch.cuda.max_memory_allocated(suite.device) / 2 ** 20)
    gc.collect()
    return result


def projections(results: Mapping[str, Mapping[str, Any]], config: SuiteConfig) -> list[dict[str, Any]]:
    """Minutes on one GPU and on 8 (linear scaling) from the measured rates."""
    rows = []
    for what, (stage, images, goal) in PROJECTIONS.items():
        rate = results.get(stage, {}).get("rate")
        if images is None:  # DeepLab: iterations x batch
            images = DEEPLAB_ITERS * config.deeplab_batch
        row: dict[str, Any] = {"what": what, "stage": stage, "images": images}
        if isinstance(rate, (int, float)) and rate > 0:
            row["minutes_1_gpu"] = images / rate / 60
            row["minutes_8_gpus"] = row["minutes_1_gpu"] / 8
            if goal is not None:
                row["goal_minutes_1_gpu"] = goal
                row["goal_met"] = row["minutes_1_gpu"] <= goal
        rows.append(row)
    return rows


def _number(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


STAGE_DETAILS = ("rate_without_trainer", "trainer_cost", "host_syncs_per_step", "host_syncs_per_step_without_trainer",
                 "host_syncs_per_image", "input_channels_last", "model_channels_last",
                 "num_workers", "crf_processes", "raw_cam_max_abs_diff", "raw_cam_max_abs",
                 "fused_cam_max_abs_diff", "argmax_agreement", "seed_agreement", "grid",
                 "affinity_graph_s_per_image", "sparse_device_s_per_image", "sparse_cpu_s_per_image",
                 "dense_device_s_per_image", "dense_cpu_s_per_image", "sparse_cpu_over_device",
                 "dense_device_over_sparse_device", "dense_cpu_over_sparse_device",
                 "sparse_device_vs_cpu_label_agreement", "dense_device_label_agreement",
                 "dense_cpu_label_agreement", "sparse_device_peak_gpu_mib", "dense_device_peak_gpu_mib", "dense",
                 "processes", "backend", "ranks_agree", "sync_batchnorm", "attempts_failed", "error")


def markdown(report: Mapping[str, Any]) -> str:
    meta, results = report["meta"], report["stages"]
    lines = [f"GPU suite, {meta['date']}, {meta['device_name']}, torch {meta['torch']}, CUDA {meta['cuda']}, "
             f"profile {meta['profile']} (width {meta['config']['width']}, images "
             f"{meta['config']['image_hw'][0]}x{meta['config']['image_hw'][1]}), {meta['wall_s']:.0f} s"
             + ("" if meta.get("complete", True) else " (partial: the run has not finished)"), "",
             "| stage | rate | unit | peak GPU MiB | wall s | status | details |", "|---|---|---|---|---|---|---|"]
    for name, result in results.items():
        details = "; ".join(f"{key} {_number(result[key])}" for key in STAGE_DETAILS if key in result)
        lines.append(f"| {name} | {_number(result.get('rate') or '-')} | {result.get('unit', '')} | "
                     f"{_number(result.get('peak_gpu_mib', '-'), 5)} | {_number(result.get('wall_s', 0.0))} | "
                     f"{result['status']} | {details.replace('|', '/')} |")
    lines += ["", "Projections from the measured rates (8 GPUs: linear scaling assumed, an upper bound):", "",
              "| what | images | minutes, 1 GPU | minutes, 8 GPUs | goal (1 GPU) |", "|---|---|---|---|---|"]
    for row in report["projections"]:
        goal = ""
        if "goal_met" in row:
            goal = f"<= {row['goal_minutes_1_gpu']:g} min: {'met' if row['goal_met'] else 'NOT met'}"
        lines.append(f"| {row['what']} | {row['images']} | {_number(row.get('minutes_1_gpu', '-'))} | "
                     f"{_number(row.get('minutes_8_gpus', '-'))} | {goal} |")
    lines.append("")
    loader, train = results.get("avc_loader", {}), results.get("avc_train", {})
    if loader.get("rate") and train.get("rate"):
        verdict = "keeps up with" if loader["rate"] >= train["rate"] else "STARVES"
        lines.append(f"Data: the AVC loader delivers {_number(loader['rate'])} images/s with "
                     f"{loader['num_workers']} workers; it {verdict} training at {_number(train['rate'])} images/s.")
    for row in report["projections"]:
        if "goal_minutes_1_gpu" in row or PROJECTIONS[row["what"]][2] is not None:
            goal = PROJECTIONS[row["what"]][2]
            verdict = ("met" if row["goal_met"] else "NOT met") if "goal_met" in row else "not measured"
            minutes = f" ({_number(row['minutes_1_gpu'])} min)" if "minutes_1_gpu" in row else ""
            lines.append(f"Goal: {row['what']} <= {goal:g} min on one {meta['device_name']}: {verdict}{minutes}.")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_suite", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for gpu_suite.json and gpu_suite.md (required)")
    parser.add_argument("--tiny", action="store_true", help="the tiny profile (CPU test sizes) instead of full")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--stages", nargs="+", choices=list(STAGES), default=None, help="run only these stages")
    parser.add_argument("--width", type=float, default=None, help="ResNet38 width multiplier (profile: 1.0 / 0.0625)")
    parser.add_argument("--budget_s", type=float, default=None, help="timed seconds per measurement (profile: 12)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations before each measurement")
    parser.add_argument("--deadline_s", type=float, default=None,
                        help="no stage starts after this many seconds of the suite (profile: 380)")
    parser.add_argument("--num_workers", type=int, default=None, help="data-loader workers and CRF processes")
    parser.add_argument("--crop", type=int, default=None, help="training crop (profile: 448)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (profile: torch's / 1)")
    parser.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ddp_worker", default=None, help=argparse.SUPPRESS)
    return parser


def config_from(args: argparse.Namespace) -> SuiteConfig:
    values = dict(PROFILES["tiny" if args.tiny else "full"])
    for flag in ("width", "budget_s", "warmup", "deadline_s", "num_workers", "crop", "threads"):
        if getattr(args, flag) is not None:
            values[flag] = getattr(args, flag)
    return SuiteConfig(**values)


def run_suite(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Parse the flags and run the suite (or, with the hidden ``--ddp_worker``, one torchrun rank);
    returns the report written to ``<out>/gpu_suite.json``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.ddp_worker:
        ddp_worker(args.ddp_worker, args.width, args.crop, args.batch, args.device == "cuda")
        return None
    if not args.out:
        parser.error("--out is required")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available")
    config = config_from(args)
    names = args.stages or list(STAGES)
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    meta = {"device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "profile": "tiny" if args.tiny else "full",
            "config": dataclasses.asdict(config), "argv": list(argv) if argv is not None else sys.argv[1:],
            "init": "random (no weights: throughput only)"}
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as work_dir, restore_threads(threads):
        suite = Suite(config, device, work_dir)
        print(f"gpu suite: device {device}, width {config.width}, images {config.image_hw}, "
              f"budget {config.budget_s} s per measurement; data ready in {suite.elapsed():.1f} s", flush=True)
        for name in names:
            suite.results[name] = run_stage(suite, name)
            result = suite.results[name]
            print(f"  {name}: {result['status']} {_number(result.get('rate') or '')} {result.get('unit', '')} "
                  f"({result['wall_s']:.1f} s){'  ' + result['error'] if 'error' in result else ''}", flush=True)
            # Written after every stage, so a run killed at its time limit still leaves its numbers.
            report = write_report(args.out, meta, suite.results, config, started,
                                  complete=name == names[-1])
    print(markdown(report), flush=True)
    return report


@contextlib.contextmanager
def restore_threads(threads: int) -> Iterator[None]:
    """Give torch back its CPU thread count (the suite may run inside another program, e.g. the tests)."""
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def write_report(out: str, meta: Mapping[str, Any], results: Mapping[str, Any], config: SuiteConfig,
                 started: float, complete: bool) -> dict[str, Any]:
    """``<out>/gpu_suite.json`` and ``<out>/gpu_suite.md`` from the stages measured so far."""
    report = {"meta": {**meta, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                       "wall_s": time.perf_counter() - started, "complete": complete},
              "stages": dict(results), "projections": projections(results, config)}
    atomic_write_text(os.path.join(out, "gpu_suite.json"), json.dumps(report, indent=1, default=str) + "\n")
    atomic_write_text(os.path.join(out, "gpu_suite.md"), markdown(report))
    return report


def main(argv: Sequence[str] | None = None) -> None:
    run_suite(argv)


if __name__ == "__main__":
    run_cli(main)
