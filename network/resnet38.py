"""ResNet38 (Wu et al. "wider or deeper", model A1) with the PSA/SEAM ``resnet38d`` names.

Module and parameter names equal those of the public converted weights, so released
PSA/SEAM ``.pth`` files and the ImageNet MXNet parameters load with a strict key check
(see ``network.weights``). A width multiplier scales every channel count while keeping
the topology, so the same code runs on CPU in tests.

Heads subclass :class:`ResNet38` and add their layers at the top level (``fc8.weight``
next to ``conv1a.weight``), as SEAM and PSA do.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from network.layers import replace_batchnorms, scaled_channels

# Top-level modules that make up the backbone; heads of subclasses are everything else.
BACKBONE_MODULES: Tuple[str, ...] = (
    "conv1a",
    "b2", "b2_1", "b2_2",
    "b3", "b3_1", "b3_2",
    "b4", "b4_1", "b4_2", "b4_3", "b4_4", "b4_5",
    "b5", "b5_1", "b5_2",
    "b6", "b7", "bn7",
)
# Not trained when fine-tuning from pretrained weights (SEAM/PSA freeze these too).
PRETRAINED_FROZEN_MODULES: Tuple[str, ...] = ("conv1a", "b2", "b2_1", "b2_2")


class ResBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU, 3x3 conv, BN-ReLU, 3x3 conv (+ 1x1 projection)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, stride: int = 1,
                 first_dilation: int | None = None, dilation: int = 1,
                 bn_momentum: float = 0.1) -> None:
        super().__init__()
        self.same_shape = in_channels == out_channels and stride == 1
        if first_dilation is None:
            first_dilation = dilation
        # Construction order = state_dict order of the reference (also its RNG draw order).
        self.bn_branch2a = nn.BatchNorm2d(in_channels, momentum=bn_momentum)
        self.conv_branch2a = nn.Conv2d(in_channels, mid_channels, 3, stride,
                                       padding=first_dilation, dilation=first_dilation, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(mid_channels, momentum=bn_momentum)
        self.conv_branch2b1 = nn.Conv2d(mid_channels, out_channels, 3,
                                        padding=dilation, dilation=dilation, bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward_with_bn_relu(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return (block output, the block's entry BN-ReLU activation)."""
        x_bn_relu = F.relu(self.bn_branch2a(x))
        shortcut = x if self.same_shape else self.conv_branch1(x_bn_relu)
        branch2 = self.conv_branch2a(x_bn_relu)
        branch2 = self.conv_branch2b1(F.relu(self.bn_branch2b1(branch2)))
        return shortcut + branch2, x_bn_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_bn_relu(x)[0]


class ResBlockBottleneck(nn.Module):
    """Pre-activation bottleneck: 1x1 (out/4), 3x3 dilated (out/2), 1x1 (out), with dropout."""

    def __init__(self, in_channels: int, mid1_channels: int, mid2_channels: int, out_channels: int,
                 stride: int = 1, dilation: int = 1, dropout: float = 0.0,
                 bn_momentum: float = 0.1) -> None:
        super().__init__()
        self.bn_branch2a = nn.BatchNorm2d(in_channels, momentum=bn_momentum)
        self.conv_branch2a = nn.Conv2d(in_channels, mid1_channels, 1, stride, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(mid1_channels, momentum=bn_momentum)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(mid1_channels, mid2_channels, 3,
                                        padding=dilation, dilation=dilation, bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(mid2_channels, momentum=bn_momentum)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(mid2_channels, out_channels, 1, bias=False)
        self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward_with_bn_relu(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x_bn_relu = F.relu(self.bn_branch2a(x))
        shortcut = self.conv_branch1(x_bn_relu)
        branch2 = self.conv_branch2a(x_bn_relu)
        branch2 = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(branch2))))
        branch2 = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(branch2))))
        return shortcut + branch2, x_bn_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_bn_relu(x)[0]


class ResNet38(nn.Module):
    """ResNet38 backbone, output stride 8. ``forward`` returns conv6 (4096*w channels)."""

    # Name prefixes of randomly initialised head layers (10x lr); subclasses override.
    new_layers: Tuple[str, ...] = ()

    def __init__(self, width_mult: float = 1.0, bn_momentum: float = 0.1, dropout: bool = True) -> None:
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        self.width_mult = width_mult
        c = lambda n: scaled_channels(n, width_mult)  # noqa: E731 - local shorthand
        m = bn_momentum

        self.conv1a = nn.Conv2d(3, c(64), 3, padding=1, bias=False)

        self.b2 = ResBlock(c(64), c(128), c(128), stride=2, bn_momentum=m)
        self.b2_1 = ResBlock(c(128), c(128), c(128), bn_momentum=m)
        self.b2_2 = ResBlock(c(128), c(128), c(128), bn_momentum=m)

        self.b3 = ResBlock(c(128), c(256), c(256), stride=2, bn_momentum=m)
        self.b3_1 = ResBlock(c(256), c(256), c(256), bn_momentum=m)
        self.b3_2 = ResBlock(c(256), c(256), c(256), bn_momentum=m)

        self.b4 = ResBlock(c(256), c(512), c(512), stride=2, bn_momentum=m)
        self.b4_1 = ResBlock(c(512), c(512), c(512), bn_momentum=m)
        self.b4_2 = ResBlock(c(512), c(512), c(512), bn_momentum=m)
        self.b4_3 = ResBlock(c(512), c(512), c(512), bn_momentum=m)
        self.b4_4 = ResBlock(c(512), c(512), c(512), bn_momentum=m)
        self.b4_5 = ResBlock(c(512), c(512), c(512), bn_momentum=m)

        self.b5 = ResBlock(c(512), c(512), c(1024), first_dilation=1, dilation=2, bn_momentum=m)
        self.b5_1 = ResBlock(c(1024), c(512), c(1024), dilation=2, bn_momentum=m)
        self.b5_2 = ResBlock(c(1024), c(512), c(1024), dilation=2, bn_momentum=m)

        self.b6 = ResBlockBottleneck(c(1024), c(512), c(1024), c(2048), dilation=4, dropout=0.3 if dropout else 0.0,
                                     bn_momentum=m)
        self.b7 = ResBlockBottleneck(c(2048), c(1024), c(2048), c(4096), dilation=4, dropout=0.5 if dropout else 0.0,
                                     bn_momentum=m)
        self.bn7 = nn.BatchNorm2d(c(4096), momentum=m)

        self.channels: Dict[str, int] = {
            "conv3": c(256), "conv4": c(512), "conv5": c(1024), "conv6": c(4096),
        }

    def forward_as_dict(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """conv3 (stride 4, b4's entry BN-ReLU), conv4/conv5 (b5/b6 entry), conv6 (bn7+ReLU)."""
        x = self.conv1a(x)
        x = self.b2_2(self.b2_1(self.b2(x)))
        x = self.b3_2(self.b3_1(self.b3(x)))
        x, conv3 = self.b4.forward_with_bn_relu(x)
        x = self.b4_5(self.b4_4(self.b4_3(self.b4_2(self.b4_1(x)))))
        x, conv4 = self.b5.forward_with_bn_relu(x)
        x = self.b5_2(self.b5_1(x))
        x, conv5 = self.b6.forward_with_bn_relu(x)
        x = self.b7(x)
        conv6 = F.relu(self.bn7(x))
        return {"conv3": conv3, "conv4": conv4, "conv5": conv5, "conv6": conv6}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_as_dict(x)["conv6"]

    def backbone_state_keys(self) -> list[str]:
        """State-dict keys that belong to the backbone (not to a subclass's head)."""
        return [k for k in self.state_dict() if k.split(".", 1)[0] in BACKBONE_MODULES]

    def freeze_pretrained(self) -> "ResNet38":
        """Prepare fine-tuning from pretrained weights (SEAM/PSA practice).

        Every backbone BatchNorm is replaced by a :class:`FrozenBatchNorm2d` (running
        statistics, no gradient, whatever ``train()`` says), and ``conv1a`` and ``b2*`` stop
        learning. State-dict keys are unchanged. Call it once, after construction (before or
        after loading weights). Heads of subclasses are untouched.
        """
        for top_name in BACKBONE_MODULES:
            replace_batchnorms(getattr(self, top_name), self, top_name)
        for top_name in PRETRAINED_FROZEN_MODULES:
            for parameter in getattr(self, top_name).parameters():
                parameter.requires_grad_(False)
        return self


def freeze_batchnorms(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d below ``module`` by a :class:`FrozenBatchNorm2d` (keys unchanged)."""
    for child_name, child in list(module.named_children()):
        replace_batchnorms(child, module, child_name)
    return module
