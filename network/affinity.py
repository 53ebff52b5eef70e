"""AffinityNet (PSA/SEAM ``resnet38_aff.Net``): pixel affinities on the stride-8 grid.

Head names and widths are those of the released checkpoints (``f8_3`` 64, ``f8_4`` 128,
``f8_5`` 256, ``f9`` 448 -> 448, no biases; 232 state-dict entries at width 1.0), whatever
the backbone's width multiplier, so PSA/SEAM AffinityNet weights load with a strict check.
The affinity of pixels i, j is ``exp(-mean_channels |f_i - f_j|)`` for the radius pairs of
:func:`tool.affinity.pair_indices`, with SEAM's radius rule for small maps.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from network.resnet38 import ResNet38
from tool.affinity import affinity_radius, pair_indices
from tool.random_walk import AffinityGraph

# Avoids log(0) in the loss; the reference's value.
LOSS_EPS = 1e-5


def pair_affinities(features: torch.Tensor, radius: int) -> torch.Tensor:
    """``exp(-mean_c |f_to - f_from|)`` for features (n, C, h, w): (n, n_offsets, n_from), float32."""
    n, channels, h, w = features.shape
    ind_from, ind_to = pair_indices(radius, h, w)
    flat = features.float().reshape(n, channels, h * w)
    from_features = flat.index_select(2, torch.from_numpy(ind_from).to(features.device)).unsqueeze(2)
    to_features = flat.index_select(2, torch.from_numpy(ind_to).to(features.device))
    to_features = to_features.reshape(n, channels, -1, ind_from.size)
    return torch.exp(-torch.mean(torch.abs(to_features - from_features), dim=1))


class AffinityNet(ResNet38):
    """ResNet38 + affinity head; ``forward`` returns pair affinities (n, n_offsets, n_from)."""

    # Randomly initialised layers (10x learning rate), read by tool.optim.parameter_groups.
    new_layers = ("f8_3", "f8_4", "f8_5", "f9")

    def __init__(self, width_mult: float = 1.0, bn_momentum: float = 0.1, radius: int = 5) -> None:
        super().__init__(width_mult=width_mult, bn_momentum=bn_momentum)
        self.radius = radius
        self.f8_3 = nn.Conv2d(self.channels["conv4"], 64, 1, bias=False)
        self.f8_4 = nn.Conv2d(self.channels["conv5"], 128, 1, bias=False)
        self.f8_5 = nn.Conv2d(self.channels["conv6"], 256, 1, bias=False)
        self.f9 = nn.Conv2d(448, 448, 1, bias=False)
        # PSA's initialisation of the new layers.
        for layer in (self.f8_3, self.f8_4, self.f8_5):
            nn.init.kaiming_normal_(layer.weight)
        nn.init.xavier_uniform_(self.f9.weight, gain=4)

    def affinity_features(self, x: torch.Tensor) -> torch.Tensor:
        """The 448-channel affinity feature map (n, 448, h, w) at stride 8."""
        features = self.forward_as_dict(x)
        f8_3 = F.elu(self.f8_3(features["conv4"]))
        f8_4 = F.elu(self.f8_4(features["conv5"]))
        f8_5 = F.elu(self.f8_5(features["conv6"]))
        return F.elu(self.f9(torch.cat([f8_3, f8_4, f8_5], dim=1)))

    def pair_radius(self, h: int, w: int) -> int:
        """Radius used on an h x w feature map (SEAM rule: smaller for maps under 2r + 1)."""
        return affinity_radius(h, w, self.radius)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.affinity_features(x)
        return pair_affinities(features, self.pair_radius(*features.shape[2:]))

    def affinity_graph(self, x: torch.Tensor) -> AffinityGraph:
        """The sparse (edge) form of one image's affinities (x of batch 1), for the random walk."""
        if x.shape[0] != 1:
            raise ValueError(f"affinity_graph takes one image, got a batch of {x.shape[0]}")
        features = self.affinity_features(x)
        feat_hw = (int(features.shape[2]), int(features.shape[3]))
        radius = self.pair_radius(*feat_hw)
        return AffinityGraph.from_pairs(pair_affinities(features, radius)[0], radius, feat_hw)


def affinity_loss(aff: torch.Tensor, bg_pos: torch.Tensor, fg_pos: torch.Tensor,
                  neg: torch.Tensor) -> dict[str, torch.Tensor]:
    """PSA's loss: -log(aff) over bg and fg positive pairs, -log(1 - aff) over negative pairs,
    each averaged over its pairs in the batch; total = bg/4 + fg/4 + neg/2."""
    aff = aff.float()
    log_aff = torch.log(aff + LOSS_EPS)
    bg_loss = torch.sum(-bg_pos * log_aff) / (torch.sum(bg_pos) + LOSS_EPS)
    fg_loss = torch.sum(-fg_pos * log_aff) / (torch.sum(fg_pos) + LOSS_EPS)
    neg_loss = torch.sum(-neg * torch.log(1 + LOSS_EPS - aff)) / (torch.sum(neg) + LOSS_EPS)
    total = bg_loss / 4 + fg_loss / 4 + neg_loss / 2
    return {"bg": bg_loss, "fg": fg_loss, "neg": neg_loss, "total": total}
