"""ResNet-50 / ResNet-101 in torchvision's layout and key names (v1.5: stride on the 3x3 conv).

Key names equal torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``,
...), so ``resnet50-19c8e357.pth`` / ``resnet101-63fe2227.pth`` load strictly (their ``fc.*`` is
the ImageNet classifier, not part of the backbone). ``strides`` sets the stride of the stem and
of layer2..layer4 (SIPE/IRN/MSA use ``(2, 2, 2, 1)``: output stride 16); ``dilations`` the
dilation of layer1..layer4 (the first block of a layer is built with dilation 1, as the IRN
reference does). A width multiplier scales every channel count for CPU runs and tests.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from network.layers import replace_batchnorms, scaled_channels

BLOCKS_PER_DEPTH: Dict[int, Tuple[int, int, int, int]] = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
STAGES: Tuple[str, ...] = ("stem", "layer1", "layer2", "layer3", "layer4")
EXPANSION = 4


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, dilation) -> 1x1 (x4), torchvision names."""

    def __init__(self, in_channels: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        out_channels = planes * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Bottleneck ResNet; ``forward_as_dict`` returns ``stem``, ``layer1`` .. ``layer4``."""

    new_layers: Tuple[str, ...] = ()

    def __init__(self, depth: int = 50, width_mult: float = 1.0,
                 strides: Sequence[int] = (2, 2, 2, 2), dilations: Sequence[int] = (1, 1, 1, 1)) -> None:
        super().__init__()
        if depth not in BLOCKS_PER_DEPTH:
            raise ValueError(f"ResNet depth must be one of {sorted(BLOCKS_PER_DEPTH)}, got {depth}")
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        if len(strides) != 4 or len(dilations) != 4:
            raise ValueError("strides (stem, layer2, layer3, layer4) and dilations (layer1..4) take 4 values")
        self.depth, self.width_mult = depth, width_mult
        self.strides, self.dilations = tuple(strides), tuple(dilations)
        c = lambda n: scaled_channels(n, width_mult)  # noqa: E731 - local shorthand

        self.conv1 = nn.Conv2d(3, c(64), 7, strides[0], padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(c(64))
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        in_channels = c(64)
        layer_strides = (1,) + tuple(strides[1:])
        self.channels: Dict[str, int] = {"stem": c(64)}
        for index, (blocks, stride, dilation) in enumerate(
                zip(BLOCKS_PER_DEPTH[depth], layer_strides, dilations), start=1):
            planes = c(64 * 2 ** (index - 1))
            layer = self._make_layer(in_channels, planes, blocks, stride, dilation)
            setattr(self, f"layer{index}", layer)
            in_channels = planes * EXPANSION
            self.channels[f"layer{index}"] = in_channels

    @staticmethod
    def _make_layer(in_channels: int, planes: int, blocks: int, stride: int, dilation: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or in_channels != planes * EXPANSION:
            downsample = nn.Sequential(nn.Conv2d(in_channels, planes * EXPANSION, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * EXPANSION))
        layers: List[nn.Module] = [Bottleneck(in_channels, planes, stride, 1, downsample)]
        layers += [Bottleneck(planes * EXPANSION, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward_as_dict(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = {"stem": self.stem(x)}
        for index in range(1, 5):
            x = getattr(self, f"layer{index}")(x if index > 1 else features["stem"])
            features[f"layer{index}"] = x
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_as_dict(x)["layer4"]

    def backbone_state_keys(self) -> List[str]:
        """Every state-dict key of the backbone (the torchvision file's keys minus ``fc.*``)."""
        return list(self.state_dict())

    def freeze_pretrained(self, trainable_affine: bool = True) -> "ResNet":
        """Fine-tuning from ImageNet weights the IRN/SIPE/MSA way.

        Every BatchNorm uses its running statistics (``FixedBatchNorm``; gamma/beta still
        learn unless ``trainable_affine`` is False) and the stem (``conv1``, ``bn1``) is fixed.
        Keys are unchanged. Call once, after construction.
        """
        for name in ("bn1", "layer1", "layer2", "layer3", "layer4"):
            replace_batchnorms(getattr(self, name), self, name, trainable_affine)
        for module in (self.conv1, self.bn1):
            for parameter in module.parameters():
                parameter.requires_grad_(False)
        return self
