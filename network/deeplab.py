"""DeepLabV1 (LargeFOV) on the ResNet38 backbone, as retrained on pseudo masks (stage 4-5).

Parameter names follow the ``deeplabv1`` net of semantic-segmentation-codebase (the
"seamv1-pseudovoc" release): the backbone under ``backbone.`` and the head at the top
level (``conv_fov``, ``bn_fov``, ``conv_fov2``, ``bn_fov2``, ``cls_conv``), 242 state-dict
entries at width 1.0, so its checkpoints load with a strict key check. The head keeps
512 channels at every width multiplier for the same reason.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from network.resnet38 import ResNet38

# BatchNorm momentum of the reference DeepLab training (PyTorch convention: weight of the new batch).
DEEPLAB_BN_MOMENTUM = 0.0003
HEAD_CHANNELS = 512
# Rate of the 3x3 "field of view" convolution on the stride-8 feature map (LargeFOV).
FOV_DILATION = 12


class DeepLabV1(nn.Module):
    """ResNet38 conv6 -> 3x3 dilated conv/BN/ReLU -> 1x1 conv/BN/ReLU -> dropout -> 1x1 classifier.

    ``num_classes`` counts foreground classes (``DatasetInfo.num_classes``); the network
    predicts ``num_classes + 1`` channels, channel 0 = background. ``forward`` returns
    logits bilinearly upsampled (align_corners=True) to the input size.
    """

    # Randomly initialised layers (10x learning rate), read by tool.optim.parameter_groups.
    new_layers = ("conv_fov", "bn_fov", "conv_fov2", "bn_fov2", "cls_conv")

    def __init__(self, num_classes: int = 20, width_mult: float = 1.0,
                 bn_momentum: float = DEEPLAB_BN_MOMENTUM, dropout: float = 0.5) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must count at least one foreground class, got {num_classes}")
        self.num_classes = num_classes
        self.width_mult = width_mult
        self.backbone = ResNet38(width_mult, bn_momentum=bn_momentum)
        in_channels = self.backbone.channels["conv6"]
        self.conv_fov = nn.Conv2d(in_channels, HEAD_CHANNELS, 3, padding=FOV_DILATION,
                                  dilation=FOV_DILATION, bias=False)
        self.bn_fov = nn.BatchNorm2d(HEAD_CHANNELS, momentum=bn_momentum)
        self.conv_fov2 = nn.Conv2d(HEAD_CHANNELS, HEAD_CHANNELS, 1, bias=False)
        self.bn_fov2 = nn.BatchNorm2d(HEAD_CHANNELS, momentum=bn_momentum)
        self.dropout = nn.Dropout(dropout)
        self.cls_conv = nn.Conv2d(HEAD_CHANNELS, num_classes + 1, 1, bias=True)
        self._init_head()

    def _init_head(self) -> None:
        # As the reference: He-normal (fan_out) hidden convolutions, BN scale 1 / shift 0. The
        # classifier starts small (N(0, 0.01), bias 0, as DeepLab-LargeFOV's fc8), not He-normal
        # as in the seamv1 codebase: He-normal over 512 -> 21 channels starts at a loss near 8,
        # and from there short runs fall into predicting background everywhere.
        for name in self.new_layers:
            module = getattr(self, name)
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.cls_conv.weight, std=0.01)
        nn.init.zeros_(self.cls_conv.bias)

    def head(self, conv6: torch.Tensor) -> torch.Tensor:
        """Class logits on the backbone's stride-8 grid."""
        feature = F.relu(self.bn_fov(self.conv_fov(conv6)))
        feature = F.relu(self.bn_fov2(self.conv_fov2(feature)))
        return self.cls_conv(self.dropout(feature))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised RGB batch (N, 3, H, W) -> logits (N, num_classes + 1, H, W)."""
        logits = self.head(self.backbone(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True)

