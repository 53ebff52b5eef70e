"""The backbone table: name -> how to build it.

Every backbone follows one protocol: ``forward_as_dict(x)`` returns named multi-level
features, ``channels`` maps those names to channel counts, ``backbone_state_keys()`` lists
its own state-dict keys (what an ImageNet file must provide), ``freeze_pretrained()`` prepares
fine-tuning from pretrained weights, and a ``width_mult`` scales it down for CPU runs.
Heads take features by name and know nothing of the backbone's class.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch.nn as nn

from network.resnet import ResNet
from network.resnet38 import ResNet38


def _resnet(depth: int) -> Callable[..., ResNet]:
    def build(width_mult: float = 1.0, **options) -> ResNet:
        return ResNet(depth, width_mult, **options)
    build.__name__ = f"resnet{depth}"
    return build


BACKBONES: Dict[str, Callable[..., nn.Module]] = {
    "resnet38": ResNet38,   # PSA/SEAM names, output stride 8, ImageNet MXNet .params
    "resnet50": _resnet(50),    # torchvision names, resnet50-19c8e357.pth
    "resnet101": _resnet(101),  # torchvision names, resnet101-63fe2227.pth
}

# SIPE / IRN / MSA: last stage at stride 1 (output stride 16), no dilation.
OUTPUT_STRIDE_16 = {"strides": (2, 2, 2, 1), "dilations": (1, 1, 1, 1)}


def build_backbone(name: str, width_mult: float = 1.0, **options) -> nn.Module:
    """The backbone registered as ``name`` at ``width_mult`` (``options`` go to its constructor)."""
    try:
        constructor = BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}") from None
    return constructor(width_mult=width_mult, **options)
