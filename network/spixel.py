"""Superpixel FCN (SpixelFCN, Yang et al. CVPR 2020) as MSA ships it, and the association ops.

The network predicts, for every pixel, a soft association ``q`` (9 channels, a softmax) to
the 3 x 3 cells around its own cell of a regular ``cell`` x ``cell`` grid (16 x 16 pixels in
MSA). Channel k = 0..8 is the neighbour at offset (k // 3 - 1, k % 3 - 1): top-left, top,
top-right, left, centre, right, bottom-left, bottom, bottom-right. Through ``q``:

* :func:`pool_features` averages pixel features into superpixel (cell) features;
* :func:`upsample_features` spreads cell features back to pixels (with ``cell = 1`` this is
  MSA's "dynamic 3 x 3 convolution": a per-pixel softmax kernel over the 8 neighbours and the
  centre, zero padded);
* :func:`superpixel_affinity` / :func:`refine_with_affinity` / :func:`refine_with_association`
  walk labels between neighbouring superpixels (train_scn's validation);
* :func:`spixel_loss` is the training loss: LAB colour + position reconstruction.

Parameter names are the reference's (``conv0a.0.weight`` ... ``pred_mask0.bias``; the unused
heads ``pred_mask1..3`` stay in the state dict so its files load strictly). The reference's
train_scn saves them without ``module.``; its classifier scripts expect the prefix; both load.
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from network.layers import scaled_channels

ASSOCIATION_CHANNELS = 9
CELL = 16                # MSA's superpixel grid (train_scn --downsize 16)
POS_WEIGHT = 0.003       # train_scn.py:260
LOSS_FACTOR = 0.005      # SpixelFCN: "empirically timing 0.005"
# (dy, dx) of association channel k.
NEIGHBOUR_OFFSETS: Tuple[Tuple[int, int], ...] = tuple((k // 3 - 1, k % 3 - 1) for k in range(9))


def conv_block(batch_norm: bool, in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1,
               padding: int | None = None) -> nn.Sequential:
    """The reference ``conv`` (SpixelFCN and MSA): conv (+BN) + LeakyReLU(0.1); keys ``.0``
    conv, ``.1`` BN; padding (kernel - 1) // 2 unless given."""
    padding = (kernel - 1) // 2 if padding is None else padding
    if batch_norm:
        return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, stride, padding, bias=False),
                             nn.BatchNorm2d(out_channels), nn.LeakyReLU(0.1))
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, stride, padding, bias=True),
                         nn.LeakyReLU(0.1))


def _deconv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(in_channels, out_channels, 4, 2, 1, bias=True), nn.LeakyReLU(0.1))


class SpixelNet(nn.Module):
    """SpixelNet1l_bn: a 5-level encoder-decoder with skips; output (N, 9, H, W), a softmax.

    H and W must be multiples of 16 (four stride-2 levels). ``width_mult`` scales every
    channel count (1.0 = the published 16..256), for CPU runs and tests; names do not change.
    """

    def __init__(self, width_mult: float = 1.0) -> None:
        super().__init__()
        self.width_mult = width_mult
        c = [scaled_channels(n, width_mult) for n in (16, 32, 64, 128, 256)]
        self.conv0a = conv_block(True, 3, c[0])
        self.conv0b = conv_block(True, c[0], c[0])
        self.conv1a = conv_block(True, c[0], c[1], stride=2)
        self.conv1b = conv_block(True, c[1], c[1])
        self.conv2a = conv_block(True, c[1], c[2], stride=2)
        self.conv2b = conv_block(True, c[2], c[2])
        self.conv3a = conv_block(True, c[2], c[3], stride=2)
        self.conv3b = conv_block(True, c[3], c[3])
        self.conv4a = conv_block(True, c[3], c[4], stride=2)
        self.conv4b = conv_block(True, c[4], c[4])
        self.deconv3 = _deconv(c[4], c[3])
        self.conv3_1 = conv_block(True, 2 * c[3], c[3])
        self.pred_mask3 = nn.Conv2d(c[3], ASSOCIATION_CHANNELS, 3, 1, 1)  # unused (kept for the keys)
        self.deconv2 = _deconv(c[3], c[2])
        self.conv2_1 = conv_block(True, 2 * c[2], c[2])
        self.pred_mask2 = nn.Conv2d(c[2], ASSOCIATION_CHANNELS, 3, 1, 1)  # unused
        self.deconv1 = _deconv(c[2], c[1])
        self.conv1_1 = conv_block(True, 2 * c[1], c[1])
        self.pred_mask1 = nn.Conv2d(c[1], ASSOCIATION_CHANNELS, 3, 1, 1)  # unused
        self.deconv0 = _deconv(c[1], c[0])
        self.conv0_1 = conv_block(True, 2 * c[0], c[0])
        self.pred_mask0 = nn.Conv2d(c[0], ASSOCIATION_CHANNELS, 3, 1, 1)
        # The reference init: kaiming_uniform(a=0.1) on every conv, zero biases, BN (1, 0).
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_uniform_(module.weight, 0.1)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out1 = self.conv0b(self.conv0a(x))
        out2 = self.conv1b(self.conv1a(out1))
        out3 = self.conv2b(self.conv2a(out2))
        out4 = self.conv3b(self.conv3a(out3))
        out5 = self.conv4b(self.conv4a(out4))
        up3 = self.conv3_1(torch.cat((out4, self.deconv3(out5)), 1))
        up2 = self.conv2_1(torch.cat((out3, self.deconv2(up3)), 1))
        up1 = self.conv1_1(torch.cat((out2, self.deconv1(up2)), 1))
        up0 = self.conv0_1(torch.cat((out1, self.deconv0(up1)), 1))
        return torch.softmax(self.pred_mask0(up0), dim=1)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        # The reference's classifier scripts save/load through nn.DataParallel ("module."),
        # train_scn saves without: accept both spellings of every key.
        for key in [k for k in state_dict if k.startswith(prefix + "module.")]:
            state_dict[prefix + key[len(prefix) + len("module."):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)


# --------------------------------------------------------------------------- association ops
def _neighbour_views(padded: torch.Tensor) -> list[torch.Tensor]:
    """The 9 windows of a 1-padded (N, C, h+2, w+2) map: view k holds cell + offset_k."""
    h, w = padded.shape[-2] - 2, padded.shape[-1] - 2
    return [padded[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy, dx in NEIGHBOUR_OFFSETS]


def upsample_features(cells: torch.Tensor, association: torch.Tensor, cell: int = CELL) -> torch.Tensor:
    """Pixel features from cell features: out(p) = sum_k q_k(p) F[cell(p) + offset_k] (0 off-grid).

    ``cells`` (N, C, h, w), ``association`` (N, 9, h * cell, w * cell) -> (N, C, h * cell, w * cell).
    """
    size = (cells.shape[-2] * cell, cells.shape[-1] * cell)
    padded = F.pad(cells, (1, 1, 1, 1))
    out = None
    for k, view in enumerate(_neighbour_views(padded)):
        term = F.interpolate(view, size=size, mode="nearest") * association[:, k:k + 1]
        out = term if out is None else out + term
    return out


def _pooled_sums(features: torch.Tensor, association: torch.Tensor, cell: int) -> torch.Tensor:
    """Sum over the pixels that associate with each cell of q * [features, 1] (cell means)."""
    with_mass = torch.cat([features, association.new_ones(association.shape[0], 1, *association.shape[2:])], dim=1)
    total = None
    for k, (dy, dx) in enumerate(NEIGHBOUR_OFFSETS):
        pooled = F.avg_pool2d(with_mass * association[:, k:k + 1], cell, cell)
        # pixels of cell c send to cell c + offset: shift the pooled map by the offset.
        shifted = F.pad(pooled, (1, 1, 1, 1))[..., 1 - dy:1 - dy + pooled.shape[-2], 1 - dx:1 - dx + pooled.shape[-1]]
        total = shifted if total is None else total + shifted
    return total


def pool_features(features: torch.Tensor, association: torch.Tensor, cell: int = CELL) -> torch.Tensor:
    """Superpixel features: the association-weighted mean of the pixels attached to each cell.

    ``features`` (N, C, H, W), ``association`` (N, 9, H, W) -> (N, C, H / cell, W / cell).
    """
    total = _pooled_sums(features, association, cell)
    return total[:, :-1] / (total[:, -1:] + 1e-8)


def superpixel_affinity(association: torch.Tensor, cell: int = CELL) -> torch.Tensor:
    """Two-step cell -> pixel -> cell transition to the 5 x 5 neighbouring cells.

    A[5 i + j](c) = sum_p q(p, c) q(p, c + (i - 2, j - 2)) / sum_p q(p, c), (N, 25, h, w).
    Entries towards cells off the grid are zero and rows are not renormalised (the
    reference's: near the border the rows sum to less than 1).
    """
    n, _, height, width = association.shape
    h, w = height // cell, width // cell
    # q of each pixel towards every one of the 5 x 5 cells around its pooling cell c:
    # pixel p in cell b associates with b + o (o in 3 x 3), so c + d = b + o with c = b + o'.
    out = association.new_zeros(n, 25, h, w)
    mass = _pooled_sums(association.new_zeros(n, 0, height, width), association, cell)[:, -1:]
    for k, (dy, dx) in enumerate(NEIGHBOUR_OFFSETS):          # pixel -> source cell b + (dy, dx)
        for k2, (dy2, dx2) in enumerate(NEIGHBOUR_OFFSETS):   # pixel -> target cell b + (dy2, dx2)
            pooled = F.avg_pool2d(association[:, k:k + 1] * association[:, k2:k2 + 1], cell, cell)
            shifted = F.pad(pooled, (1, 1, 1, 1))[..., 1 - dy:1 - dy + h, 1 - dx:1 - dx + w]
            channel = 5 * (dy2 - dy + 2) + (dx2 - dx + 2)
            out[:, channel:channel + 1] += shifted
    # Targets off the grid do not exist: their share is dropped, not renormalised.
    rows = torch.arange(h, device=association.device)[:, None] + torch.arange(-2, 3, device=association.device)[:, None, None]
    cols = torch.arange(w, device=association.device)[None, :] + torch.arange(-2, 3, device=association.device)[:, None, None]
    inside = ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None, :]  # (5, 5, h, w)
    return out * inside.reshape(25, h, w).to(out.dtype) / (mass + 1e-8)


def refine_with_affinity(cells: torch.Tensor, affinity: torch.Tensor) -> torch.Tensor:
    """One step over the 5 x 5 cell neighbourhood: out(c) = sum_d F(c + d) A[d](c), zero padded."""
    n, channels, h, w = cells.shape
    windows = F.unfold(cells, 5, padding=2).view(n, channels, 25, h, w)
    return (windows * affinity[:, None]).sum(dim=2)


def refine_with_association(maps: torch.Tensor, association: torch.Tensor, iterations: int = 20,
                            cell: int = CELL) -> torch.Tensor:
    """train_scn's ``refine_with_q``: pool, ``iterations - 1`` affinity steps, upsample."""
    cells = pool_features(maps, association, cell)
    affinity = superpixel_affinity(association, cell)
    for _ in range(iterations - 1):
        cells = refine_with_affinity(cells, affinity)
    return upsample_features(cells, association, cell)


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, 1, H, W) int labels -> (N, C, H, W) float one-hot (the reference label2one_hot)."""
    return F.one_hot(labels[:, 0].long(), num_classes).permute(0, 3, 1, 2).float()


# --------------------------------------------------------------------------- training target and loss
def pixel_coordinates(batch: int, height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(N, 2, H, W) float: channel 0 = column x, channel 1 = row y, in pixels (init_spixel_grid)."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32, device=device),
                            torch.arange(width, dtype=torch.float32, device=device), indexing="ij")
    return torch.stack([xs, ys])[None].expand(batch, -1, -1, -1)


def labxy_target(lab_uint8: torch.Tensor) -> torch.Tensor:
    """train_scn's target: cat(LAB / 255, XY) from (N, H, W, 3) uint8 LAB -> (N, 5, H, W)."""
    lab = lab_uint8.permute(0, 3, 1, 2).float() / 255.0
    n, _, h, w = lab.shape
    return torch.cat([lab, pixel_coordinates(n, h, w, lab.device)], dim=1)


def spixel_loss(association: torch.Tensor, labxy: torch.Tensor, cell: int = CELL,
                pos_weight: float = POS_WEIGHT) -> Dict[str, torch.Tensor]:
    """MSA's QLoss (L2 branch): reconstruct LAB and XY through the superpixels.

    sem = sum_p ||LAB' - LAB||_2 / (N cell), pos = sum_p ||XY' - XY||_2 / N * pos_weight / cell
    (norms over channels, not squared); total = 0.005 (sem + pos). Returns ``total``, ``sem``
    and ``pos`` (each already times 0.005).
    """
    batch = labxy.shape[0]
    reconstruction = upsample_features(pool_features(labxy, association, cell), association, cell)
    error = reconstruction - labxy
    sem = torch.norm(error[:, :-2], p=2, dim=1).sum() / (batch * cell)
    pos = torch.norm(error[:, -2:], p=2, dim=1).sum() / batch * pos_weight / cell
    return {"total": LOSS_FACTOR * (sem + pos), "sem": LOSS_FACTOR * sem, "pos": LOSS_FACTOR * pos}


# --------------------------------------------------------------------------- evaluation
def hard_superpixels(association: torch.Tensor, cell: int = CELL) -> torch.Tensor:
    """(N, H, W) int64 superpixel index: the arg-max neighbour cell of every pixel."""
    n, _, height, width = association.shape
    w = width // cell
    best = association.argmax(dim=1)
    rows = torch.arange(height, device=association.device)[:, None] // cell
    cols = torch.arange(width, device=association.device)[None, :] // cell
    dy = torch.div(best, 3, rounding_mode="floor") - 1
    dx = best % 3 - 1
    return (rows + dy) * (w + 2) + (cols + dx)  # (w + 2): off-grid neighbours stay distinct


def boundary_map(labels: np.ndarray) -> np.ndarray:
    """Pixels whose right or lower neighbour has another label (bool, same shape)."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return edge


def superpixel_scores(superpixels: np.ndarray, gt: np.ndarray, tolerance: int = 2,
                      ignore: int = 255) -> Dict[str, int]:
    """Counts for the standard superpixel metrics (SpixelFCN reports them on BSDS500, tolerance 2).

    * boundary recall = ``recall_found / recall_total``: ground-truth boundary pixels within
      ``tolerance`` px of a superpixel boundary;
    * boundary precision = ``precision_found / precision_total``: superpixel boundary pixels
      within ``tolerance`` px of a ground-truth boundary (recall alone rewards ragged superpixels);
    * achievable segmentation accuracy = ``asa_correct / asa_total``: pixels whose superpixel's
      majority label is their own.

    Pixels of the ignore label are not scored (their edges are not ground-truth boundaries).
    """
    def near(edges: np.ndarray) -> np.ndarray:  # within tolerance: a square window
        return F.max_pool2d(torch.from_numpy(edges).float()[None, None], 2 * tolerance + 1, 1, tolerance)[0, 0].numpy() > 0

    valid = gt != ignore
    gt_edges = boundary_map(gt) & valid
    sp_edges = boundary_map(superpixels) & valid
    ids = np.unique(superpixels[valid], return_inverse=True)[1]
    joint = np.zeros((ids.max() + 1, int(gt[valid].max()) + 1), dtype=np.int64)
    np.add.at(joint, (ids, gt[valid].astype(np.int64)), 1)
    return {"recall_found": int((gt_edges & near(sp_edges)).sum()), "recall_total": int(gt_edges.sum()),
            "precision_found": int((sp_edges & near(gt_edges)).sum()), "precision_total": int(sp_edges.sum()),
            "asa_correct": int(joint.max(axis=1).sum()), "asa_total": int(valid.sum())}


def superpixels_of_image(spixel: nn.Module | None, image: torch.Tensor, cell: int = CELL) -> np.ndarray:
    """(h, w) superpixel ids of one normalised image (1, 3, h, w), as the MSA evaluator sees it:
    stretched to multiples of ``cell``, hard-assigned, nearest-resized back. ``spixel`` None
    gives the regular grid (every pixel in its own cell), the trivial baseline."""
    height, width = image.shape[-2:]
    size = (-(-height // cell) * cell, -(-width // cell) * cell)
    stretched = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
    if spixel is None:
        association = torch.zeros(1, ASSOCIATION_CHANNELS, *size, device=image.device)
        association[:, 4] = 1
    else:
        with torch.inference_mode():
            association = spixel(stretched)
    labels = hard_superpixels(association, cell)[:, None].float()
    return F.interpolate(labels, size=(height, width), mode="nearest")[0, 0].long().cpu().numpy()
