"""MSA (multi-type semantic affinity): the classifier, its IPC loss, its optimiser and its CAMs.

The classifier (the reference ``SP_CAM_Model3``) is a ResNet-50 (output stride 16, the
reference's FixedBatchNorm: running statistics, trained gamma/beta, stem trained too) with

* Dynamic Convolutional Reconstruction (DCR): after layer3 and after the classifier, a head
  predicts a per-pixel 3 x 3 softmax kernel (:func:`network.spixel.upsample_features` with
  cell 1) that recomposes the channel-gated features (gates: squeeze-excitation on the GAP);
* Affinity Propagation (AP): the cosine affinity of the recomposed layer3 features, clamped
  to [0.01, 0.999], entries below ``ap_threshold`` (0.6) zeroed, columns normalised, applied
  ``ap_steps`` (8) times to the logits.

**Variants.** The committed reference does not run (its kernel heads take 128 channels and are
fed the 256-channel concat of the features and the superpixel features ``get_qfeats``). The
default (``widened=False``) is the shipped bytecode: the heads see the features only and the
superpixel features are computed and unused. ``widened=True`` is the committed design made to
run: the heads' first conv takes 256 channels (the concat), the only state-dict change.

State-dict keys are the reference's, aliases included: ``model.*`` (torchvision names) and
``stage1..stage5.*`` are the same tensors, so its checkpoints load strictly and ours load in
it. Loading checks that every alias holds the same value as its canonical key.

Training losses (:func:`msa_losses`): multi-label soft margin on the GAP logits (foreground
channels) + 0.3 x IPC (intra-patch prototype contrast) against a superpixel-pooled target:
the normalised image (9 patches, ignore 0.1, AP in training) or a saliency map (1 patch,
0.01, no AP in training). Saliency detectors (PoolNet) are trained with pixel labels: the
saliency variant is not purely image-level supervised.
"""
from __future__ import annotations

import math
from typing import Any, Dict, NamedTuple, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from network.layers import scaled_channels
from network.resnet import ResNet
from network.spixel import CELL, conv_block, pool_features, upsample_features
from tool.contract import MSA_MEAN, MSA_STD
from tool.optim import parameter_groups
from tool.transforms import hwc_to_chw, normalize

AP_STEPS = 8
AP_THRESHOLD = 0.6
IPC_WEIGHT = 0.3
STAGE_ALIASES = ("stage1", "stage2", "stage3", "stage4", "stage5")


def _kernel_head(in_channels: int, hidden: int) -> nn.Sequential:
    """3 x 3 conv -> 1 x 1 conv to 9 (each + LeakyReLU(0.1), the reference's Q12) -> softmax."""
    return nn.Sequential(conv_block(False, in_channels, hidden, 3), conv_block(False, hidden, 9, 1),
                         nn.Softmax(dim=1))


def _gate(channels: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.ReLU(inplace=True),
                         nn.Conv2d(hidden, channels, 1, bias=False), nn.Sigmoid())


def cosine_affinity(features: torch.Tensor) -> torch.Tensor:
    """(N, HW, HW) cosine similarity of the feature vectors (L2-normalised over channels)."""
    unit = F.normalize(features.flatten(2), dim=1)
    return torch.bmm(unit.transpose(1, 2), unit)


def propagation_matrix(affinity: torch.Tensor, threshold: float = AP_THRESHOLD) -> torch.Tensor:
    """Clamp to [0.01, 0.999], zero the entries below ``threshold``, normalise the columns
    (the reference's: no symmetrisation; the clamp keeps every column's diagonal)."""
    affinity = affinity.clamp(0.01, 0.999)
    affinity = affinity * (affinity >= threshold)
    return affinity / affinity.sum(dim=1, keepdim=True)


def affinity_propagation(logits: torch.Tensor, features: torch.Tensor, steps: int = AP_STEPS,
                         threshold: float = AP_THRESHOLD) -> torch.Tensor:
    """``steps`` times L <- L A, A = :func:`propagation_matrix` of the features' cosine affinity."""
    if steps <= 0:
        return logits
    n, classes, h, w = logits.shape
    affinity = propagation_matrix(cosine_affinity(features), threshold)
    flat = logits.reshape(n, classes, h * w)
    for _ in range(steps):
        flat = torch.bmm(flat, affinity)
    return flat.reshape(n, classes, h, w)


class MSAOutput(NamedTuple):
    logits: torch.Tensor       # (N, C+1, h, w): DCR-recomposed class map after AP
    logits_min: torch.Tensor   # (N, C+1, 1, 1): GAP of the classifier before DCR and AP (the cls loss)


class MSANet(nn.Module):
    """The MSA classifier (reference ``SP_CAM_Model3("resnet50", num_classes + 1)``).

    ``forward(images, association, ap_steps, ap_threshold)`` -> :class:`MSAOutput`. The
    association (N, 9, H, W) comes from a frozen :class:`network.spixel.SpixelNet`; H and W
    must be multiples of 16. Channel 0 of the logits is the background (never trained, the
    reference's Q3).
    """

    new_layers: Tuple[str, ...] = ("get_qfeats", "x4_feats", "x5_feats", "get_tran_conv5", "get_tran_conv4",
                                   "ala2", "ala1", "classifier")

    def __init__(self, num_classes: int = 20, width_mult: float = 1.0, widened: bool = False,
                 fixed_bn: bool = True) -> None:
        super().__init__()
        self.num_classes, self.width_mult, self.widened = num_classes, width_mult, widened
        self.model = ResNet(50, width_mult, strides=(2, 2, 2, 1))
        if fixed_bn:
            # The reference's FixedBatchNorm everywhere (trained gamma/beta); unlike SIPE/IRN it
            # trains the stem, so that is unfrozen again. fixed_bn=False (training from scratch,
            # no ImageNet statistics to keep): plain BatchNorm, same keys.
            self.model.freeze_pretrained(trainable_affine=True)
            for parameter in (*self.model.conv1.parameters(), *self.model.bn1.parameters()):
                parameter.requires_grad_(True)
        m = self.model
        # The reference's stage views: the same modules under a second name (state-dict aliases).
        self.stage1 = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool)
        self.stage2 = nn.Sequential(m.layer1)
        self.stage3 = nn.Sequential(m.layer2)
        self.stage4 = nn.Sequential(m.layer3)
        self.stage5 = nn.Sequential(m.layer4)
        c = lambda n: scaled_channels(n, width_mult)  # noqa: E731 - local shorthand
        c4, c5, f = m.channels["layer3"], m.channels["layer4"], c(128)
        self.get_qfeats = nn.Sequential(conv_block(True, 9, c(32), 4, 4, 1), conv_block(True, c(32), f, 4, 4, 1),
                                        conv_block(False, f, f, 3))
        self.x4_feats = nn.Sequential(conv_block(True, c4, f, 1))
        self.x5_feats = nn.Sequential(conv_block(True, c5, f, 1))
        head_in = 2 * f if widened else f
        self.get_tran_conv5 = _kernel_head(head_in, c(256))
        self.get_tran_conv4 = _kernel_head(head_in, c(256))
        self.ala2 = _gate(c5, c(128))
        self.ala1 = _gate(c4, c(64))
        self.classifier = nn.Sequential(nn.Conv2d(c5, num_classes + 1, 1, bias=False))

    # ---- forward
    def _head_input(self, project: nn.Module, x: torch.Tensor, q_feat: torch.Tensor | None) -> torch.Tensor:
        """What a kernel head sees: the projected features (bytecode), or, widened, the
        projection of the detached features concatenated with the superpixel features."""
        if self.widened:
            return torch.cat([project(x.detach()), q_feat], dim=1)
        return project(x)

    def forward_features(self, images: torch.Tensor, association: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Every intermediate of the forward before AP (for tests and visualisation)."""
        x4 = self.stage4(self.stage3(self.stage2(self.stage1(images))))
        # The bytecode computes get_qfeats and drops it; in training its BatchNorm statistics
        # still move, so it runs there too and checkpoints hold the same running statistics.
        q_feat = self.get_qfeats(association) if self.widened or self.training else None
        gate4 = self.ala1(F.adaptive_avg_pool2d(x4, 1))
        x4_dp = self.get_tran_conv4(self._head_input(self.x4_feats, x4, q_feat))
        x4_recomposed = upsample_features(x4 * gate4, x4_dp, 1)
        x5 = self.stage5(x4_recomposed)
        gate5 = self.ala2(F.adaptive_avg_pool2d(x5.detach(), 1))
        x5_dp = self.get_tran_conv5(self._head_input(self.x5_feats, x5, q_feat))
        cls_raw = self.classifier(x5 * gate5)
        return {"x4": x4, "q_feat": q_feat, "gate4": gate4, "x4_dp": x4_dp, "x4_recomposed": x4_recomposed,
                "x5": x5, "gate5": gate5, "x5_dp": x5_dp, "cls_raw": cls_raw,
                "logits_min": F.adaptive_avg_pool2d(cls_raw, 1),
                "logits_dcr": upsample_features(cls_raw, x5_dp, 1)}

    def forward(self, images: torch.Tensor, association: torch.Tensor, ap_steps: int = 0,
                ap_threshold: float = AP_THRESHOLD) -> MSAOutput:
        out = self.forward_features(images, association)
        logits = affinity_propagation(out["logits_dcr"], out["x4_recomposed"], ap_steps, ap_threshold)
        return MSAOutput(logits, out["logits_min"])

    # ---- aliases
    def alias_map(self) -> Dict[str, str]:
        """``stageN.*`` key -> the ``model.*`` key holding the same tensor."""
        by_storage: Dict[Tuple[int, Tuple[int, ...]], str] = {}
        aliases: Dict[str, str] = {}
        for key, value in self.state_dict(keep_vars=True).items():
            token = (value.data_ptr(), tuple(value.shape))
            if key.split(".", 1)[0] in STAGE_ALIASES and token in by_storage:
                aliases[key] = by_storage[token]
            else:
                by_storage.setdefault(token, key)
        return aliases

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Strict load that refuses a file whose alias keys disagree with their ``model.*`` keys."""
        for alias, canonical in self.alias_map().items():
            if alias in state_dict and canonical in state_dict and not torch.equal(
                    state_dict[alias].to(state_dict[canonical].dtype), state_dict[canonical]):
                raise RuntimeError(f"state dict alias {alias} differs from {canonical}: they are one tensor")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


# --------------------------------------------------------------------------- optimiser
def msa_optimizer(model: nn.Module, lr: float = 0.1, weight_decay: float = 4e-5,
                  momentum: float = 4e-5) -> torch.optim.SGD:
    """The reference PolyOptimizer's SGD: groups x1/x2/x10/x20 (weight decay on weights only),
    Nesterov, and momentum 4e-5: the reference passes its weight decay positionally into
    SGD's momentum slot (its Q5); the per-group weight decay is the one that applies. The
    project's four groups follow the reference's rule (names with ``model`` are pretrained)."""
    groups = [group for group in parameter_groups(model, lr, weight_decay) if group["params"]]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)


POLY_POWER = {"image": 0.5, "saliency": 0.9}  # the reference's PolyOptimizer "momentum" argument


# --------------------------------------------------------------------------- losses
def make_cam(logits: torch.Tensor) -> torch.Tensor:
    """relu, then divided by the per-channel spatial max: relu(x - 1e-5) / (max + 1e-5)."""
    cams = F.relu(logits)
    peak = cams.flatten(2).max(dim=2)[0][..., None, None]
    return F.relu(cams - 1e-5) / (peak + 1e-5)


def tile_features(features: torch.Tensor, patches: int) -> torch.Tensor:
    """Crop to a multiple of sqrt(patches) and stack the patches patch-major (index patch * N + n)."""
    side = int(math.isqrt(patches))
    if side * side != patches:
        raise ValueError(f"the number of patches must be a square, got {patches}")
    h, w = features.shape[-2] // side, features.shape[-1] // side
    return torch.cat([features[..., i * h:(i + 1) * h, j * w:(j + 1) * w]
                      for i in range(side) for j in range(side)], dim=0)


def merge_features(tiles: torch.Tensor, patches: int, batch: int) -> torch.Tensor:
    """The inverse of :func:`tile_features` (on the cropped size)."""
    side = int(math.isqrt(patches))
    rows = [torch.cat([tiles[(i * side + j) * batch:(i * side + j + 1) * batch] for j in range(side)], dim=3)
            for i in range(side)]
    return torch.cat(rows, dim=2)


def prototypes(probs: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """(N, C, K): P_k = sum_p f(p) probs_k(p) / (sum_p probs_k(p) + 1e-5)."""
    weighted = torch.einsum("nkp,ncp->nck", probs.flatten(2), features.flatten(2))
    return weighted / (probs.flatten(2).sum(dim=2)[:, None] + 1e-5)


def reconstruct(protos: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """R(p) = sum_k P_k probs_k(p) (not renormalised by sum_k probs_k, the reference's Q15)."""
    return torch.einsum("nck,nkhw->nchw", protos, probs)


def ipc_loss(fg_cam: torch.Tensor, target: torch.Tensor, patches: int, ignore_threshold: float,
             ) -> Dict[str, torch.Tensor]:
    """Intra-patch prototype contrast (the reference ``SP_CAM_Loss2``), per tile, pooled.

    A tile is used when both its foreground (1 - bg) and its background reach above
    ``ignore_threshold``; when no tile of the batch does, all are used. Prototypes of the
    background and the classes reconstruct the channel-normalised target; the loss is the
    masked squared error summed over channels, over the masked pixel count. Returns ``ipc``
    and the intermediates.
    """
    cam = tile_features(fg_cam, patches)
    target = tile_features(target, patches)
    target = F.interpolate(target, size=cam.shape[-2:], mode="nearest")
    mask = (target.sum(dim=1, keepdim=True) != 0).to(cam.dtype)
    bg = 1 - cam.max(dim=1, keepdim=True)[0]
    fg_ok = (1 - bg * mask).flatten(1).max(dim=1)[0] > ignore_threshold
    bg_ok = (bg * mask).flatten(1).max(dim=1)[0] > ignore_threshold
    valid = fg_ok & bg_ok
    fallback = not bool(valid.any())
    used = torch.ones_like(valid) if fallback else valid
    mask = mask * used[:, None, None, None].to(mask.dtype)
    probs = torch.cat([bg, cam], dim=1) * mask
    origin = F.normalize(target, dim=1) * mask
    protos = prototypes(probs, origin)
    recon = reconstruct(protos, probs)
    mse = (recon - origin) ** 2 * mask
    ipc = mse.sum() / (mask.sum() + 1e-3)
    return {"ipc": ipc, "valid_before_fallback": valid, "valid": used, "fallback": torch.tensor(fallback),
            "mask": mask, "probs": probs, "origin": origin, "prototypes": protos, "reconstruction": recon,
            "mse": mse}


class IPCSettings(NamedTuple):
    """One IPC variant: the target, the patches, the ignore threshold, AP steps in training."""
    target: str
    patches: int
    ignore_threshold: float
    train_ap_steps: int
    poly_power: float


IPC_VARIANTS: Dict[str, IPCSettings] = {
    "image": IPCSettings("image", 9, 0.1, AP_STEPS, POLY_POWER["image"]),          # train_cls_image.py
    "saliency": IPCSettings("saliency", 1, 0.01, 0, POLY_POWER["saliency"]),       # train_cls_sal.py
}


def padding_mask(images: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Pixels of the cell grid that are not crop padding: nearest-downsampled channel sum != 0
    (the crop pads with 0, the normalised mean, the reference's Q10)."""
    return F.interpolate(images, size=tuple(size), mode="nearest").sum(dim=1, keepdim=True) != 0


def ipc_target(variant: str, images: torch.Tensor, association: torch.Tensor,
               saliency: torch.Tensor | None = None) -> torch.Tensor:
    """The superpixel-pooled target on the cell grid, zero on crop padding.

    ``image``: the normalised RGB image; ``saliency``: [s, 1 - s] of the saliency map in [0, 1].
    """
    if variant == "image":
        pooled = pool_features(images, association, CELL)
    elif variant == "saliency":
        if saliency is None:
            raise ValueError("the saliency variant needs saliency maps")
        s = pool_features(saliency, association, CELL)
        pooled = torch.cat([s, 1 - s], dim=1)
    else:
        raise ValueError(f"unknown IPC variant {variant!r}; known: {', '.join(IPC_VARIANTS)}")
    return pooled * padding_mask(images, pooled.shape[-2:]).to(pooled.dtype)


def msa_losses(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, association: torch.Tensor,
               variant: str = "image", saliency: torch.Tensor | None = None,
               ipc_weight: float = IPC_WEIGHT, ap_threshold: float = AP_THRESHOLD) -> Dict[str, torch.Tensor]:
    """One training step's loss terms: ``cls``, ``ipc`` (unweighted) and ``total``.

    ``labels`` (N, C) foreground multi-hot (the background channel is not trained).
    """
    settings = IPC_VARIANTS[variant]
    out = model(images, association, settings.train_ap_steps, ap_threshold)
    cls = F.multilabel_soft_margin_loss(out.logits_min[:, 1:, 0, 0], labels)
    fg_cam = make_cam(out.logits[:, 1:]) * labels[:, :, None, None]
    target = ipc_target(variant, images, association, saliency)
    ipc = ipc_loss(fg_cam, target, settings.patches, settings.ignore_threshold)["ipc"]
    return {"cls": cls, "ipc": ipc, "total": cls + ipc_weight * ipc}


# --------------------------------------------------------------------------- inference
def stretched_size(height: int, width: int, scale: float) -> Tuple[int, int]:
    """The evaluator's view size: ceil(round(h |s|) / 16) * 16 (a stretch, not a pad)."""
    return (int(math.ceil(round(height * abs(scale)) / CELL) * CELL),
            int(math.ceil(round(width * abs(scale)) / CELL) * CELL))


def msa_cams(model: MSANet, spixel: nn.Module, image: torch.Tensor, scales: Sequence[float],
             ap_steps: int = AP_STEPS, ap_threshold: float = AP_THRESHOLD, sum_at: str = "image",
             ) -> Dict[str, Any]:
    """The reference evaluator's full-resolution CAMs of one normalised image (1, 3, h, w).

    For each scale s (negative: flipped) the image is stretched to multiples of 16, the
    association and the AP logits computed, the logits upsampled through the association,
    resized to the summation size, un-flipped and summed; then :func:`make_cam` and a bilinear
    resize to h x w. ``sum_at``: ``"image"`` sums at the last scale's size (the image
    evaluator), ``"saliency"`` at scale 1's (the saliency evaluator). Returns ``cams``
    (1, C+1, h, w; channel 0 unused) plus the per-scale ``association`` and ``logits``.
    """
    height, width = image.shape[-2:]
    maps, associations, logits_per_scale = [], [], []
    for scale in scales:
        size = stretched_size(height, width, scale)
        flip = scale < 0
        q_input = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        direct = (round(height * abs(scale)), round(width * abs(scale)))
        c_input = F.interpolate(F.interpolate(image, size=direct, mode="bilinear", align_corners=False),
                                size=size, mode="bilinear", align_corners=False)
        if flip:
            q_input, c_input = q_input.flip(-1), c_input.flip(-1)
        association = spixel(q_input)
        logits = model(c_input, association, ap_steps, ap_threshold).logits
        full = upsample_features(logits, association, CELL)
        associations.append(association)
        logits_per_scale.append(logits)
        maps.append((full, flip))
    if sum_at == "image":
        target = maps[-1][0].shape[-2:]
    elif sum_at == "saliency":
        target = stretched_size(height, width, 1.0)
    else:
        raise ValueError(f"sum_at must be 'image' or 'saliency', got {sum_at!r}")
    total = None
    for full, flip in maps:
        full = F.interpolate(full, size=target, mode="bilinear", align_corners=False)
        full = full.flip(-1) if flip else full
        total = full if total is None else total + full
    cams = F.interpolate(make_cam(total), size=(height, width), mode="bilinear", align_corners=False)
    return {"cams": cams, "summed": total, "association": associations, "logits": logits_per_scale}


def msa_cam_dict(model: MSANet, spixel: nn.Module, image: np.ndarray, label: np.ndarray,
                 scales: Sequence[float], device: torch.device | str = "cpu", ap_steps: int = AP_STEPS,
                 ap_threshold: float = AP_THRESHOLD, sum_at: str = "image") -> Dict[int, np.ndarray]:
    """The CAM dict of one uint8 RGB image: :func:`msa_cams` at ``scales`` and their mirrors
    (the reference evaluator's ``__main__``: 0.5, 1, 1.5, 2 and flips), foreground classes of
    ``label`` only (0-based keys), float32 in [0, 1] at the image size."""
    tensor = torch.from_numpy(hwc_to_chw(normalize(image, MSA_MEAN, MSA_STD)))[None].to(device)
    views = [float(s) for s in scales] + [-float(s) for s in scales]
    with torch.inference_mode():
        cams = msa_cams(model, spixel, tensor, views, ap_steps, ap_threshold, sum_at)["cams"][0, 1:]
    cams = cams.float().cpu().numpy()
    return {int(c): cams[c].astype(np.float32) for c in np.nonzero(label)[0]}


def affinity_statistics(model: MSANet, spixel: nn.Module, image: np.ndarray, threshold: float = AP_THRESHOLD,
                        device: torch.device | str = "cpu") -> Dict[str, float]:
    """What AP would propagate over, for one uint8 RGB image at scale 1 (no labels needed).

    ``above``: the share of the off-diagonal layer-3 cosine affinities (clamped as AP clamps
    them) at or above ``threshold``, i.e. of the grid each propagation step averages over;
    ``q50`` / ``q90``: their median and 90th percentile.
    """
    tensor = torch.from_numpy(hwc_to_chw(normalize(image, MSA_MEAN, MSA_STD)))[None].to(device)
    tensor = F.interpolate(tensor, size=stretched_size(*image.shape[:2], 1.0), mode="bilinear", align_corners=False)
    with torch.inference_mode():
        features = model.forward_features(tensor, spixel(tensor))["x4_recomposed"]
        affinity = cosine_affinity(features)[0].clamp(0.01, 0.999).float()
    off_diagonal = affinity[~torch.eye(affinity.shape[0], dtype=torch.bool, device=affinity.device)]
    quantiles = torch.quantile(off_diagonal.cpu(), torch.tensor([0.5, 0.9]))
    return {"above": float((off_diagonal >= threshold).float().mean()), "q50": float(quantiles[0]),
            "q90": float(quantiles[1])}
