"""IRN (Ahn et al., CVPR 2019): class boundaries and displacements on a frozen ResNet-50
(IRN ``net/resnet50_irn.py``, which SIPE and AE-SIPE reuse unchanged).

* Backbone: torchvision-layout ResNet-50, strides (2, 2, 2, 1), no dilation, FixedBatchNorm.
  Frozen as the reference freezes it: its five outputs are detached and it stays in eval mode
  even when the net trains (its parameters are in no optimiser group).
* Boundary branch: 1x1 conv + GroupNorm(4) per stage (+ bilinear upsampling before the ReLU
  for the stride-8/16 stages), cropped to the stride-4 grid, concatenated, 1x1 conv -> logits.
* Displacement branch: 1x1 conv + GroupNorm per stage, a stride-8 fusion, a stride-4 fusion,
  conv -> (dy, dx), then ``mean_shift`` (identity in training, minus the running mean in eval).

State-dict keys are the reference's, aliases included (``resnet50.*`` = ``stageN.*`` =
``backbone.N-1.*``; ``fc_edgeN`` = ``edge_layers.N-1``; ``fc_dpN`` = ``dp_layers.N-1``;
``mean_shift`` = ``fc_dp7.4``): the aliases are the same modules, so they share storage and a
released checkpoint loads strictly. A width multiplier scales every channel count (the
GroupNorm group counts stay where they divide the channels) for CPU runs.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from network.layers import scaled_channels
from network.resnet import ResNet
from tool.fileio import DataError
from tool.path_index import PathIndex, edge_to_affinity

PATH_BUFFER_PREFIX = "path_indices"   # the reference loss module's derived index buffers
DISP_TARGET_KEY = "disp_target"
INFERENCE_CROP = 512                  # EdgeDisplacement pads every image to this size
FEATURE_STRIDE = 4


class MeanShift(nn.Module):
    """Identity in training; subtracts the mean displacement (set after training) in eval."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return x
        return x - self.running_mean.view(1, -1, 1, 1)


def _group_norm(groups: int, channels: int) -> nn.GroupNorm:
    # At a small width a group count may not divide the channels: take the largest that does.
    return nn.GroupNorm(math.gcd(groups, channels), channels)


def _head(in_channels: int, out_channels: int, groups: int, upsample: int = 1) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 1, bias=False), _group_norm(groups, out_channels)]
    if upsample > 1:  # before the ReLU, as the reference
        layers.append(nn.Upsample(scale_factor=upsample, mode="bilinear", align_corners=False))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class IRNet(nn.Module):
    """``forward(x) -> (edge logits (B, 1, h, w), displacement (B, 2, h, w))`` on the stride-4 grid."""

    # Parameter groups (tool.optim.parameter_groups): the boundary branch at lr x1, the
    # displacement branch at lr x10, weight decay on every parameter; the backbone trains not.
    lr_groups = (("edge_layers", 1.0), ("dp_layers", 10.0))

    def __init__(self, width_mult: float = 1.0) -> None:
        super().__init__()
        self.width_mult = width_mult
        c = lambda n: scaled_channels(n, width_mult)  # noqa: E731 - local shorthand
        resnet = ResNet(50, width_mult, strides=(2, 2, 2, 1)).freeze_pretrained()
        for parameter in resnet.parameters():
            parameter.requires_grad_(False)
        self.resnet50 = resnet
        self.stage1 = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.stage2 = nn.Sequential(resnet.layer1)
        self.stage3 = nn.Sequential(resnet.layer2)
        self.stage4 = nn.Sequential(resnet.layer3)
        self.stage5 = nn.Sequential(resnet.layer4)
        self.mean_shift = MeanShift(2)
        ch = [resnet.channels[name] for name in ("stem", "layer1", "layer2", "layer3", "layer4")]

        edge = c(32)
        self.fc_edge1 = _head(ch[0], edge, 4)
        self.fc_edge2 = _head(ch[1], edge, 4)
        self.fc_edge3 = _head(ch[2], edge, 4, upsample=2)
        self.fc_edge4 = _head(ch[3], edge, 4, upsample=4)
        self.fc_edge5 = _head(ch[4], edge, 4, upsample=4)
        self.fc_edge6 = nn.Conv2d(5 * edge, 1, 1, bias=True)

        self.fc_dp1 = _head(ch[0], c(64), 8)
        self.fc_dp2 = _head(ch[1], c(128), 16)
        self.fc_dp3 = _head(ch[2], c(256), 16)
        self.fc_dp4 = _head(ch[3], c(256), 16, upsample=2)
        self.fc_dp5 = _head(ch[4], c(256), 16, upsample=2)
        self.fc_dp6 = _head(3 * c(256), c(256), 16, upsample=2)
        self.fc_dp7 = nn.Sequential(nn.Conv2d(c(64) + c(128) + c(256), c(256), 1, bias=False),
                                    _group_norm(16, c(256)), nn.ReLU(inplace=True),
                                    nn.Conv2d(c(256), 2, 1, bias=False), self.mean_shift)

        self.backbone = nn.ModuleList([self.stage1, self.stage2, self.stage3, self.stage4, self.stage5])
        self.edge_layers = nn.ModuleList([self.fc_edge1, self.fc_edge2, self.fc_edge3, self.fc_edge4,
                                          self.fc_edge5, self.fc_edge6])
        self.dp_layers = nn.ModuleList([self.fc_dp1, self.fc_dp2, self.fc_dp3, self.fc_dp4, self.fc_dp5,
                                        self.fc_dp6, self.fc_dp7])

    def train(self, mode: bool = True) -> "IRNet":
        super().train(mode)
        self.backbone.eval()
        return self

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five detached backbone outputs (strides 4, 4, 8, 16, 16)."""
        outputs = []
        for stage in self.backbone:
            x = stage(x).detach()
            outputs.append(x)
        return outputs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2, x3, x4, x5 = self.features(x)
        size2, size3 = x2.shape[-2:], x3.shape[-2:]
        crop = lambda t, size: t[..., :size[0], :size[1]]  # noqa: E731 - top-left crop
        edges = [self.fc_edge1(x1), self.fc_edge2(x2), crop(self.fc_edge3(x3), size2),
                 crop(self.fc_edge4(x4), size2), crop(self.fc_edge5(x5), size2)]
        edge_out = self.fc_edge6(torch.cat(edges, dim=1))
        dp3 = self.fc_dp3(x3)
        dp4, dp5 = crop(self.fc_dp4(x4), size3), crop(self.fc_dp5(x5), size3)
        dp_up3 = crop(self.fc_dp6(torch.cat([dp3, dp4, dp5], dim=1)), size2)
        dp_out = self.fc_dp7(torch.cat([self.fc_dp1(x1), self.fc_dp2(x2), dp_up3], dim=1))
        return edge_out, dp_out

    # ---- loading
    def alias_groups(self) -> list[list[str]]:
        """State-dict keys that name one tensor (first = the reference's canonical name)."""
        groups: dict[int, list[str]] = {}
        for name, tensor in self.state_dict(keep_vars=True).items():
            groups.setdefault(id(tensor), []).append(name)
        return list(groups.values())

    def adapt_loaded_state(self, state: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
        """A checkpoint as ``load_state_dict(strict=True)`` takes it (``network.weights`` calls this).

        The reference's train_irn saves its loss module, whose path-index buffers are derived
        data (radius 10 at crop // 4): they are dropped. Aliases must agree, since they are one
        tensor; an alias absent from the file takes the value of one present.
        """
        state = {key: value for key, value in state.items()
                 if not (key == DISP_TARGET_KEY or (key.startswith(PATH_BUFFER_PREFIX)
                                                    and key[len(PATH_BUFFER_PREFIX):].isdigit()))}
        for names in self.alias_groups():
            present = [name for name in names if name in state]
            if not present:
                continue
            first = state[present[0]]
            for name in present[1:]:
                if state[name].shape != first.shape or not torch.equal(state[name], first):
                    raise DataError(f"{path}: {name} and {present[0]} are one tensor in IRN "
                                    f"but differ in the file")
            for name in names:
                state.setdefault(name, first)
        return state


def boundary_training_terms(edge_out: torch.Tensor, dp_out: torch.Tensor, path_index: PathIndex,
                            bg_pos: torch.Tensor, fg_pos: torch.Tensor, neg: torch.Tensor) -> dict[str, torch.Tensor]:
    """train_irn's loss terms (float32) of a batch: every sum and count runs over the whole batch.

    ``bg_pos``, ``fg_pos``, ``neg``: (B, n_dirs, n_src) pair labels of the path index.
    ``total = (pos_aff + neg_aff) / 2 + (dp_fg + dp_bg) / 2`` with ``pos_aff = bg/2 + fg/2``.
    """
    edge_out, dp_out = edge_out.float(), dp_out.float()
    aff = edge_to_affinity(torch.sigmoid(edge_out), path_index)
    pos_aff_map = -torch.log(aff + 1e-5)
    neg_aff_map = -torch.log(1.0 + 1e-5 - aff)
    pair_disp = pair_displacement(dp_out, path_index)
    target = displacement_target(path_index, dp_out.device)
    dp_fg_map = torch.abs(pair_disp - target)
    dp_bg_map = torch.abs(pair_disp)

    def mean(loss_map: torch.Tensor, label: torch.Tensor, channels: int = 1) -> torch.Tensor:
        if channels > 1:
            label = label.unsqueeze(1)
        return torch.sum(loss_map * label) / (channels * torch.sum(label) + 1e-5)

    bg_pos_aff, fg_pos_aff = mean(pos_aff_map, bg_pos), mean(pos_aff_map, fg_pos)
    pos_aff = bg_pos_aff / 2 + fg_pos_aff / 2
    neg_aff = mean(neg_aff_map, neg)
    dp_fg, dp_bg = mean(dp_fg_map, fg_pos, 2), mean(dp_bg_map, bg_pos, 2)
    total = (pos_aff + neg_aff) / 2 + (dp_fg + dp_bg) / 2
    return {"bg_pos_aff": bg_pos_aff, "fg_pos_aff": fg_pos_aff, "pos_aff": pos_aff, "neg_aff": neg_aff,
            "dp_fg": dp_fg, "dp_bg": dp_bg, "total": total}


def displacement_target(path_index: PathIndex, device: torch.device | str = "cpu") -> torch.Tensor:
    """(1, 2, n_dirs, 1) float32: the (dy, dx) of each direction (the reference's ``disp_target``)."""
    return torch.from_numpy(path_index.search_dst.T.astype(np.float32))[None, :, :, None].to(device)


def pair_displacement(dp: torch.Tensor, path_index: PathIndex) -> torch.Tensor:
    """(B, 2, n_dirs, n_src): displacement at the source minus at the destination."""
    height, width = dp.shape[-2:]
    floor = path_index.radius_floor
    crop_h, crop_w = height - floor, width - 2 * floor
    source = dp[:, :, :crop_h, floor:floor + crop_w]
    destinations = torch.stack([dp[:, :, dy:dy + crop_h, floor + dx:floor + dx + crop_w]
                                for dy, dx in path_index.search_dst.tolist()], dim=2)
    return (source.unsqueeze(2) - destinations).flatten(3)


def inference_edge(model: IRNet, image: torch.Tensor, crop_size: int = INFERENCE_CROP) -> torch.Tensor:
    """IRN's ``EdgeDisplacement`` boundary of one image (1, 3, H, W): (1, ceil(H/4), ceil(W/4)).

    The image and its flip are zero-padded at the bottom/right to ``crop_size`` (GroupNorm sees
    the padding, so the size matters; larger images are padded to their own size, where the
    reference would crop them); the logits are averaged (the flipped one flipped back after the
    crop to the grid, as the reference) and passed through a sigmoid.
    """
    height, width = image.shape[-2:]
    feat_h, feat_w = (height - 1) // FEATURE_STRIDE + 1, (width - 1) // FEATURE_STRIDE + 1
    batch = torch.cat([image, image.flip(-1)], dim=0)
    pad_h, pad_w = max(crop_size, height) - height, max(crop_size, width) - width
    edge_out, _ = model(F.pad(batch, [0, pad_w, 0, pad_h]))
    edge_out = edge_out[..., :feat_h, :feat_w].float()
    return torch.sigmoid(edge_out[0] / 2 + edge_out[1].flip(-1) / 2)


@torch.no_grad()
def displacement_sum(model: IRNet, batches: Any) -> tuple[torch.Tensor, int]:
    """The "displacement mean" pass of train_irn, in eval mode: the sum over batches of each
    batch's mean displacement (after the current mean shift) and the number of batches. The
    mean (sum / count, over all ranks) is assigned to ``mean_shift.running_mean``."""
    model.eval()
    total, count = torch.zeros(2, dtype=torch.float64), 0
    for images in batches:
        total += model(images)[1].float().mean(dim=(0, 2, 3)).double().cpu()
        count += 1
    return total, count


def canonical_names(model: IRNet) -> list[str]:
    """The reference's canonical key of every distinct tensor, in state-dict order."""
    return [names[0] for names in model.alias_groups()]


def state_of_canonical(model: IRNet, values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full state dict (every alias) from values given by canonical name."""
    return {name: values[names[0]] for names in model.alias_groups() for name in names}
