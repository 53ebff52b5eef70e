"""Every entry of the seed-method table (network/methods.py), as timm tests every registered model:
shapes, new layers that match parameters, a strict save/load round trip, one finite training step,
and inference through the entry's fusion. Tiny widths and images."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from network.methods import METHODS, MSA_METHODS, SEED_METHOD_NAMES, build_network, build_optimizer, get_seed_method, image_cams
from network.msa import MSANet, msa_cam_dict, msa_losses, msa_optimizer
from network.spixel import SpixelNet
from network.weights import load_trained
from tool.optim import parameter_groups

NUM_CLASSES = 3
SIZE = 32


def _args(method) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    method.add_flags(parser)
    parser.set_defaults(**method.defaults)
    return parser.parse_args([])


def _batch(method) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    batch = {"images": torch.randn(2, 3, SIZE, SIZE, generator=generator),
             "labels": torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])}
    if method.valid_mask:
        valid = torch.ones(2, SIZE, SIZE)
        valid[1, :, 24:] = 0  # a padded strip
        batch["valid"] = valid
    return batch


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_builds_trains_saves_and_infers(name, tmp_path):
    torch.manual_seed(0)
    method = METHODS[name]
    args = _args(method)
    model = build_network(method, NUM_CLASSES, None, 0.0625, args)

    # New layers: every declared prefix names parameters, and the 10x groups hold exactly those.
    groups = parameter_groups(model, 0.1, 1e-4, method.group_specs)
    new = {id(p) for g in groups if g["name"].startswith("new") for p in g["params"]}
    declared = {id(p) for n, p in model.named_parameters()
                if p.requires_grad and any(n == k or n.startswith(k + ".") for k in type(model).new_layers)}
    assert new == declared and new

    # One training step: the declared terms, finite, and the new layers move.
    model.train()
    terms = method.losses(model, _batch(method), args)
    assert set(terms) == set(method.loss_terms) | {"total"}
    assert all(torch.isfinite(v).all() for v in terms.values())
    optimizer = build_optimizer(method, model, 0.1, 1e-4, method.momentum)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.zero_grad()
    terms["total"].backward()
    if method.clip_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), method.clip_grad_norm)
    optimizer.step()
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith(type(model).new_layers) for n in moved)
    assert all(torch.isfinite(p).all() for p in model.parameters())

    # Strict round trip through our checkpoint layout.
    path = tmp_path / "model.pth"
    torch.save({"model": model.state_dict(), "args": {"method": name, "width_mult": 0.0625}}, path)
    fresh = build_network(method, NUM_CLASSES, None, 0.0625, args)
    load_trained(fresh, str(path))
    loaded = fresh.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded[key]), key

    # Inference through the entry's fusion: a CAM dict of the label's classes at image size in [0, 1].
    fresh.eval()
    image = torch.randn(3, 40, 36)
    views = [torch.stack([image, image.flip(-1)]),
             torch.nn.functional.interpolate(torch.stack([image, image.flip(-1)]), scale_factor=0.5)]
    label = np.array([1.0, 0.0, 1.0], dtype=np.float32)
    cams = image_cams(method, fresh, views, label, (40, 36), torch.device("cpu"))
    assert sorted(cams.cam_dict) == [0, 2]
    for cam in cams.cam_dict.values():
        assert cam.shape == (40, 36) and cam.dtype == np.float32 and cam.min() >= 0 and cam.max() <= 1
    if method.fusion == "sipe":
        assert cams.keys.tolist() == [0, 1, 3] and cams.is_cam.shape == (3, 40, 36)


# MSA's entries (network/methods.py MSA_METHODS): the same checks, through the frozen superpixel FCN
# their classifier reads (and, for msa_sal, a saliency map), with MSA's own optimiser and evaluator.
@pytest.mark.parametrize("name", sorted(MSA_METHODS))
def test_every_msa_entry_builds_trains_saves_and_infers(name, tmp_path):
    torch.manual_seed(0)
    method = MSA_METHODS[name]
    assert get_seed_method(name) is method and name in SEED_METHOD_NAMES
    model = MSANet(NUM_CLASSES, width_mult=0.0625, fixed_bn=False)
    spixel = SpixelNet(width_mult=0.125).eval()

    groups = msa_optimizer(model, 0.1).param_groups
    new = {id(p) for g in groups if g["name"].startswith("new") for p in g["params"]}
    declared = {id(p) for n, p in model.named_parameters()
                if p.requires_grad and any(n == k or n.startswith(k + ".") for k in MSANet.new_layers)}
    assert new == declared and new

    model.train()
    # 48 pixels: a 3 x 3 cell grid, one cell per patch of the image variant's 9.
    images = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    with torch.no_grad():
        association = spixel(images)
    saliency = torch.rand(2, 1, 48, 48, generator=torch.Generator().manual_seed(1))
    terms = msa_losses(model, images, labels, association, method.variant,
                       saliency=saliency if method.pixel_supervised else None)
    assert set(terms) == set(method.loss_terms) | {"total"}
    assert all(torch.isfinite(v).all() for v in terms.values())
    optimizer = msa_optimizer(model, 0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.zero_grad()
    terms["total"].backward()
    optimizer.step()
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith(MSANet.new_layers) for n in moved)

    path = tmp_path / "model.pth"
    torch.save({"model": model.state_dict(), "args": {"method": name, "width_mult": 0.0625}}, path)
    fresh = MSANet(NUM_CLASSES, width_mult=0.0625, fixed_bn=False)
    load_trained(fresh, str(path))
    for key, value in model.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key

    fresh.eval()
    image = np.random.default_rng(0).integers(0, 256, (40, 36, 3), dtype=np.uint8)
    label = np.array([1.0, 0.0, 1.0], dtype=np.float32)
    cams = msa_cam_dict(fresh, spixel, image, label, method.scales[:2], "cpu", sum_at=method.sum_at)
    assert sorted(cams) == [0, 2]
    for cam in cams.values():
        assert cam.shape == (40, 36) and cam.dtype == np.float32 and cam.min() >= 0 and cam.max() <= 1
