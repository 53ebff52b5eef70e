"""The seed-method table: one entry per seed classifier family, read by every stage script.

``METHODS[name]`` is a :class:`SeedMethod`; ``train_seed.py --method NAME`` trains it,
``infer_seed.py`` reads the method (and backbone, width) from the checkpoint and fuses the
way the entry says. Entries:

* ``avc``: SEAM + affinity vector consistency on ResNet38 (DESIGN.md "Stage 1").
* ``seam``: ``avc`` with the AVC weight 0 (exactly SEAM's total; the AVC terms are logged).
* ``sipe``: SIPE on ResNet-50 (output stride 16) - general CAM + IS-CAM, cls + GSC loss.
* ``ae_sipe``: SIPE with PAMR affinity enhancement of the IS-CAM (AE-SIPE).

MSA (``msa``: image IPC target; ``msa_sal``: saliency target) is a second, smaller table,
``MSA_METHODS`` of :class:`SpixelSeedMethod`, not ``METHODS`` entries: its classifier reads the
association of a separately trained, frozen superpixel FCN (train_scn.py) in every training step
and at inference, ``msa_sal`` also a saliency map per image, and its evaluator stretches each image
itself instead of taking the dataset's scale views. ``SeedMethod.losses(model, batch, args)`` and
its fusions have no slot for a second network or an extra input, and giving them one would change
every entry for one family; so ``train_msa.py`` trains MSA, ``infer_seed.py`` dispatches on
``MSA_METHODS``, and ``SEED_METHOD_NAMES`` / :func:`get_seed_method` cover both tables (what a
checkpoint may record, what run_pipeline.py offers). ``tests/test_methods.py`` runs the same
checks over every entry of both tables.

Adding a method = one :class:`SeedMethod` in ``METHODS``:

* ``network(num_classes, backbone, width_mult, args)`` -> the model (``args`` may be None at
  inference); the model declares its new layers in ``new_layers`` (10x lr groups);
* ``backbones``: the backbone names it runs on, the first is the default;
* ``add_flags(parser)``: its own flags (loss weights ``--<term>_weight`` ...);
* ``losses(model, batch, args)`` -> ``{term: tensor, ..., "total": tensor}`` for one batch
  (``batch`` = the dataset's tensors on the device: images, labels, and ``valid`` when the
  entry sets ``valid_mask``); ``loss_terms`` are the logged terms (CSV columns);
* ``training``: the defaults of the shared training flags (batch, epochs, lr, weight decay,
  momentum, crop, resize range, session name); ``group_specs``: learning-rate multipliers and
  weight decay per parameter group (tool.optim.GROUP_SPECS layout); ``clip_grad_norm``;
* ``color_jitter`` / ``valid_mask``: the training augmentation;
* ``fusion`` (``"seam"``: SEAM's min-max fusion of the refined CAM; ``"sipe"``: IS-CAMs
  summed over scales and max-normalised, background channel included) and ``scales``;
* ``writes``: what its inference writes, in words (for --help and the README).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from network.avc import AVCNet, avc_training_losses
from network.sipe import SIPENet, sipe_image_cams, sipe_losses, valid_mask_on_grid
from tool.cam import cam_dict_from, fuse_cams
from tool.cli import positive_float
from tool.multiscale import forward_views_many
from tool.optim import GROUP_SPECS, make_sgd, parameter_groups

Batch = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class SeedMethod:
    """One seed method; see the module docstring for each field."""

    name: str
    summary: str
    network: Callable[[int, str, float, argparse.Namespace | None], nn.Module]
    backbones: tuple[str, ...]
    loss_terms: tuple[str, ...]
    losses: Callable[[nn.Module, Batch, argparse.Namespace], Dict[str, torch.Tensor]]
    add_flags: Callable[[argparse.ArgumentParser], None]
    training: Mapping[str, Any]
    group_specs: tuple = GROUP_SPECS
    clip_grad_norm: float | None = None
    color_jitter: bool = True
    valid_mask: bool = False
    fusion: str = "seam"
    scales: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)
    writes: str = ""
    defaults: Mapping[str, Any] = field(default_factory=dict)  # method flags' defaults (seam: avc_weight 0)

    @property
    def momentum(self) -> float:
        return float(self.training["momentum"])


# ----------------------------------------------------------------------------- AVC / SEAM
AVC_TERMS = ("cls", "min_pool", "er", "ecr", "avc_cross", "avc_sem")


def _add_avc_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--view_scale", type=positive_float, default=0.3,
                        help="rescale factor of the second view (SEAM: 0.3)")
    parser.add_argument("--dropout", action=argparse.BooleanOptionalAction, default=True,
                        help="SEAM's dropout (b6 0.3, b7 0.5, before fc8 0.5); --no-dropout for the tiny-width "
                             "CPU models, where dropping whole channels of a few dozen stalls learning")
    weights = parser.add_argument_group("loss weights (--avc_weight 0 is exactly SEAM)")
    weights.add_argument("--avc_weight", type=float, default=1.0, help="weight of both AVC terms")
    weights.add_argument("--avc_cross_weight", type=float, default=1.0,
                         help="cross-view affinity-vector consistency term")
    weights.add_argument("--avc_sem_weight", type=float, default=1.0,
                         help="semantic affinity-vector term (affinity vs same-class indicator)")
    weights.add_argument("--er_weight", type=float, default=1.0, help="equivariant regularisation")
    weights.add_argument("--ecr_weight", type=float, default=1.0, help="equivariant cross regularisation")


def avc_loss_weights(args: argparse.Namespace) -> dict[str, float]:
    return {"avc": args.avc_weight, "avc_cross": args.avc_cross_weight, "avc_sem": args.avc_sem_weight,
            "er": args.er_weight, "ecr": args.ecr_weight}


def _avc_network(num_classes: int, backbone: str, width_mult: float,
                 args: argparse.Namespace | None) -> nn.Module:
    dropout = True if args is None else getattr(args, "dropout", True)
    return AVCNet(num_classes=num_classes, width_mult=width_mult, dropout=dropout)


def _avc_losses(model: nn.Module, batch: Batch, args: argparse.Namespace) -> Dict[str, torch.Tensor]:
    return avc_training_losses(model, batch["images"], batch["labels"], scale=args.view_scale,
                               weights=avc_loss_weights(args))


_AVC_TRAINING = {"batch_size": 8, "max_epoches": 8, "lr": 0.01, "wt_dec": 5e-4, "momentum": 0.0,
                 "crop_size": 448, "resize_long": (448, 768), "num_workers": 8}
_AVC_WRITES = ("CAM dicts of the PCM-refined CAM (SEAM's min-max fusion over scales and flips), "
               "seed PNGs at --out_cam_pred_alpha, low/high-alpha CRF dicts")


# ----------------------------------------------------------------------------- SIPE / AE-SIPE
SIPE_TERMS = ("cls", "gsc")


def _add_sipe_flags(parser: argparse.ArgumentParser) -> None:
    weights = parser.add_argument_group("loss weights (the reference: 1 and 1)")
    weights.add_argument("--cls_weight", type=float, default=1.0, help="multi-label soft margin on the pooled CAM")
    weights.add_argument("--gsc_weight", type=float, default=1.0,
                         help="general-specific consistency |CAM - IS-CAM / max|")


def _sipe_network(affinity_enhanced: bool) -> Callable[..., nn.Module]:
    def build(num_classes: int, backbone: str, width_mult: float, args: argparse.Namespace | None) -> nn.Module:
        return SIPENet(num_classes=num_classes, backbone=backbone, width_mult=width_mult,
                       affinity_enhanced=affinity_enhanced)
    return build


def feature_grid(height: int, width: int, halvings: int = 4) -> tuple[int, int]:
    """The stride-16 grid of the SIPE backbone: every stride-2 step maps n -> ceil(n / 2)."""
    for _ in range(halvings):
        height, width = -(-height // 2), -(-width // 2)
    return height, width


def _sipe_losses(model: nn.Module, batch: Batch, args: argparse.Namespace) -> Dict[str, torch.Tensor]:
    images, labels = batch["images"], batch["labels"].float()
    mask = valid_mask_on_grid(batch["valid"].to(images.device), labels, feature_grid(*images.shape[-2:]))
    out = model(images, mask)
    return sipe_losses(out, labels, {"cls": args.cls_weight, "gsc": args.gsc_weight})


# The reference schedule (README 7.1): its PolyOptimizerSGD passes weight_decay positionally into
# SGD's momentum slot, so the effective momentum is 1e-4 (the 0.9 is the poly power); weight decay
# 1e-4 on every trained tensor, biases and BN shifts included; new layers at 10x.
_SIPE_TRAINING = {"batch_size": 16, "max_epoches": 5, "lr": 0.1, "wt_dec": 1e-4, "momentum": 1e-4,
                  "crop_size": 512, "resize_long": (320, 640), "num_workers": 8}
SIPE_GROUP_SPECS = (("backbone_weight", 1.0, True), ("backbone_bias", 1.0, True),
                    ("new_weight", 10.0, True), ("new_bias", 10.0, True))
_SIPE_WRITES = ("CAM dicts of the foreground IS-CAM (scales summed, max-normalised), seed PNGs = arg-max "
                "with SIPE's own background channel, low/high-alpha CRF dicts; --out_is_cam: the "
                "reference's {'keys', 'IS_CAM'} dicts")


def _sipe_entry(name: str, affinity_enhanced: bool, summary: str) -> SeedMethod:
    return SeedMethod(
        name=name, summary=summary, network=_sipe_network(affinity_enhanced), backbones=("resnet50", "resnet101"),
        loss_terms=SIPE_TERMS, losses=_sipe_losses, add_flags=_add_sipe_flags,
        training={**_SIPE_TRAINING, "session_name": f"resnet50_{name}"}, group_specs=SIPE_GROUP_SPECS,
        clip_grad_norm=1.0, color_jitter=False, valid_mask=True, fusion="sipe", scales=(1.0, 0.5, 1.5, 2.0),
        writes=_SIPE_WRITES)


METHODS: Dict[str, SeedMethod] = {
    "avc": SeedMethod(
        name="avc", summary="SEAM + affinity vector consistency (ResNet38)", network=_avc_network,
        backbones=("resnet38",), loss_terms=AVC_TERMS, losses=_avc_losses, add_flags=_add_avc_flags,
        training={**_AVC_TRAINING, "session_name": "resnet38_avc"}, writes=_AVC_WRITES),
    "seam": SeedMethod(
        name="seam", summary="SEAM (avc with --avc_weight 0)", network=_avc_network,
        backbones=("resnet38",), loss_terms=AVC_TERMS, losses=_avc_losses, add_flags=_add_avc_flags,
        training={**_AVC_TRAINING, "session_name": "resnet38_seam"}, writes=_AVC_WRITES,
        defaults={"avc_weight": 0.0}),
    "sipe": _sipe_entry("sipe", False, "SIPE, image-specific prototypes + GSC (ResNet-50, CVPR 2022)"),
    "ae_sipe": _sipe_entry("ae_sipe", True, "AE-SIPE, SIPE + PAMR affinity enhancement (ResNet-50)"),
}


# ----------------------------------------------------------------------------- MSA
@dataclass(frozen=True)
class SpixelSeedMethod:
    """A seed method whose classifier reads a frozen superpixel FCN (MSA; see the module docstring).

    ``variant``: its IPC target (network.msa.IPC_VARIANTS); ``sum_at``: where the evaluator sums
    the scales (network.msa.msa_cams); ``pixel_supervised``: its input comes from a detector
    trained with pixel labels (the saliency variant); the other fields as :class:`SeedMethod`'s.
    """

    name: str
    summary: str
    variant: str
    sum_at: str
    pixel_supervised: bool
    writes: str
    backbones: tuple[str, ...] = ("resnet50",)
    loss_terms: tuple[str, ...] = ("cls", "ipc")
    scales: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)  # the reference evaluator's, each with its mirror
    fusion: str = "msa"
    trained_by: str = "train_msa.py"


_MSA_WRITES = ("CAM dicts of the AP logits brought to full resolution through the superpixel association "
               "(scales and mirrors summed, max-normalised), seed PNGs at --out_cam_pred_alpha, low/high-alpha "
               "CRF dicts")
MSA_METHODS: Dict[str, SpixelSeedMethod] = {
    "msa": SpixelSeedMethod(
        name="msa", summary="MSA, superpixel DCR + affinity propagation + image IPC (ResNet-50)",
        variant="image", sum_at="image", pixel_supervised=False, writes=_MSA_WRITES),
    "msa_sal": SpixelSeedMethod(
        name="msa_sal", summary="MSA with saliency IPC (ResNet-50; saliency maps: pixel-supervised)",
        variant="saliency", sum_at="saliency", pixel_supervised=True, writes=_MSA_WRITES),
}
# Every seed method a checkpoint may record, both tables.
SEED_METHOD_NAMES: tuple[str, ...] = (*METHODS, *MSA_METHODS)


def get_seed_method(name: str) -> SeedMethod | SpixelSeedMethod:
    """The entry of ``name`` in either table."""
    if name in MSA_METHODS:
        return MSA_METHODS[name]
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown seed method {name!r}; known: {', '.join(SEED_METHOD_NAMES)}") from None


def get_method(name: str) -> SeedMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown seed method {name!r}; known: {', '.join(METHODS)}") from None


def build_network(method: SeedMethod, num_classes: int, backbone: str | None = None, width_mult: float = 1.0,
                  args: argparse.Namespace | None = None) -> nn.Module:
    """The method's network on ``backbone`` (default: its first) at ``width_mult``."""
    backbone = backbone or method.backbones[0]
    if backbone not in method.backbones:
        raise ValueError(f"method {method.name} runs on {', '.join(method.backbones)}, not {backbone}")
    return method.network(num_classes, backbone, width_mult, args)


def build_optimizer(method: SeedMethod, model: nn.Module, lr: float, weight_decay: float,
                    momentum: float) -> torch.optim.SGD:
    """SGD over the method's parameter groups (what build_trainer makes for it)."""
    return make_sgd(parameter_groups(model, lr, weight_decay, group_specs=method.group_specs), momentum=momentum)


@dataclass
class ImageCams:
    """One image's inference result: the CAM dict (0-based foreground classes, HxW in [0, 1]) and,
    for the SIPE fusion, the reference's ``keys`` / ``IS_CAM`` (background channel first)."""

    cam_dict: Dict[int, np.ndarray]
    keys: np.ndarray | None = None
    is_cam: np.ndarray | None = None


def image_cams(method: SeedMethod, model: nn.Module, views: Sequence[torch.Tensor], label: np.ndarray,
               image_hw: tuple[int, int], device: torch.device, seam_cam_norm: bool = False,
               amp: bool = True) -> ImageCams:
    """Multi-scale + flip CAMs of one image, fused the way ``method.fusion`` says; ``amp``: bf16 on
    CUDA (a CPU forward is bf16 inside ``tool.device.inference_autocast``)."""
    return image_cams_many(method, model, [views], [label], [image_hw], device, seam_cam_norm, amp)[0]


def image_cams_many(method: SeedMethod, model: nn.Module, views_per_image: Sequence[Sequence[torch.Tensor]],
                    labels: Sequence[np.ndarray], image_sizes: Sequence[tuple[int, int]], device: torch.device,
                    seam_cam_norm: bool = False, amp: bool = True) -> list[ImageCams]:
    """:func:`image_cams` of several images; the SEAM fusion shares one forward per view shape
    across the images (the batched GPU path), SIPE's runs image by image."""
    if method.fusion == "sipe":
        results = []
        for views, label, image_hw in zip(views_per_image, labels, image_sizes):
            keys, fused = sipe_image_cams(model, views, torch.from_numpy(np.asarray(label)), image_hw, device, amp)
            keys, fused = keys.numpy().astype(np.int64), fused.numpy().astype(np.float32)
            cam_dict = {int(k) - 1: np.ascontiguousarray(fused[i]) for i, k in enumerate(keys) if k > 0}
            results.append(ImageCams(cam_dict, keys, fused))
        return results

    def class_cams(batch: torch.Tensor) -> torch.Tensor:
        return model.forward_cam(batch)[:, 1:]  # drop the background channel, as SEAM

    maps = forward_views_many(class_cams, views_per_image, image_sizes, align_corners=False, device=device, amp=amp)
    return [fuse_seam_views(view_cams.float().cpu().numpy(), label, seam_cam_norm)
            for view_cams, label in zip(maps, labels)]


def fuse_seam_views(view_cams: np.ndarray, label: np.ndarray, seam_cam_norm: bool = False) -> ImageCams:
    """SEAM's fusion of the per-view class CAMs (V, C, H, W) at the image size into a CAM dict."""
    return ImageCams(cam_dict_from(fuse_cams(view_cams, label, clip=not seam_cam_norm), label))


def method_names() -> Sequence[str]:
    return tuple(METHODS)
