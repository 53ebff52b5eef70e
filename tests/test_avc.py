"""AVC/SEAM network: PCM against the reference vectors, SEAM keys, each loss term by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from network import build_model
from network.avc import (AVCNet, adaptive_min_pooling_loss, affinity_cross_view_loss,
                         affinity_semantic_loss, avc_training_losses, classification_loss,
                         equivariant_cross_regularization, equivariant_regularization,
                         max_norm, max_onehot, normalize_cam_for_pcm, normalized_affinity, pcm,
                         with_background)
from tests.reference_data import load_reference, portable_state_dict, reference_keys


class Constant(nn.Module):
    """Stands in for a layer: returns a recorded tensor whatever the input."""

    def __init__(self, value: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("value", torch.from_numpy(value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value


# ------------------------------------------------------------------ reference vectors
def test_pcm_matches_reference() -> None:
    ref = load_reference("pcm.npz")
    cam_d_norm = normalize_cam_for_pcm(torch.from_numpy(ref["raw_cam"]))
    np.testing.assert_allclose(cam_d_norm.numpy(), ref["cam_d_norm"], atol=1e-5, rtol=1e-4)
    f9 = nn.Conv2d(195, 192, 1, bias=False)
    with torch.no_grad():
        f9.weight.copy_(torch.from_numpy(ref["f9_weight"]))
        out = pcm(torch.from_numpy(ref["cam_d_norm"]), torch.from_numpy(ref["f"]), f9)
    np.testing.assert_allclose(out.features.flatten(2).numpy(), ref["f9_out_l2norm"], atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(out.affinity.numpy(), ref["aff"], atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(out.cam_rv.numpy(), ref["cam_rv"], atol=1e-5, rtol=1e-4)


def test_forward_with_recorded_heads_matches_reference() -> None:
    """SEAM's Net.forward with the backbone returning zeros and the heads replaced, as recorded."""
    ref = load_reference("pcm.npz")
    up = load_reference("pcm_upsampled.npz")
    model = AVCNet(width_mult=0.125).eval()
    zeros = {name: torch.zeros(2, ch, 12, 12) for name, ch in model.channels.items()}
    model.forward_as_dict = lambda x: zeros
    model.fc8 = Constant(ref["raw_cam"])
    model.f8_3 = Constant(ref["f8_3_pre"])
    model.f8_4 = Constant(ref["f8_4_pre"])
    with torch.no_grad():
        model.f9.weight.copy_(torch.from_numpy(ref["f9_weight"]))
        x = torch.from_numpy(ref["x"])
        out = model(x)
        cam_up = F.interpolate(out["cam"], (90, 90), mode="bilinear", align_corners=True)
        cam_rv_up = model.forward_cam(x)
    np.testing.assert_allclose(out["cam_rv"].numpy(), ref["cam_rv"], atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(cam_up[0].numpy(), up["cam_up_0"], atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(cam_rv_up[0].numpy(), up["cam_rv_up_0"], atol=1e-5, rtol=1e-4)


def test_seam_keys_and_full_forward_match_reference() -> None:
    with torch.device("meta"):  # no default init: every tensor is assigned below
        model = AVCNet().eval()
    expected = reference_keys("SEAM network.resnet38_SEAM.Net")
    state = model.state_dict()
    assert len(expected) == 232 and list(state) == list(expected)
    assert all(list(state[k].shape) == shape for k, shape in expected.items())
    model.load_state_dict(portable_state_dict(state), assign=True)
    ref = load_reference("seam_forward_portable.npz")
    x = torch.from_numpy(ref["x"])
    with torch.no_grad():
        out = model(x)
    cam = F.interpolate(out["cam"], x.shape[-2:], mode="bilinear", align_corners=True)
    cam_rv = F.interpolate(out["cam_rv"], x.shape[-2:], mode="bilinear", align_corners=True)
    np.testing.assert_allclose(cam.numpy(), ref["cam"], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(cam_rv.numpy(), ref["cam_rv"], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------ network basics
def test_small_model_shapes_and_registry() -> None:
    torch.manual_seed(0)
    model = build_model("avc", num_classes=3, width_mult=0.125).eval()
    assert isinstance(model, AVCNet) and AVCNet.new_layers == ("fc8", "f8_3", "f8_4", "f9")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
    assert out["cam"].shape == out["cam_rv"].shape == (2, 4, 8, 8)
    assert out["pcm_features"].shape == (2, 192, 8, 8) and out["affinity"].shape == (2, 64, 64)
    torch.testing.assert_close(out["pcm_features"].norm(dim=1), torch.ones(2, 8, 8), atol=1e-4, rtol=0)
    torch.testing.assert_close(out["affinity"].sum(dim=1), torch.ones(2, 64), atol=1e-4, rtol=0)
    with torch.no_grad():
        assert model.forward_cam(x).shape == (2, 4, 64, 64)
        both = model([x, x[:, :, :40, :40]])
    assert torch.equal(both[0]["cam_rv"], out["cam_rv"]) and both[1]["cam"].shape[-1] == 5
    with pytest.raises(ValueError, match="unknown model"):
        build_model("nope")


# ------------------------------------------------------------------ loss terms by hand
def test_max_norm_background_and_onehot() -> None:
    cam = torch.tensor([0.0, 1.0, 3.0, -2.0]).view(1, 1, 2, 2)
    expected = torch.tensor([0.0, 1 - 1e-5, 3 - 1e-5, 0.0]) / (3 + 1e-5)
    torch.testing.assert_close(max_norm(cam).flatten(), expected)
    cam = torch.tensor([[0.3, 0.9], [0.5, 0.2], [0.5, 0.7]]).view(1, 3, 1, 2)  # bg, fg1, fg2
    torch.testing.assert_close(with_background(cam)[0, 0].flatten(), torch.tensor([0.5, 0.3]))
    onehot = max_onehot(cam)[0].flatten(1)
    # ties (pixel 0: 0.5, 0.5) are all kept; background untouched
    torch.testing.assert_close(onehot, torch.tensor([[0.3, 0.9], [0.5, 0.0], [0.5, 0.7]]))


def test_classification_and_min_pooling() -> None:
    cam = torch.zeros(1, 3, 2, 2)
    cam[0, 1] = 2.0                                   # pooled fg logits: 2, 0
    labels = torch.tensor([[1.0, 0.0]])
    expected = (math.log1p(math.exp(-2.0)) + math.log(2.0)) / 2
    assert classification_loss(cam, labels).item() == pytest.approx(expected, rel=1e-6)
    fg = torch.tensor([[1.0, -1.0, 0.5, 2.0], [0.2, -3.0, 0.1, 0.0]]).view(1, 2, 2, 2)
    # pixel maxima 1.0, -1.0, 0.5, 2.0; k = 1; relu(-1.0) = 0
    assert adaptive_min_pooling_loss(fg).item() == 0.0
    fg = torch.arange(16.0).view(1, 1, 4, 4) - 2    # k = 4 lowest: -2, -1, 0, 1 -> relu sum 1
    assert adaptive_min_pooling_loss(fg).item() == pytest.approx(1 / 4)


def test_er_and_ecr() -> None:
    a = torch.tensor([9.0, 0.0, 0.5, 1.0]).view(1, 2, 1, 2)
    b = torch.tensor([-9.0, 0.0, 0.0, 0.0]).view(1, 2, 1, 2)
    assert equivariant_regularization(a, b).item() == pytest.approx(0.75)  # bg channel ignored
    target = torch.tensor([0.2, 0.4, 0.8, 0.1, 0.6, 0.3]).view(1, 3, 1, 2)
    refined = torch.zeros(1, 3, 1, 2, requires_grad=True)
    # max_onehot(target): bg [0.2, 0.4]; fg1 [0.8, 0]; fg2 [0, 0.3]; k = int(6 * 0.2) = 1
    loss = equivariant_cross_regularization(target, refined)
    assert loss.item() == pytest.approx(0.8)
    loss.backward()
    assert refined.grad.abs().sum().item() == pytest.approx(1.0)


def test_affinity_cross_view_by_hand() -> None:
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    features_a = torch.stack([e1, e2], dim=1).view(1, 2, 1, 2)   # orthogonal pixels
    same = torch.stack([e1, e1], dim=1).view(1, 2, 1, 2)
    affinity_same = normalized_affinity(same)                      # every entry 1 / (2 + eps)
    # identity / (1+eps) vs all 1/(2+eps): per column |1/(1+e) - 1/(2+e)| + 1/(2+e)
    eps = 1e-5
    expected = abs(1 / (1 + eps) - 1 / (2 + eps)) + 1 / (2 + eps)
    loss = affinity_cross_view_loss(features_a, affinity_same, (1, 2))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert affinity_cross_view_loss(same, affinity_same, (1, 2)).item() == pytest.approx(0, abs=1e-7)
    # resampling to a different grid: constant features stay constant
    constant = torch.ones(1, 3, 4, 4)
    affinity_small = normalized_affinity(constant[:, :, :2, :2] / math.sqrt(3))
    loss = affinity_cross_view_loss(constant / math.sqrt(3), affinity_small, (2, 2))
    assert loss.item() == pytest.approx(0, abs=1e-6)


def test_affinity_semantic_by_hand() -> None:
    # 3 pixels; classes from the target CAM: [0, 0, 1]
    target = torch.tensor([[0.9, 0.8, 0.1], [0.1, 0.2, 0.7]]).view(1, 2, 1, 3)
    affinity = torch.tensor([[0.5, 0.0, 0.2],
                             [0.5, 0.6, 0.0],
                             [0.0, 0.4, 0.8]]).unsqueeze(0)  # columns are a_j
    s = [np.array([1, 1, 0]), np.array([1, 1, 0]), np.array([0, 0, 1])]
    a = affinity[0].numpy()
    cosines = [a[:, j] @ s[j] / (np.linalg.norm(a[:, j]) * np.linalg.norm(s[j]) + 1e-5)
               for j in range(3)]
    expected = float(np.mean([1 - c for c in cosines]))
    assert affinity_semantic_loss(affinity, target).item() == pytest.approx(expected, rel=1e-6)
    perfect = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]).unsqueeze(0)
    assert affinity_semantic_loss(perfect, target).item() == pytest.approx(0, abs=1e-4)


# ------------------------------------------------------------------ combined losses
def seam_total_as_in_train_seam(model: nn.Module, img1: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """train_SEAM.py's loss arithmetic, transcribed op by op (in-place writes included)."""
    def up(t, size):
        return F.interpolate(t, size, mode="bilinear", align_corners=True)

    img2 = F.interpolate(img1, scale_factor=0.3, mode="bilinear", align_corners=True)
    out1, out2 = model(img1), model(img2)
    cam1, cam_rv1 = up(out1["cam"], img1.shape[-2:]), up(out1["cam_rv"], img1.shape[-2:])
    cam2, cam_rv2 = up(out2["cam"], img2.shape[-2:]), up(out2["cam_rv"], img2.shape[-2:])
    label = torch.cat((torch.ones(label.shape[0], 1), label), dim=1).unsqueeze(2).unsqueeze(3)
    label1 = F.adaptive_avg_pool2d(cam1, (1, 1))
    loss_rvmin1 = adaptive_min_pooling_loss((cam_rv1 * label)[:, 1:, :, :])
    cam1 = F.interpolate(max_norm(cam1), scale_factor=0.3, mode="bilinear", align_corners=True) * label
    cam_rv1 = F.interpolate(max_norm(cam_rv1), scale_factor=0.3, mode="bilinear", align_corners=True) * label
    label2 = F.adaptive_avg_pool2d(cam2, (1, 1))
    loss_rvmin2 = adaptive_min_pooling_loss((cam_rv2 * label)[:, 1:, :, :])
    cam2 = max_norm(cam2) * label
    cam_rv2 = max_norm(cam_rv2) * label
    loss_cls1 = F.multilabel_soft_margin_loss(label1[:, 1:, :, :], label[:, 1:, :, :])
    loss_cls2 = F.multilabel_soft_margin_loss(label2[:, 1:, :, :], label[:, 1:, :, :])
    ns, cs, hs, ws = cam2.size()
    loss_er = torch.mean(torch.abs(cam1[:, 1:, :, :] - cam2[:, 1:, :, :]))
    cam1[:, 0, :, :] = 1 - torch.max(cam1[:, 1:, :, :], dim=1)[0]
    cam2[:, 0, :, :] = 1 - torch.max(cam2[:, 1:, :, :], dim=1)[0]

    def inplace_max_onehot(x):
        x_max = torch.max(x[:, 1:, :, :], dim=1, keepdim=True)[0]
        x[:, 1:, :, :][x[:, 1:, :, :] != x_max] = 0
        return x

    tensor_ecr1 = torch.abs(inplace_max_onehot(cam2.detach()) - cam_rv1)
    tensor_ecr2 = torch.abs(inplace_max_onehot(cam1.detach()) - cam_rv2)
    loss_ecr1 = torch.mean(torch.topk(tensor_ecr1.view(ns, -1), k=int(cs * hs * ws * 0.2), dim=-1)[0])
    loss_ecr2 = torch.mean(torch.topk(tensor_ecr2.view(ns, -1), k=int(cs * hs * ws * 0.2), dim=-1)[0])
    loss_ecr = loss_ecr1 + loss_ecr2
    loss_cls = (loss_cls1 + loss_cls2) / 2 + (loss_rvmin1 + loss_rvmin2) / 2
    return loss_cls + loss_er + loss_ecr


@pytest.fixture(scope="module")
def small_batch():
    torch.manual_seed(0)
    model = AVCNet(num_classes=4, width_mult=0.125).eval()  # eval: no dropout, deterministic
    images = torch.randn(2, 3, 56, 56)  # view 2: 16x16 image, 2x2 feature grid
    labels = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    return model, images, labels


def test_avc_weight_zero_is_exactly_seam(small_batch) -> None:
    model, images, labels = small_batch
    with torch.no_grad():
        losses = avc_training_losses(model, images, labels, weights={"avc": 0.0})
        reference = seam_total_as_in_train_seam(model, images, labels)
    assert torch.equal(losses["total"], reference)
    expected_total = losses["cls"] + losses["min_pool"] + losses["er"] + losses["ecr"]
    assert torch.equal(losses["total"], expected_total)
    assert losses["avc_cross"].item() > 0 and 0 < losses["avc_sem"].item() < 1
    with torch.no_grad():
        with_avc = avc_training_losses(model, images, labels,
                                       weights={"avc": 0.5, "avc_cross": 2.0, "avc_sem": 3.0})
    extra = 0.5 * (2.0 * with_avc["avc_cross"] + 3.0 * with_avc["avc_sem"])
    torch.testing.assert_close(with_avc["total"], reference + extra)
    with pytest.raises(ValueError, match="unknown loss weights"):
        avc_training_losses(model, images, labels, weights={"avc_weight": 1.0})


def test_gradients_flow(small_batch) -> None:
    model, images, labels = small_batch
    losses = avc_training_losses(model, images, labels)
    names = ("fc8", "f8_3", "f8_4", "f9", "b3.conv_branch2a", "conv1a")
    weights = [model.get_submodule(name).weight for name in names]
    grads = torch.autograd.grad(losses["total"], weights, retain_graph=True)
    for name, grad in zip(names, grads):
        assert grad.abs().sum() > 0, name
    # The AVC terms train the PCM heads only (backbone features enter the PCM detached).
    for term in ("avc_cross", "avc_sem"):
        grads = torch.autograd.grad(losses[term], weights, retain_graph=True, allow_unused=True)
        assert grads[3].abs().sum() > 0 and grads[2].abs().sum() > 0, term
        assert grads[0] is None and grads[4] is None, term
    seam_only = avc_training_losses(model, images, labels, weights={"avc": 0.0})
    assert not seam_only["avc_cross"].requires_grad and seam_only["total"].requires_grad
