"""SIPE (Chen et al., CVPR 2022) and AE-SIPE (affinity-enhanced SIPE): image-specific prototypes.

One network, :class:`SIPENet`, with ``affinity_enhanced=True`` for AE-SIPE. The arithmetic
follows the reference code (``../shared/reference/sipe/README.md``, section 4):

* general CAM: a 1x1 classifier on the last stage, ReLU, divided by its spatial max + 1e-5;
  background = 1 - max over *all* foreground channels (absent classes included);
* hierarchical features: 1x1 side convs on the **detached** outputs of layer1..layer4, each
  L2-normalised per pixel, bilinearly resized (align_corners=False) to the layer3 grid and
  concatenated;
* structure-aware seeds (:func:`structure_seeds`): soft IoU of each pixel's feature
  correlation row with each CAM channel, background IoU x 0.5, arg-max one-hot, then masked;
* background-aware prototypes (:func:`prototypes`): seed-weighted feature *sums over the
  whole grid / (h w)*; IS-CAM (:func:`reactivate`) = ReLU(cosine(feature, prototype));
* AE-SIPE: :class:`PAMR` on the detached IS-CAM at 1/4 of the de-normalised image, its
  arg-max as new seeds, new prototypes, and the enhanced IS-CAM divided by its max.

Training losses (:func:`sipe_losses`): multi-label soft margin on the pooled raw CAM + GSC =
mean |general CAM - IS-CAM / (max + 1e-5)| over every element (padding and absent channels
included, as the reference). The reference's frozen parts are kept: layer2's output is
detached, so conv1..layer2 never learn (they run without a graph here), layer3/4 learn only
through the classifier, the side convs only through GSC.

State-dict keys are the reference's, aliases included (``resnet50.*``, ``stage0.0.*`` ..
``backbone.4.0.*``, ``sideK`` / ``classifier`` and ``newly_added.J``, AE-SIPE's
``_aff.aff_{x,m,std}.kernel``), so a released ``{'net': state_dict}`` checkpoint loads strictly.
The aliases are views of the same tensors; loading checks that every alias carries the same
value (a file whose aliases disagree is refused instead of silently keeping the last).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from network.backbones import OUTPUT_STRIDE_16, build_backbone
from network.layers import scaled_channels
from tool.contract import IMAGENET_MEAN, IMAGENET_STD
from tool.device import autocast_context, images_to_device

NORM_EPS = 1e-5          # every max / L2 normalisation of the reference
BACKGROUND_IOU_FACTOR = 0.5
SIDE_CHANNELS = (128, 128, 256, 256)
PAMR_ITERATIONS = 10
PAMR_DILATIONS = (1, 2, 4, 8, 12, 24)


# ===================================================================== head functions
def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    """Each pixel's vector (dim 1) divided by its L2 norm + 1e-5."""
    return x / (torch.norm(x, dim=1, keepdim=True) + NORM_EPS)


def max_normalise(x: torch.Tensor) -> torch.Tensor:
    """Each (sample, channel) map divided by its spatial max + 1e-5."""
    return x / (F.adaptive_max_pool2d(x, (1, 1)) + NORM_EPS)


def hierarchical_features(sides: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2-normalised side features resized to the third side's grid (align_corners=False), concatenated."""
    size = sides[2].shape[-2:]
    return torch.cat([F.interpolate(l2_normalise(side), size, mode="bilinear", align_corners=False)
                      for side in sides], dim=1)


def general_cam(cam_raw: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(n, C+1, h, w) normalised CAM, channel 0 = 1 - max foreground, resized (align_corners=True)."""
    norm_cam = max_normalise(F.relu(cam_raw))
    background = 1 - norm_cam.max(dim=1, keepdim=True)[0]
    norm_cam = torch.cat([background, norm_cam], dim=1)
    if tuple(norm_cam.shape[-2:]) != tuple(size):
        norm_cam = F.interpolate(norm_cam, tuple(size), mode="bilinear", align_corners=True)
    return norm_cam


def structure_seeds(norm_cam: torch.Tensor, mask: torch.Tensor, feature: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """SIPE's ``get_seed``: (one-hot seeds x mask, softmax probabilities), both (n, C+1, h, w).

    S = ReLU(f^T f) of per-pixel normalised features; for channel c and pixel i,
    IoU = sum_j S_ij m_cj / (sum_j S_ij + sum_j m_cj - sum_j S_ij m_cj); the background IoU is
    halved; the arg-max (first maximum on ties) runs over every channel *before* ``mask``
    (the valid mask, or the label (n, C+1, 1, 1)) is applied, so a pixel won by an absent
    class gets no seed.
    """
    n, c, h, w = norm_cam.shape
    flat = l2_normalise(feature.reshape(n, -1, h * w))
    correlation = F.relu(torch.matmul(flat.transpose(1, 2), flat))        # (n, hw, hw)
    cam_flat = norm_cam.reshape(n, c, h * w)
    inter = torch.matmul(cam_flat, correlation.transpose(1, 2))            # sum_j S_ij m_cj
    union = correlation.sum(-1).unsqueeze(1) + cam_flat.sum(-1, keepdim=True) - inter
    iou = (inter / union).reshape(n, c, h, w)
    iou = torch.cat([iou[:, :1] * BACKGROUND_IOU_FACTOR, iou[:, 1:]], dim=1)
    probs = F.softmax(iou, dim=1)
    seeds = F.one_hot(iou.argmax(1), c).permute(0, 3, 1, 2).to(norm_cam.dtype)
    return seeds * mask, probs


def prototypes(seeds: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    """(n, C+1, D, 1, 1): sum of seed_c * feature over the grid / (h w) (seeds 'nearest'-resized)."""
    n, d, h, w = feature.shape
    if tuple(seeds.shape[-2:]) != (h, w):
        seeds = F.interpolate(seeds, (h, w), mode="nearest")
    summed = torch.einsum("nkp,ndp->nkd", seeds.reshape(n, -1, h * w), feature.reshape(n, d, h * w))
    return (summed / (h * w))[..., None, None]


def reactivate(prototype: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    """IS-CAM (n, C+1, h, w) = ReLU(cosine(feature, prototype_c)), torch's eps 1e-8 per norm."""
    proto = prototype.flatten(2)                                            # (n, K, D)
    proto = proto / proto.norm(dim=2, keepdim=True).clamp_min(1e-8)
    feat = feature / feature.norm(dim=1, keepdim=True).clamp_min(1e-8)
    return F.relu(torch.einsum("nkd,ndhw->nkhw", proto, feat))


def denormalise(images: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised (n, 3, H, W) back to [0, 1] (x * std + mean, float32)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=images.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=images.device)[:, None, None]
    return images.float() * std + mean


# ===================================================================== PAMR (AE-SIPE)
def _shift_kernel(positions: Sequence[tuple[int, int]], neighbour: float = 1.0,
                  centre: float = 0.0) -> torch.Tensor:
    """(len(positions), 1, 3, 3): ``neighbour`` at each position, ``centre`` at (1, 1) of every kernel."""
    kernel = torch.zeros(len(positions), 1, 3, 3)
    for index, (row, col) in enumerate(positions):
        if centre:
            kernel[index, 0, 1, 1] = centre
        kernel[index, 0, row, col] = neighbour
    return kernel


NEIGHBOURS = ((0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2))  # 3x3 minus the centre


class _LocalShifts(nn.Module):
    """Fixed 3x3 kernels applied at each dilation with replicate padding: (B, K, P*len(d), H, W)."""

    def __init__(self, kernel: torch.Tensor, dilations: Sequence[int]) -> None:
        super().__init__()
        self.dilations = tuple(dilations)
        self.register_buffer("kernel", kernel)

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        # Fixed kernels (the reference asserts them in every forward): a file must hold these values.
        value = state_dict.get(prefix + "kernel")
        if value is not None and (value.shape != self.kernel.shape or not torch.equal(value.cpu(), self.kernel.cpu())):
            raise ValueError(f"{prefix}kernel differs from PAMR's fixed shift kernel")
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, k, h, w = x.shape
        flat = x.reshape(b * k, 1, h, w)
        kernel = self.kernel.to(x.dtype)
        shifted = [F.conv2d(F.pad(flat, [d] * 4, mode="replicate"), kernel, dilation=d) for d in self.dilations]
        return torch.cat(shifted, 1).reshape(b, k, -1, h, w)


class PAMR(nn.Module):
    """Pixel-adaptive mask refinement (Araslanov & Roth 2020), as AE-SIPE configures it.

    Affinity of pixel i to its 8 neighbours at each dilation (48 in all, centre excluded,
    replicate padding): softmax over neighbours of the channel mean of
    -|I_i - I_n| / (1e-8 + 0.1 std_i), std = unbiased std of the 9 samples at every dilation.
    The mask is upsampled to the image (bilinear, align_corners=True) and propagated
    ``num_iter`` times: m_i <- sum_n aff_in m_n.
    """

    def __init__(self, num_iter: int = PAMR_ITERATIONS, dilations: Sequence[int] = PAMR_DILATIONS) -> None:
        super().__init__()
        self.num_iter = num_iter
        self.aff_x = _LocalShifts(_shift_kernel(NEIGHBOURS, -1.0, 1.0), dilations)  # centre - neighbour
        self.aff_m = _LocalShifts(_shift_kernel(NEIGHBOURS), dilations)              # neighbour
        window = NEIGHBOURS[:4] + ((1, 1),) + NEIGHBOURS[4:]
        self.aff_std = _LocalShifts(_shift_kernel(window), dilations)                # window incl. centre

    def affinity(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, 48, H, W) soft-maxed affinities of ``image`` (B, 3, H, W)."""
        std = self.aff_std(image).std(2, keepdim=True)
        logits = -torch.abs(self.aff_x(image)) / (1e-8 + 0.1 * std)
        return F.softmax(logits.mean(1, keepdim=True), 2)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = F.interpolate(mask, size=image.shape[-2:], mode="bilinear", align_corners=True)
        affinity = self.affinity(image)
        for _ in range(self.num_iter):
            mask = (self.aff_m(mask) * affinity).sum(2)
        return mask


# ===================================================================== network
class SIPENet(nn.Module):
    """SIPE / AE-SIPE seed classifier on a ResNet (output stride 16) with the reference's keys.

    ``forward(images, valid_mask, images_raw=None)`` is the training form: ``valid_mask``
    (n, C+1, h, w) on the stride-16 grid (crop area x [1, label]); AE-SIPE also needs the
    de-normalised images (``images_raw``, :func:`denormalise` when None). It returns
    ``score`` (n, C, 1, 1), ``cam`` (general CAM, masked), ``seeds``, ``prototypes``,
    ``IS_cam`` and ``probs`` (AE-SIPE: ``IS_cam`` is the enhanced, max-normalised one;
    ``pamr`` the refined map). :meth:`infer_scale` is the inference form on one flip pair.
    """

    new_layers = ("classifier", "side1", "side2", "side3", "side4")

    def __init__(self, num_classes: int = 20, backbone: str = "resnet50", width_mult: float = 1.0,
                 affinity_enhanced: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.affinity_enhanced = affinity_enhanced
        # The attribute keeps the reference's name (resnet50.*) for ResNet-101 too, so one loader fits both.
        self.resnet50 = build_backbone(backbone, width_mult, **OUTPUT_STRIDE_16)
        net = self.resnet50
        self.stage0 = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.stage1 = nn.Sequential(net.layer1)
        self.stage2 = nn.Sequential(net.layer2)
        self.stage3 = nn.Sequential(net.layer3)
        self.stage4 = nn.Sequential(net.layer4)
        side_channels = [scaled_channels(c, width_mult) for c in SIDE_CHANNELS]
        stage_channels = [net.channels[f"layer{k}"] for k in range(1, 5)]
        self.side1, self.side2, self.side3, self.side4 = (
            nn.Conv2d(cin, cout, 1, bias=False) for cin, cout in zip(stage_channels, side_channels))
        self.classifier = nn.Conv2d(stage_channels[3], num_classes, 1, bias=False)
        self.backbone = nn.ModuleList([self.stage0, self.stage1, self.stage2, self.stage3, self.stage4])
        self.newly_added = nn.ModuleList([self.classifier, self.side1, self.side2, self.side3, self.side4])
        if affinity_enhanced:
            self._aff = PAMR()
        self._register_load_state_dict_pre_hook(self._check_aliases)

    def freeze_pretrained(self) -> "SIPENet":
        """The reference's fine-tuning set-up: FixedBatchNorm everywhere (running statistics,
        trained gamma/beta), conv1/bn1 fixed. ``stage0`` is re-linked to the new ``bn1``."""
        self.resnet50.freeze_pretrained(trainable_affine=True)
        self.stage0[1] = self.resnet50.bn1
        return self

    # ---- aliases
    def alias_groups(self) -> List[List[str]]:
        """State-dict keys that name one tensor (first name first), for every shared tensor."""
        groups: Dict[int, List[str]] = {}
        for key, value in self.state_dict(keep_vars=True).items():
            groups.setdefault(id(value), []).append(key)
        return [keys for keys in groups.values() if len(keys) > 1]

    def _check_aliases(self, state_dict, prefix, *args) -> None:
        for keys in self.alias_groups():
            present = [prefix + key for key in keys if prefix + key in state_dict]
            first = state_dict[present[0]] if present else None
            for key in present[1:]:
                value = state_dict[key]
                if value.shape == first.shape and not torch.equal(value, first):
                    raise ValueError(f"aliases {present[0]} and {key} name one tensor but hold different values")

    # ---- features
    def features(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``x4`` (last stage), ``cam_raw`` (classifier on x4) and ``sides`` (list of 4)."""
        # The reference detaches layer2's output: conv1..layer2 never receive a gradient, so they
        # run without a graph (same values, less memory).
        with torch.no_grad():
            x1 = self.stage1(self.stage0(images))
            x2 = self.stage2(x1)
        x3 = self.stage3(x2)
        x4 = self.stage4(x3)
        sides = [side(x.detach()) for side, x in zip((self.side1, self.side2, self.side3, self.side4),
                                                     (x1, x2, x3, x4))]
        return {"x4": x4, "cam_raw": self.classifier(x4), "sides": sides}

    def forward(self, images: torch.Tensor, valid_mask: torch.Tensor,
                images_raw: torch.Tensor | None = None) -> Dict[str, torch.Tensor]:
        features = self.features(images)
        if self.affinity_enhanced and images_raw is None:
            images_raw = denormalise(images)
        return self.head(features["cam_raw"], features["x4"], features["sides"], valid_mask, images_raw)

    def head(self, cam_raw: torch.Tensor, x4: torch.Tensor, sides: Sequence[torch.Tensor],
             valid_mask: torch.Tensor, images_raw: torch.Tensor | None = None) -> Dict[str, torch.Tensor]:
        """Everything after the convolutions (training form); the reference tests inject its inputs."""
        hie_fea = hierarchical_features(sides)
        grid = hie_fea.shape[-2:]
        norm_cam = general_cam(cam_raw, grid) * valid_mask
        # SIPE locates seeds with the last stage's features; AE-SIPE with the hierarchical ones.
        seed_feature = hie_fea if self.affinity_enhanced else x4
        seeds, probs = structure_seeds(norm_cam, valid_mask, seed_feature)
        proto = prototypes(seeds, hie_fea)
        is_cam = reactivate(proto, hie_fea)
        out = {"score": F.adaptive_avg_pool2d(cam_raw, 1), "cam": norm_cam, "seeds": seeds,
               "prototypes": proto, "IS_cam": is_cam, "probs": probs}
        if self.affinity_enhanced:
            out.update(self.enhance(is_cam, hie_fea, images_raw))
        return out

    def enhance(self, is_cam: torch.Tensor, hie_fea: torch.Tensor, images_raw: torch.Tensor
                ) -> Dict[str, torch.Tensor]:
        """AE-SIPE: PAMR on the detached IS-CAM at 1/4 image size, new seeds, enhanced IS-CAM."""
        h, w = images_raw.shape[-2:]
        with torch.no_grad():
            small = F.interpolate(images_raw.float(), (h // 4, w // 4), mode="bilinear", align_corners=True)
            quarter = self._aff(small, is_cam.detach().float())
            refined = F.interpolate(quarter, hie_fea.shape[-2:], mode="bilinear", align_corners=True)
            # Not masked by the label or the crop (reference); absent classes never win (IS-CAM 0).
            decided = F.one_hot(refined.argmax(1), is_cam.shape[1]).permute(0, 3, 1, 2).to(hie_fea.dtype)
        proto = prototypes(decided, hie_fea)
        return {"pamr": refined, "pamr_quarter": quarter, "dec_bin_mask": decided, "prototypes": proto,
                "IS_cam": max_normalise(reactivate(proto, hie_fea))}

    # ---- inference
    def infer_scale(self, pair: torch.Tensor, label: torch.Tensor,
                    image_raw: torch.Tensor | None = None) -> Dict[str, torch.Tensor]:
        """The reference ``CAM.forward`` on one scale: ``pair`` (2, 3, h, w) = image and its mirror.

        ``label`` (C+1,) with background 1. Raw CAMs and hierarchical features of the pair are
        summed (mirror flipped back) before normalisation; no valid mask. AE-SIPE refines with
        the unflipped image (``image_raw`` (1, 3, h, w), de-normalised when None). Returns
        ``norm_cam``, ``seeds`` and ``IS_cam`` (C+1, h', w') (AE-SIPE: max-normalised).
        """
        features = self.features(pair)
        return self.infer_head(features["cam_raw"], features["sides"], label,
                               image_raw if image_raw is not None or not self.affinity_enhanced
                               else denormalise(pair[:1]))

    def infer_head(self, cam_raw: torch.Tensor, sides: Sequence[torch.Tensor], label: torch.Tensor,
                   image_raw: torch.Tensor | None = None) -> Dict[str, torch.Tensor]:
        hie_fea = hierarchical_features(sides)
        cam_raw = (cam_raw[0] + cam_raw[1].flip(-1))[None]
        hie_fea = (hie_fea[0] + hie_fea[1].flip(-1))[None]
        norm_cam = general_cam(cam_raw, hie_fea.shape[-2:])
        mask = label.reshape(1, -1, 1, 1).to(norm_cam.dtype)
        seeds, _ = structure_seeds(norm_cam, mask, hie_fea)
        is_cam = reactivate(prototypes(seeds, hie_fea), hie_fea)
        out = {"norm_cam": norm_cam[0], "seeds": seeds[0], "IS_cam": is_cam[0]}
        if self.affinity_enhanced:
            enhanced = self.enhance(is_cam, hie_fea, image_raw)
            out.update({key: enhanced[key][0] for key in ("IS_cam", "pamr", "pamr_quarter", "dec_bin_mask")})
        return out


# ===================================================================== losses
def valid_mask_on_grid(valid: torch.Tensor, labels: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """(n, C+1, h, w): the crop area (n, H, W) on every channel x [1, label], 'nearest' to ``grid``."""
    mask = torch.cat([torch.ones_like(labels[:, :1]), labels], dim=1)[..., None, None] * valid[:, None].float()
    return F.interpolate(mask, tuple(grid), mode="nearest")


def sipe_losses(out: Dict[str, torch.Tensor], labels: torch.Tensor,
                weights: Dict[str, float] | None = None) -> Dict[str, torch.Tensor]:
    """``cls`` (multi-label soft margin on the pooled CAM), ``gsc`` and ``total`` = cls_w cls + gsc_w gsc."""
    weights = {"cls": 1.0, "gsc": 1.0, **(weights or {})}
    score = out["score"].float()
    cls = F.multilabel_soft_margin_loss(score, labels.to(score.dtype).reshape(score.shape))
    gsc = torch.mean(torch.abs(out["cam"].float() - max_normalise(out["IS_cam"].float())))
    return {"cls": cls, "gsc": gsc, "total": weights["cls"] * cls + weights["gsc"] * gsc}


def fuse_is_cams(is_cams: Sequence[torch.Tensor], image_hw: Sequence[int], label: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """SIPE's multi-scale fusion: ``(keys, IS_CAM)``.

    Each (C+1, h, w) IS-CAM is resized to the image (bilinear, align_corners=False), the
    scales are summed and divided by the per-channel max + 1e-5; ``keys`` are the channels
    of the label with background (ascending, 0 = background), IS_CAM (K, H, W).
    """
    total = sum(F.interpolate(cam[None].float(), tuple(image_hw), mode="bilinear", align_corners=False)[0]
                for cam in is_cams)
    total = total / (F.adaptive_max_pool2d(total, (1, 1)) + NORM_EPS)
    keys = torch.nonzero(label).flatten()
    return keys, total[keys]


def sipe_image_cams(model: SIPENet, views: Sequence[torch.Tensor], label: torch.Tensor,
                    image_hw: Sequence[int], device: torch.device, amp: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keys, IS_CAM)`` of one image (the reference make_cam): every view pair through
    :meth:`SIPENet.infer_scale`, then :func:`fuse_is_cams`. ``label`` (C,) foreground multi-hot;
    ``views``: (2, 3, h, w) image + mirror per scale. Runs in float32 after the convolutions.
    """
    padded = torch.cat([torch.ones(1), label.float().cpu()]).to(device)
    is_cams = []
    with torch.inference_mode():
        for pair in views:
            pair = images_to_device(pair, device)
            with autocast_context(device, amp):
                features = model.features(pair)
            sides = [side.float() for side in features["sides"]]
            raw = denormalise(pair[:1]) if model.affinity_enhanced else None
            with torch.autocast(device_type=torch.device(device).type, enabled=False):  # even inside a CPU bf16 run
                is_cams.append(model.infer_head(features["cam_raw"].float(), sides, padded, raw)["IS_cam"])
    keys, fused = fuse_is_cams(is_cams, image_hw, padded)
    return keys.cpu(), fused.cpu()
