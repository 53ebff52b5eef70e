"""DeepLabV2-ResNet101 with multi-scale input (kazuto1011/deeplab-pytorch, ``DeepLabV2_ResNet101_MSC``).

The Caffe (MSRA) ResNet-101, not torchvision's: the stride sits in the 1x1 ``reduce``
convolution, the stem pool rounds up (``ceil_mode``), layer4 / layer5 are dilated 2 / 4 in
every block (output stride 8). The ASPP head is four 3x3 convolutions straight to the classes
(rates 6, 12, 18, 24) whose outputs are summed. :class:`DeepLabV2MSC` runs the network on the
input and on its 0.5x and 0.75x resizes; training returns ``[l1, l050, l075, max]`` (the scaled
logits at their own size), testing the pixel-wise max after resizing to the 1x logit grid.

State-dict keys are the reference's (``base.layer1.conv1.conv.weight`` ...
``base.aspp.c3.bias``, 632 entries at width 1), so its checkpoints load strictly. Input
convention (see :data:`INPUT_CONVENTIONS`): BGR 0-255 minus the Caffe mean for the reference's
weights, torchvision's normalised RGB for torchvision's ImageNet weights or from scratch.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from network.resnet38 import freeze_batchnorms
from tool.contract import IMAGENET_MEAN, IMAGENET_STD

ATROUS_RATES = (6, 12, 18, 24)
MSC_SCALES = (0.5, 0.75)
BLOCKS = (3, 4, 23, 3)
# Caffe BatchNorm (moving_average_fraction 0.999) in PyTorch's convention; irrelevant while frozen.
BN_MOMENTUM = 1 - 0.999
# (B, G, R) mean the Caffe weights were trained with, on the 0-255 scale (configs/voc12.yaml).
CAFFE_MEAN_BGR = (104.008, 116.669, 122.675)
# "caffe_bgr": BGR 0-255 minus CAFFE_MEAN_BGR (the reference's weights); "torchvision": RGB/255
# normalised by the ImageNet mean / std, what the project's datasets yield.
INPUT_CONVENTIONS = ("caffe_bgr", "torchvision")


def _channels(count: int, width_mult: float) -> int:
    return max(1, int(round(count * width_mult)))


class ConvBnReLU(nn.Module):
    """Bias-free convolution, BatchNorm(eps 1e-5), optional ReLU (keys ``conv.*``, ``bn.*``)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, padding: int, dilation: int,
                 relu: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride, padding, dilation, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=1e-5, momentum=BN_MOMENTUM)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return F.relu(x) if self.relu else x


class Bottleneck(nn.Module):
    """1x1 reduce (with the stride) -> 3x3 dilated -> 1x1 increase, plus the shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, dilation: int, downsample: bool) -> None:
        super().__init__()
        mid_ch = max(1, out_ch // 4)
        self.reduce = ConvBnReLU(in_ch, mid_ch, 1, stride, 0, 1, True)
        self.conv3x3 = ConvBnReLU(mid_ch, mid_ch, 3, 1, dilation, dilation, True)
        self.increase = ConvBnReLU(mid_ch, out_ch, 1, 1, 0, 1, False)
        self.shortcut = ConvBnReLU(in_ch, out_ch, 1, stride, 0, 1, False) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.increase(self.conv3x3(self.reduce(x)))
        return F.relu(h + (self.shortcut(x) if self.shortcut is not None else x))


class ResLayer(nn.Sequential):
    """``block1`` .. ``blockN``; only block1 has a shortcut conv (even at stride 1)."""

    def __init__(self, n_blocks: int, in_ch: int, out_ch: int, stride: int, dilation: int) -> None:
        super().__init__()
        for i in range(n_blocks):
            self.add_module(f"block{i + 1}", Bottleneck(in_ch if i == 0 else out_ch, out_ch,
                                                        stride if i == 0 else 1, dilation, i == 0))


class Stem(nn.Sequential):
    """7x7/2 conv + BN + ReLU, then 3x3/2 max pool rounding up (Caffe)."""

    def __init__(self, out_ch: int) -> None:
        super().__init__()
        self.add_module("conv1", ConvBnReLU(3, out_ch, 7, 2, 3, 1, True))
        self.add_module("pool", nn.MaxPool2d(3, 2, 1, ceil_mode=True))


class ASPP(nn.Module):
    """Four parallel 3x3 dilated convolutions to the classes, summed (no ReLU, BN or dropout)."""

    def __init__(self, in_ch: int, out_ch: int, rates: Sequence[int]) -> None:
        super().__init__()
        for i, rate in enumerate(rates):
            self.add_module(f"c{i}", nn.Conv2d(in_ch, out_ch, 3, 1, padding=rate, dilation=rate, bias=True))
        for module in self.children():
            nn.init.normal_(module.weight, mean=0, std=0.01)
            nn.init.constant_(module.bias, 0)

    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [stage(x) for stage in self.children()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(self.branches(x))


class DeepLabV2(nn.Sequential):
    """layer1 (stem) .. layer5 of the Caffe ResNet-101 + ASPP; logits at output stride 8."""

    def __init__(self, n_classes: int, width_mult: float = 1.0, n_blocks: Sequence[int] = BLOCKS,
                 atrous_rates: Sequence[int] = ATROUS_RATES) -> None:
        super().__init__()
        ch = [_channels(64 * 2 ** p, width_mult) for p in range(6)]
        self.add_module("layer1", Stem(ch[0]))
        self.add_module("layer2", ResLayer(n_blocks[0], ch[0], ch[2], 1, 1))
        self.add_module("layer3", ResLayer(n_blocks[1], ch[2], ch[3], 2, 1))
        self.add_module("layer4", ResLayer(n_blocks[2], ch[3], ch[4], 1, 2))
        self.add_module("layer5", ResLayer(n_blocks[3], ch[4], ch[5], 1, 4))
        self.add_module("aspp", ASPP(ch[5], n_classes, atrous_rates))


class DeepLabV2MSC(nn.Module):
    """The multi-scale wrapper (``MSC``) around :class:`DeepLabV2`, stored as ``self.base``.

    ``num_classes`` counts foreground classes (``DatasetInfo.num_classes``); the network
    predicts ``num_classes + 1`` channels, channel 0 = background. BatchNorm is frozen
    (running statistics, no gradient) as in the reference, unless ``frozen_bn=False`` (training
    from scratch, which the reference never does: a deep net needs its BatchNorm to learn).
    """

    # The ASPP is new to any pretrained file: 10x lr (weights) / 20x without decay (biases).
    new_layers = ("base.aspp",)

    def __init__(self, num_classes: int = 20, width_mult: float = 1.0, scales: Sequence[float] = MSC_SCALES,
                 frozen_bn: bool = True, legacy_resize: bool = False) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must count at least one foreground class, got {num_classes}")
        self.num_classes = num_classes
        self.width_mult = width_mult
        self.scales = tuple(scales)
        # torch <= 1.5 (when the reference's numbers were made) resized by in/out, not by p.
        self.legacy_resize = legacy_resize
        self.base = DeepLabV2(num_classes + 1, width_mult)
        if frozen_bn:
            self.freeze_bn()

    def freeze_bn(self) -> "DeepLabV2MSC":
        """Every BatchNorm on its running statistics, without gradient (keys unchanged)."""
        freeze_batchnorms(self.base)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """(N, 3, H, W) -> eval: max logits (N, C, h, w) at stride 8; train: [l1, l050, l075, max]."""
        logits = self.base(x)
        size = logits.shape[-2:]
        # scale_factor without recompute_scale_factor, as the reference on torch >= 1.6: the
        # 0.5x image is exactly the 2x2 box mean (see reference/deeplabv2 README, quirk 1).
        scaled = [self.base(F.interpolate(x, scale_factor=p, mode="bilinear", align_corners=False,
                                          recompute_scale_factor=self.legacy_resize or None))
                  for p in self.scales]
        resized = [F.interpolate(h, size=size, mode="bilinear", align_corners=False) for h in scaled]
        fused = torch.stack([logits, *resized]).amax(dim=0)
        if self.training:
            return [logits, *scaled, fused]
        return fused


def to_input_convention(images: torch.Tensor, convention: str) -> torch.Tensor:
    """Batches from the project's datasets (torchvision-normalised RGB) in ``convention``."""
    if convention == "torchvision":
        return images
    if convention != "caffe_bgr":
        raise ValueError(f"unknown input convention {convention!r}; known: {', '.join(INPUT_CONVENTIONS)}")
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb255 = (images * std + mean) * 255.0
    return rgb255.flip(1) - images.new_tensor(CAFFE_MEAN_BGR).view(1, 3, 1, 1)
