"""The segmentation networks of stages 4-5 as one table: ``SEGMENTERS[name]``.

Each entry says how to build the network, how it starts (weights, frozen layers, the init
recorded with every result), the input convention, the loss and its logged terms, the
published training recipe (the defaults of ``train_deeplab.py --arch name``) and the test
forward (scales, flip, resize, CRF) that ``test_deeplab.py`` runs.

* ``deeplabv1_resnet38``: DeepLabV1-LargeFOV on ResNet38 (the seamv1-pseudovoc release).
* ``deeplabv2_resnet101``: DeepLabV2-ResNet101 + MSC (kazuto1011/deeplab-pytorch).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from network.deeplab import DEEPLAB_BN_MOMENTUM, DeepLabV1
from network.deeplabv2 import DeepLabV2MSC
from network.weights import DEEPLABV2_INITS, load_deeplabv2_init, start_from_weights
from tool.contract import IGNORE_LABEL
from tool.crf import DEEPLAB_TEST_CRF, DEEPLABV2_TEST_CRF, CrfParams


# --------------------------------------------------------------------------- losses
def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross entropy averaged over the pixels that are not 255 (0, not NaN, if there are none)."""
    per_pixel = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_LABEL, reduction="none")
    num_valid = (labels != IGNORE_LABEL).sum().clamp(min=1)
    return per_pixel.sum() / num_valid


def resize_labels_nearest(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(N, H, W) labels -> (N, h, w) by PIL's nearest rule: source index floor((i + 0.5) * H / h).

    The reference's ``resize_labels`` hands PIL (h, w) where it expects (width, height), so any
    non-square logit crashes its loss; this takes (h, w) in the right order (the fix).
    """
    height, width = labels.shape[-2:]
    rows = ((torch.arange(size[0], dtype=torch.float64) + 0.5) * height / size[0]).floor().long()
    cols = ((torch.arange(size[1], dtype=torch.float64) + 0.5) * width / size[1]).floor().long()
    rows, cols = rows.clamp(max=height - 1).to(labels.device), cols.clamp(max=width - 1).to(labels.device)
    return labels[:, rows][:, :, cols]


MSC_TERMS = ("ce_s1", "ce_s050", "ce_s075", "ce_max")


def msc_loss(outputs: Sequence[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """DeepLabV2's loss terms: cross entropy of [l1, l050, l075, max], each against the labels
    resized (nearest) to its logit size, averaged over the batch's non-255 pixels."""
    return {name: segmentation_loss(logits, resize_labels_nearest(labels, logits.shape[-2:]))
            for name, logits in zip(MSC_TERMS, outputs)}


def v1_loss(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"ce": segmentation_loss(logits, labels)}


# --------------------------------------------------------------------------- starts
@dataclasses.dataclass(frozen=True)
class Start:
    """How a network started: ``init`` (recorded with every result) and its input convention."""

    init: str
    input_convention: str = "torchvision"

    def describe(self) -> str:
        return DEEPLABV2_INITS.get(self.init, self.init)


def _build_v1(num_classes: int, width_mult: float, weights: str | None, bn_momentum: float) -> tuple[nn.Module, Start]:
    model = DeepLabV1(num_classes=num_classes, width_mult=width_mult, bn_momentum=bn_momentum)
    start_from_weights(model, weights)
    return model, Start("scratch" if weights is None else f"backbone of {os.path.basename(weights)}")


def _build_v2(num_classes: int, width_mult: float, weights: str | None, bn_momentum: float) -> tuple[nn.Module, Start]:
    # From scratch the BatchNorms must learn (the reference always starts from weights, frozen).
    model = DeepLabV2MSC(num_classes=num_classes, width_mult=width_mult, frozen_bn=weights is not None)
    if weights is None:
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = bn_momentum
        # Each residual branch starts at zero (its last BN scale 0, Goyal et al. 2017): 33 blocks
        # summed at full scale blow the ASPP logits up in the first steps from scratch.
        for name, module in model.named_modules():
            if name.endswith(".increase"):
                nn.init.zeros_(module.bn.weight)
        print("DeepLabV2MSC: no --weights, training from scratch (BatchNorm trains, residual BN scales 0)")
        return model, Start("scratch")
    kind, convention, _ = load_deeplabv2_init(model, weights)
    return model, Start(kind, convention)


# --------------------------------------------------------------------------- the table
@dataclasses.dataclass(frozen=True)
class TrainRecipe:
    """Published training defaults (``train_deeplab.py`` flags)."""

    batch_size: int            # images per optimiser step
    iter_size: int             # sub-batches the step's gradient accumulates over
    max_iters: int
    lr: float
    wt_dec: float
    momentum: float
    crop_size: int
    lr_update_every: int       # poly lr recomputed every N steps
    scale_choices: tuple[float, ...] | None   # discrete rescale factors, or
    scale_range: tuple[float, float]          # a continuous range when scale_choices is None
    hsv_shift: tuple[int, int, int] | None
    bn_momentum: float         # BatchNorms that train (from scratch)


@dataclasses.dataclass(frozen=True)
class TestRecipe:
    scales: tuple[float, ...]
    flip: bool
    align_corners: bool        # how logits are resized to the image
    crf: CrfParams
    crf_channels: str          # channel order of the image the CRF sees ("rgb" / "bgr")


@dataclasses.dataclass(frozen=True)
class Segmenter:
    name: str
    title: str                 # how result tables name it
    build: Callable[[int, float, str | None, float], tuple[nn.Module, Start]]
    loss: Callable[[Any, torch.Tensor], dict[str, torch.Tensor]]
    loss_names: tuple[str, ...]
    train: TrainRecipe
    test: TestRecipe
    model_class: type          # declares new_layers (the 10x / 20x lr groups of parameter_groups)

    def build_for_inference(self, num_classes: int) -> Callable[[float], nn.Module]:
        """``build(width)`` for ``network.weights.load_for_inference`` (weights loaded after)."""
        if self.model_class is DeepLabV2MSC:
            return lambda width: DeepLabV2MSC(num_classes=num_classes, width_mult=width)
        return lambda width: DeepLabV1(num_classes=num_classes, width_mult=width)


SEGMENTERS: dict[str, Segmenter] = {
    "deeplabv1_resnet38": Segmenter(
        "deeplabv1_resnet38", "DeepLabV1-ResNet38", _build_v1, v1_loss, ("ce",),
        TrainRecipe(batch_size=10, iter_size=1, max_iters=20000, lr=0.001, wt_dec=5e-4, momentum=0.9,
                    crop_size=448, lr_update_every=1, scale_choices=None, scale_range=(0.5, 1.5),
                    hsv_shift=(10, 10, 10), bn_momentum=DEEPLAB_BN_MOMENTUM),
        TestRecipe(scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75), flip=True, align_corners=True,
                   crf=DEEPLAB_TEST_CRF, crf_channels="rgb"),
        DeepLabV1),
    "deeplabv2_resnet101": Segmenter(
        "deeplabv2_resnet101", "DeepLabV2-ResNet101", _build_v2, msc_loss, MSC_TERMS,
        TrainRecipe(batch_size=10, iter_size=2, max_iters=20000, lr=2.5e-4, wt_dec=5e-4, momentum=0.9,
                    crop_size=321, lr_update_every=10, scale_choices=(0.5, 0.75, 1.0, 1.25, 1.5),
                    scale_range=(0.5, 1.5), hsv_shift=None, bn_momentum=0.1),
        # Full image (the MSC model fuses 1, 0.5, 0.75 itself), no flip, bilinear resize.
        TestRecipe(scales=(1.0,), flip=False, align_corners=False, crf=DEEPLABV2_TEST_CRF, crf_channels="bgr"),
        DeepLabV2MSC),
}
ALIASES = {"deeplabv1": "deeplabv1_resnet38", "deeplabv2": "deeplabv2_resnet101"}


def get_segmenter(name: str) -> Segmenter:
    try:
        return SEGMENTERS[ALIASES.get(name, name)]
    except KeyError:
        raise ValueError(f"unknown segmenter {name!r}; known: {', '.join(SEGMENTERS)}") from None


def arch_of(saved_args: Mapping[str, Any], state_keys: Sequence[str] = ()) -> str:
    """The architecture of a checkpoint: its saved ``arch`` flag, else its key layout
    (``base.*`` = a DeepLabV2 release of the reference), else DeepLabV1 (older checkpoints)."""
    if saved_args.get("arch"):
        return ALIASES.get(str(saved_args["arch"]), str(saved_args["arch"]))
    if any(key.startswith("base.aspp.") for key in state_keys):
        return "deeplabv2_resnet101"
    return "deeplabv1_resnet38"

