"""AVC classifier: SEAM's network (CAM head + pixel correlation module) and its losses.

The network keeps SEAM's parameter names (``fc8``, ``f8_3``, ``f8_4``, ``f9`` next to the
backbone keys), so a released SEAM checkpoint loads unchanged. ``forward`` returns the
CAMs on the feature grid plus what the AVC losses need; the losses are separate functions
(each one term of DESIGN.md "Stage 1"), combined by :func:`avc_training_losses`.

Arithmetic of the SEAM terms follows SEAM's ``train_SEAM.py`` (cls, adaptive min-pooling,
ER, ECR); the two AVC terms are this project's definition (DESIGN.md).
"""
from __future__ import annotations

from typing import Dict, List, Mapping, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from network.resnet38 import ResNet38

# Channel counts of SEAM's PCM heads: fixed (not width-scaled) so SEAM checkpoints load.
F8_3_CHANNELS = 64
F8_4_CHANNELS = 128
PCM_CHANNELS = 192
PCM_EPS = 1e-5  # SEAM's epsilon in every PCM normalisation


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize with align_corners=True (SEAM's choice everywhere in Stage 1)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


# ===================================================================== PCM
def normalize_cam_for_pcm(cam: torch.Tensor) -> torch.Tensor:
    """SEAM's ``cam_d_norm``: the detached CAM that the PCM refines.

    Per (sample, class) max-normalised after ReLU; background = 1 - max foreground;
    foreground entries below the per-pixel foreground maximum zeroed (ties all kept). The
    background is computed before that zeroing, as in the reference.
    """
    with torch.no_grad():
        cam_d = F.relu(cam.detach().float())
        cam_max = cam_d.flatten(2).max(dim=-1)[0][..., None, None] + PCM_EPS
        cam_norm = F.relu(cam_d - PCM_EPS) / cam_max
        return max_onehot(with_background(cam_norm))


def l2_normalize_features(features: torch.Tensor) -> torch.Tensor:
    """Divide each pixel's feature vector (dim 1) by its L2 norm + 1e-5, as SEAM's PCM."""
    return features / (torch.norm(features, dim=1, keepdim=True) + PCM_EPS)


def normalized_affinity(features: torch.Tensor) -> torch.Tensor:
    """Affinity of L2-normalised features (n, D, h, w) -> (n, hw, hw), columns summing to 1.

    ``A[i, j] = ReLU(<f_i, f_j>)``, then every column j is divided by its sum over i (+1e-5),
    so ``cam @ A`` averages the CAM over the source pixels i. Column j is pixel j's
    affinity vector.
    """
    flat = features.flatten(2)
    affinity = F.relu(torch.matmul(flat.transpose(1, 2), flat))
    return affinity / (affinity.sum(dim=1, keepdim=True) + PCM_EPS)


class PCMOutput(NamedTuple):
    cam_rv: torch.Tensor    # (n, C+1, h, w) refined CAM
    features: torch.Tensor  # (n, 192, h, w) L2-normalised f9 features
    affinity: torch.Tensor  # (n, hw, hw) column-normalised affinity


def pcm(cam: torch.Tensor, features: torch.Tensor, f9: nn.Module) -> PCMOutput:
    """SEAM's pixel correlation module on the grid of ``features``.

    ``cam`` (n, C+1, h', w') is resized to the feature grid (bilinear, align_corners=True),
    ``f9`` maps the 195-channel features to 192, which are L2-normalised per pixel;
    ``cam_rv[c, j] = sum_i cam[c, i] * A[i, j]``. Runs in float32 even under autocast: the
    normalisations divide by sums over thousands of pixels.
    """
    n, _, h, w = features.shape
    with torch.autocast(device_type=features.device.type, enabled=False):
        cam = _resize(cam.float(), (h, w)).flatten(2)
        normalized = l2_normalize_features(f9(features.float()))
        affinity = normalized_affinity(normalized)
        cam_rv = torch.matmul(cam, affinity).reshape(n, -1, h, w)
    return PCMOutput(cam_rv, normalized, affinity)


# ===================================================================== network
class AVCNet(ResNet38):
    """SEAM classifier on ResNet38: CAM head ``fc8`` and PCM heads ``f8_3``, ``f8_4``, ``f9``.

    ``forward(x)`` returns a dict on the stride-8 feature grid:
    ``cam`` (raw CAM, n x C+1 x h x w, channel 0 = background), ``cam_rv`` (PCM-refined),
    ``pcm_features`` (n x 192 x h x w, L2-normalised) and ``affinity`` (n x hw x hw,
    column-normalised). Given a list of images it returns a list of such dicts, so two
    views go through one (DistributedDataParallel-safe) forward call.
    """

    new_layers = ("fc8", "f8_3", "f8_4", "f9")
    float32_modules = ("f9",)  # the PCM runs in float32 (:func:`pcm`)

    def __init__(self, num_classes: int = 20, width_mult: float = 1.0,
                 bn_momentum: float = 0.1, dropout: bool = True) -> None:
        super().__init__(width_mult=width_mult, bn_momentum=bn_momentum, dropout=dropout)
        self.num_classes = num_classes
        self.dropout7 = nn.Dropout2d(0.5 if dropout else 0.0)
        self.fc8 = nn.Conv2d(self.channels["conv6"], num_classes + 1, 1, bias=False)
        self.f8_3 = nn.Conv2d(self.channels["conv4"], F8_3_CHANNELS, 1, bias=False)
        self.f8_4 = nn.Conv2d(self.channels["conv5"], F8_4_CHANNELS, 1, bias=False)
        self.f9 = nn.Conv2d(3 + F8_3_CHANNELS + F8_4_CHANNELS, PCM_CHANNELS, 1, bias=False)
        nn.init.xavier_uniform_(self.fc8.weight)
        nn.init.kaiming_normal_(self.f8_3.weight)
        nn.init.kaiming_normal_(self.f8_4.weight)
        nn.init.xavier_uniform_(self.f9.weight, gain=4)

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]
                ) -> Dict[str, torch.Tensor] | List[Dict[str, torch.Tensor]]:
        if isinstance(x, (list, tuple)):
            return [self._forward_single(view) for view in x]
        return self._forward_single(x)

    def _forward_single(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = self.forward_as_dict(x)
        cam = self.fc8(self.dropout7(features["conv6"]))
        h, w = cam.shape[-2:]
        cam_for_pcm = normalize_cam_for_pcm(cam)
        # The PCM heads learn from the PCM losses only: the backbone features are detached.
        f8_3 = F.relu(self.f8_3(features["conv4"].detach()))
        f8_4 = F.relu(self.f8_4(features["conv5"].detach()))
        image_small = _resize(x, (h, w)).to(f8_3.dtype)
        refined = pcm(cam_for_pcm, torch.cat([image_small, f8_3, f8_4], dim=1), self.f9)
        return {"cam": cam, "cam_rv": refined.cam_rv,
                "pcm_features": refined.features, "affinity": refined.affinity}

    def forward_cam(self, x: torch.Tensor) -> torch.Tensor:
        """Refined CAM upsampled to the input size (bilinear, align_corners=True), for inference."""
        return _resize(self._forward_single(x)["cam_rv"], x.shape[-2:])


# ===================================================================== SEAM loss terms
def max_norm(cam: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """SEAM's ``max_norm``: ReLU, then per (sample, class) ``relu(p - min - eps) / (max - min + eps)``."""
    cam = F.relu(cam)
    flat = cam.flatten(2)
    max_v = flat.max(dim=-1)[0][..., None, None]
    min_v = flat.min(dim=-1)[0][..., None, None]
    return F.relu(cam - min_v - eps) / (max_v - min_v + eps)


def with_background(cam: torch.Tensor) -> torch.Tensor:
    """Replace channel 0 by 1 - max over the foreground channels."""
    background = 1 - cam[:, 1:].max(dim=1, keepdim=True)[0]
    return torch.cat([background, cam[:, 1:]], dim=1)


def max_onehot(cam: torch.Tensor) -> torch.Tensor:
    """Keep each pixel's maximal foreground value(s), zero the other foreground entries.

    The background channel and the kept values are unchanged (SEAM's ``max_onehot``,
    without its in-place write).
    """
    foreground = cam[:, 1:]
    fg_max = foreground.max(dim=1, keepdim=True)[0]
    foreground = torch.where(foreground != fg_max, torch.zeros_like(foreground), foreground)
    return torch.cat([cam[:, :1], foreground], dim=1)


def classification_loss(cam: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multi-label soft margin on the globally averaged foreground CAM; labels (n, C) multi-hot."""
    # adaptive_avg_pool2d and 4-D operands as SEAM: same summation order, same bits.
    pooled = F.adaptive_avg_pool2d(cam, (1, 1))[:, 1:]
    return F.multilabel_soft_margin_loss(pooled, labels[..., None, None].to(pooled.dtype))


def adaptive_min_pooling_loss(foreground_cam: torch.Tensor) -> torch.Tensor:
    """Push the lowest quarter of each image's max-foreground map to 0.

    ``foreground_cam`` (n, C, h, w) is the label-masked foreground of the refined CAM;
    loss = sum of ReLU over the k = hw // 4 smallest per-pixel maxima / (k n).
    """
    n, _, h, w = foreground_cam.shape
    k = h * w // 4
    pixel_max = foreground_cam.max(dim=1)[0].reshape(n, -1)
    lowest = torch.topk(pixel_max, k=k, dim=-1, largest=False)[0]
    return F.relu(lowest).sum() / (k * n)


def equivariant_regularization(cam_a: torch.Tensor, cam_b: torch.Tensor) -> torch.Tensor:
    """ER: mean |cam_a - cam_b| over the foreground channels (same grid, both normalised)."""
    return torch.mean(torch.abs(cam_a[:, 1:] - cam_b[:, 1:]))


def equivariant_cross_regularization(target_cam: torch.Tensor, refined_cam: torch.Tensor,
                                     top_fraction: float = 0.2) -> torch.Tensor:
    """ECR, one direction: mean of the top 20% of |max_onehot(target) - refined| per sample.

    ``target_cam`` (the other view's CAM, background = 1 - max foreground) is detached.
    """
    n, c, h, w = refined_cam.shape
    difference = torch.abs(max_onehot(target_cam.detach()) - refined_cam)
    k = int(c * h * w * top_fraction)
    return torch.mean(torch.topk(difference.reshape(n, -1), k=k, dim=-1)[0])


# ===================================================================== AVC loss terms
def affinity_cross_view_loss(features_a: torch.Tensor, affinity_b: torch.Tensor,
                             size_b: Sequence[int]) -> torch.Tensor:
    """Cross-view affinity consistency.

    View a's L2-normalised PCM features are resampled to view b's grid ``size_b``
    (bilinear, align_corners=True) and re-normalised; their affinity (same rule as the
    PCM) is compared with view b's: L1 distance between matching affinity vectors (columns),
    averaged over pixels and images. Each distance lies in [0, 2].
    """
    resampled = l2_normalize_features(_resize(features_a.float(), size_b))
    affinity_a = normalized_affinity(resampled)
    return torch.abs(affinity_a - affinity_b.float()).sum(dim=1).mean()


def affinity_semantic_loss(affinity: torch.Tensor, target_cam: torch.Tensor,
                           eps: float = 1e-5) -> torch.Tensor:
    """Semantic affinity term: mean over pixels j of 1 - cos(a_j, s_j).

    ``affinity`` (n, hw, hw): column j is pixel j's affinity vector a_j. ``target_cam``
    (n, C+1, h, w) on the same grid, detached: s_j[i] = 1 where pixels i and j take the
    same arg-max class, else 0. Computed without forming s: a_j . s_j is column j of
    ``onehot @ A`` at j's class, |s_j| = sqrt(pixels of j's class).
    """
    n, hw, _ = affinity.shape
    classes = target_cam.detach().flatten(2).argmax(dim=1)                 # (n, hw)
    onehot = F.one_hot(classes, target_cam.shape[1]).transpose(1, 2).to(affinity.dtype)
    class_sums = torch.matmul(onehot, affinity)                            # (n, C+1, hw)
    dot = class_sums.gather(1, classes.unsqueeze(1)).squeeze(1)             # a_j . s_j
    target_norm = onehot.sum(dim=2).gather(1, classes).sqrt()               # |s_j|
    affinity_norm = affinity.norm(dim=1)                                    # |a_j|
    cosine = dot / (affinity_norm * target_norm + eps)
    return (1 - cosine).mean()


# ===================================================================== combined
LOSS_WEIGHT_NAMES = ("er", "ecr", "avc", "avc_cross", "avc_sem")
DEFAULT_LOSS_WEIGHTS: Dict[str, float] = {"er": 1.0, "ecr": 1.0, "avc": 1.0,
                                          "avc_cross": 1.0, "avc_sem": 1.0}


def _resolve_weights(weights: Mapping[str, float] | None) -> Dict[str, float]:
    resolved = dict(DEFAULT_LOSS_WEIGHTS)
    if weights:
        unknown = set(weights) - set(LOSS_WEIGHT_NAMES)
        if unknown:
            raise ValueError(f"unknown loss weights {sorted(unknown)}; known: {LOSS_WEIGHT_NAMES}")
        resolved.update({k: float(v) for k, v in weights.items()})
    return resolved


def avc_training_losses(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                        scale: float = 0.3, weights: Mapping[str, float] | None = None
                        ) -> Dict[str, torch.Tensor]:
    """All Stage-1 loss terms for one batch and their weighted total.

    ``images`` (n, 3, H, W) normalised; ``labels`` (n, C) multi-hot over foreground classes.
    The second view is ``images`` resized by ``scale`` (bilinear, align_corners=True). Keys:
    ``cls``, ``min_pool``, ``er``, ``ecr``, ``avc_cross``, ``avc_sem``, ``total`` with
    ``total = cls + min_pool + er_w er + ecr_w ecr + avc_w (avc_cross_w avc_cross + avc_sem_w avc_sem)``.
    Weights (``LOSS_WEIGHT_NAMES``, default 1) map the flags ``--er_weight`` etc.; with
    ``avc = 0`` the total is exactly SEAM's and the AVC terms are only logged (no gradient).
    """
    w = _resolve_weights(weights)
    images_2 = F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=True)
    out_1, out_2 = model([images, images_2])
    size_1, size_2 = images.shape[-2:], images_2.shape[-2:]
    labels = labels.to(device=images.device, dtype=torch.float32)
    label_mask = torch.cat([torch.ones_like(labels[:, :1]), labels], dim=1)[..., None, None]

    # SEAM's losses act on the CAMs upsampled to each view's image size.
    cam_1 = _resize(out_1["cam"].float(), size_1)
    cam_rv_1 = _resize(out_1["cam_rv"].float(), size_1)
    cam_2 = _resize(out_2["cam"].float(), size_2)
    cam_rv_2 = _resize(out_2["cam_rv"].float(), size_2)

    cls = (classification_loss(cam_1, labels) + classification_loss(cam_2, labels)) / 2
    min_pool = (adaptive_min_pooling_loss((cam_rv_1 * label_mask)[:, 1:])
                + adaptive_min_pooling_loss((cam_rv_2 * label_mask)[:, 1:])) / 2

    def to_view_2(cam: torch.Tensor) -> torch.Tensor:
        return F.interpolate(cam, scale_factor=scale, mode="bilinear", align_corners=True)

    norm_1 = to_view_2(max_norm(cam_1)) * label_mask
    norm_rv_1 = to_view_2(max_norm(cam_rv_1)) * label_mask
    norm_2 = max_norm(cam_2) * label_mask
    norm_rv_2 = max_norm(cam_rv_2) * label_mask

    er = equivariant_regularization(norm_1, norm_2)
    norm_1, norm_2 = with_background(norm_1), with_background(norm_2)
    ecr = (equivariant_cross_regularization(norm_2, norm_rv_1)
           + equivariant_cross_regularization(norm_1, norm_rv_2))

    total = cls + min_pool + w["er"] * er + w["ecr"] * ecr
    with torch.set_grad_enabled(torch.is_grad_enabled() and w["avc"] != 0):
        grid_1, grid_2 = out_1["cam"].shape[-2:], out_2["cam"].shape[-2:]
        avc_cross = affinity_cross_view_loss(out_1["pcm_features"], out_2["affinity"], grid_2)
        avc_sem = (affinity_semantic_loss(out_1["affinity"], _resize(norm_2.detach(), grid_1))
                   + affinity_semantic_loss(out_2["affinity"], _resize(norm_1.detach(), grid_2))) / 2
    if w["avc"] != 0:
        total = total + w["avc"] * (w["avc_cross"] * avc_cross + w["avc_sem"] * avc_sem)
    return {"cls": cls, "min_pool": min_pool, "er": er, "ecr": ecr,
            "avc_cross": avc_cross, "avc_sem": avc_sem, "total": total}
