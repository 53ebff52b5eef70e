"""SIPE / AE-SIPE against the reference vectors (tests/reference/sipe, README section 4).

``real_``: ResNet-50 with the portable weights, loaded as a reference ``{'net': ...}`` file.
``inj_``: the head on injected side/CAM tensors. ``fn_``: one head function on stored inputs.
Tolerances are the README's (section 5).
"""
from __future__ import annotations

import copy
import hashlib
import json

import numpy as np
import pytest
import torch

from network.sipe import (PAMR, SIPENet, denormalise, fuse_is_cams, prototypes, reactivate, sipe_losses,
                          structure_seeds)
from network.weights import load_trained
from tests.reference_data import load_reference, portable_value, reference_path
from tool.fileio import DataError


def t(array) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array))


def close(actual: torch.Tensor, expected, atol: float, rtol: float = 0.0) -> None:
    expected = np.asarray(expected)
    actual = actual.detach().float().numpy()
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol)


def reference_normalise(image_u8) -> np.ndarray:
    """The reference's normalisation: float64 (u8 / 255 - mean) / std, cast to float32, CHW."""
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    return np.ascontiguousarray(((np.asarray(image_u8) / 255.0 - mean) / std).astype(np.float32).transpose(2, 0, 1))


def portable_reference_state(model: SIPENet) -> dict[str, torch.Tensor]:
    """Every state-dict key (aliases included) with the portable value of its tensor's first name."""
    state, first_value = {}, {}
    for key, value in model.state_dict(keep_vars=True).items():
        if id(value) not in first_value:
            first_value[id(value)] = (torch.from_numpy(portable_value(key, tuple(value.shape)))
                                      if "_aff." not in key else value.detach().clone())
        state[key] = first_value[id(value)]
    return state


@pytest.fixture(scope="module", params=[False, True], ids=["sipe", "ae_sipe"])
def portable_net(request, tmp_path_factory):
    """A reference-format checkpoint with the portable weights, loaded strictly into our network."""
    torch.manual_seed(0)
    model = SIPENet(num_classes=20, affinity_enhanced=request.param)
    path = tmp_path_factory.mktemp("ckpt") / "final.pth"
    torch.save({"net": portable_reference_state(model)}, path)
    fresh = SIPENet(num_classes=20, affinity_enhanced=request.param)
    load_trained(fresh, str(path))
    fresh.freeze_pretrained()
    return fresh.eval()


@pytest.mark.parametrize("section,ae", [("SIPE", False), ("AE_SIPE", True)])
def test_state_dict_keys_and_aliases_equal_the_reference(section, ae):
    with open(reference_path("sipe/resnet50_keys.json"), encoding="utf-8") as handle:
        keys = json.load(handle)[section]
    model = SIPENet(num_classes=20, affinity_enhanced=ae)
    state = model.state_dict(keep_vars=True)
    assert len(state) == keys["state_dict_entries_with_aliases"]
    first_names: dict[int, str] = {}
    for key, value in state.items():
        first_names.setdefault(id(value), key)
    unique = list(first_names.values())
    assert unique == [entry["name"] for entry in keys["entries"]]
    for entry in keys["entries"]:
        assert list(state[entry["name"]].shape) == entry["shape"], entry["name"]
        for alias in entry["aliases_in_state_dict"]:
            assert state[alias] is state[entry["name"]], alias
    groups = [sum(1 for p in model.backbone.parameters()), sum(1 for p in model.newly_added.parameters())]
    assert groups == keys["param_group_sizes"]
    # The portable rule reproduces the reference's weights exactly (digest of README section 2).
    digest = hashlib.sha256()
    for name, value in portable_reference_state(model).items():
        if name in unique:
            digest.update(name.encode("utf-8"))
            digest.update(value.numpy().astype(value.numpy().dtype.newbyteorder("<")).tobytes())
    assert digest.hexdigest() == keys["portable_sha256"]


def test_disagreeing_aliases_are_refused(tmp_path):
    model = SIPENet(num_classes=20, width_mult=0.0625)
    state = model.state_dict()
    state["stage1.0.0.conv1.weight"] = state["resnet50.layer1.0.conv1.weight"] + 1
    path = tmp_path / "bad.pth"
    torch.save({"net": state}, path)
    with pytest.raises(DataError, match="aliases"):
        load_trained(SIPENet(num_classes=20, width_mult=0.0625), str(path))


def test_real_forward(portable_net):
    ref = load_reference("sipe/aesipe_forward.npz" if portable_net.affinity_enhanced else "sipe/sipe_forward.npz")
    with torch.no_grad():
        features = portable_net.features(t(ref["real_img"]))
        out = portable_net.head(features["cam_raw"], features["x4"], features["sides"],
                                t(ref["real_valid_mask_lowres"]).float(),
                                t(ref["real_x_raw"]) if portable_net.affinity_enhanced else None)
    close(features["cam_raw"], ref["real_cam_raw"], 1e-4, 1e-4)
    close(out["score"], ref["real_out_score"], 1e-4, 1e-4)
    close(out["cam"], ref["real_out_cam"], 1e-4)
    assert torch.equal(out["seeds"], t(ref["real_out_seeds"]))
    close(out["prototypes"], ref["real_out_prototypes"], 1e-5)
    close(out["IS_cam"], ref["real_out_IS_cam"], 1e-5)
    close(out["probs"], ref["real_out_probs"], 1e-5)
    if portable_net.affinity_enhanced:
        close(out["pamr"], ref["real_out_pamr"], 1e-5)
        close(out["pamr_quarter"], ref["real_pamr_out"], 1e-5)
        assert torch.equal(out["dec_bin_mask"], t(ref["real_dec_bin_mask"]))
    else:
        close(features["x4"], ref["real_x4_stage4"], 1e-4, 1e-4)
        for k in range(4):
            close(features["sides"][k], ref[f"real_side{k + 1}"], 1e-4, 1e-4)
    # The normalised image gives the same result through forward (AE-SIPE de-normalises it itself).
    with torch.no_grad():
        direct = portable_net(t(ref["real_img"]), t(ref["real_valid_mask_lowres"]).float())
    close(direct["IS_cam"], ref["real_out_IS_cam"], 1e-5)


@pytest.mark.parametrize("ae", [False, True], ids=["sipe", "ae_sipe"])
def test_injected_head_and_losses(ae):
    ref = load_reference("sipe/aesipe_forward.npz" if ae else "sipe/sipe_forward.npz")
    losses = load_reference("sipe/aesipe_losses.npz" if ae else "sipe/sipe_losses.npz")
    model = SIPENet(num_classes=20, width_mult=0.0625, affinity_enhanced=ae)
    sides = [t(ref[f"inj_in_side{k}"]) for k in range(1, 5)]
    out = model.head(t(ref["inj_in_cam_raw"]), t(ref["inj_in_x4"]), sides,
                     t(ref["inj_in_valid_mask_lowres"]).float(), t(ref["inj_in_x_raw"]) if ae else None)
    close(out["score"], ref["inj_out_score"], 1e-6)
    close(out["cam"], ref["inj_out_cam"], 1e-6)
    assert torch.equal(out["seeds"], t(ref["inj_out_seeds"]))
    close(out["prototypes"], ref["inj_out_prototypes"], 1e-6)
    close(out["IS_cam"], ref["inj_out_IS_cam"], 1e-6)
    close(out["probs"], ref["inj_out_probs"], 1e-6)
    if ae:
        close(out["pamr"], ref["inj_out_pamr"], 1e-6)
        close(out["pamr_quarter"], ref["inj_pamr_out"], 1e-6)
        assert torch.equal(out["dec_bin_mask"], t(ref["inj_dec_bin_mask"]))
    terms = sipe_losses(out, t(ref["inj_in_label"]).reshape(2, 20))
    close(terms["cls"], losses["inj_lossCLS"], 1e-6)
    close(terms["gsc"], losses["inj_lossGSC"], 1e-6)
    close(terms["total"], losses["inj_loss_total"], 1e-6)


def test_head_functions():
    ref = load_reference("sipe/sipe_forward.npz")
    for case in ("seedA", "seedB"):
        seeds, probs = structure_seeds(t(ref[f"fn_{case}_in_norm_cam"]), t(ref[f"fn_{case}_in_label"]),
                                       t(ref[f"fn_{case}_in_feature"]))
        assert torch.equal(seeds, t(ref[f"fn_{case}_out_seeds"]))
        close(probs, ref[f"fn_{case}_out_probs"], 1e-6)
    for case in ("protoA", "protoB"):
        close(prototypes(t(ref[f"fn_{case}_in_seeds"]), t(ref[f"fn_{case}_in_feature"])),
              ref[f"fn_{case}_out"], 1e-6)
    close(reactivate(t(ref["fn_react_in_prototype"]), t(ref["fn_react_in_feature"])), ref["fn_react_out"], 1e-6)
    seeds, _ = structure_seeds(t(ref["fn_seedA_in_norm_cam"]), t(ref["fn_seedA_in_label"]),
                               t(ref["fn_seedA_in_feature"]))
    feature = t(ref["fn_seedA_in_feature"])
    chain = reactivate(prototypes(seeds, feature), feature)
    close(chain, ref["fn_chain_out"], 1e-6)


def test_pamr():
    ref = load_reference("sipe/aesipe_pamr.npz")
    pamr = PAMR()
    for name in ("aff_x", "aff_m", "aff_std"):
        assert torch.equal(getattr(pamr, name).kernel, t(ref[f"kernel_{name}"]))
    image, mask = t(ref["img"]), t(ref["mask"])
    close(pamr.aff_std(image).std(2, keepdim=True), ref["x_std"], 1e-6)
    close(pamr.affinity(image), ref["aff"], 1e-6)
    close(pamr(image, mask), ref["out_iter10"], 1e-6)
    close(PAMR(num_iter=1)(image, mask), ref["out_iter1"], 1e-6)


def test_real_losses_and_first_optimiser_step(portable_net):
    """lossCLS + lossGSC of the real batch; the effective optimiser's first step on it."""
    from network.methods import METHODS, build_optimizer  # the method table owns the optimiser
    ae = portable_net.affinity_enhanced
    ref = load_reference("sipe/aesipe_forward.npz" if ae else "sipe/sipe_forward.npz")
    losses = load_reference("sipe/aesipe_losses.npz" if ae else "sipe/sipe_losses.npz")
    model = copy.deepcopy(portable_net)  # the step changes the weights; the fixture stays the reference's
    out = model(t(ref["real_img"]), t(ref["real_valid_mask_lowres"]).float())
    terms = sipe_losses(out, t(ref["real_label"]).reshape(2, 20))
    close(terms["cls"], losses["real_lossCLS"], 1e-5)
    close(terms["gsc"], losses["real_lossGSC"], 1e-5)
    close(terms["total"], losses["real_total"], 1e-5)

    method = METHODS["ae_sipe" if ae else "sipe"]
    optimizer = build_optimizer(method, model, lr=0.1, weight_decay=1e-4, momentum=method.momentum)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer.zero_grad(set_to_none=True)
    terms["total"].backward()
    with_grad = sorted(name for name, p in model.named_parameters() if p.grad is not None)
    assert with_grad == sorted(str(n) for n in losses["real_params_with_grad"])
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), method.clip_grad_norm)
    close(norm, losses["real_grad_total_norm_before_clip"], 1e-4, 1e-4)
    optimizer.step()
    slices = {"classifier_weight": "classifier.weight", "side1_weight": "side1.weight",
              "side3_weight": "side3.weight", "r50_layer4_2_conv3_weight": "resnet50.layer4.2.conv3.weight",
              "r50_layer4_2_bn3_weight": "resnet50.layer4.2.bn3.weight",
              "r50_layer3_0_conv1_weight": "resnet50.layer3.0.conv1.weight"}
    params = dict(model.named_parameters())
    for short, name in slices.items():
        index = (slice(0, 32),) if params[name].ndim == 1 else (slice(0, 8), slice(0, 32))
        prefix = f"real_step0_{short}"
        close(before[name][index], losses[f"{prefix}_param_before"], 1e-7)
        close(params[name].grad[index], losses[f"{prefix}_grad_clipped"], 1e-5, 1e-3)
        close(params[name][index], losses[f"{prefix}_param_after"], 1e-5, 1e-4)
    for name in ("resnet50.conv1.weight", "resnet50.layer1.0.conv1.weight", "resnet50.layer2.3.conv3.weight"):
        assert torch.equal(params[name], before[name])
    # The reference's group 0 (backbone) and 1 (new layers): lr, momentum (1e-4: the quirk), decay.
    for group in optimizer.param_groups:
        index = int(group["name"].startswith("new"))
        for key in ("lr", "momentum", "weight_decay"):
            assert group[key] == pytest.approx(float(losses[f"real_step0_group_{key}"][index])), (group["name"], key)


@pytest.mark.parametrize("ae", [False, True], ids=["sipe", "ae_sipe"])
def test_injected_inference_and_fusion(ae):
    ref = load_reference("sipe/aesipe_cam_infer.npz" if ae else "sipe/sipe_cam_infer.npz")
    model = SIPENet(num_classes=20, width_mult=0.0625, affinity_enhanced=ae)
    label = t(ref["inj_label_padded"]).float()
    is_cams = []
    for i in range(4):
        sides = [t(ref[f"inj_scale{i}_in_side{k}"]) for k in range(1, 5)]
        raw = None
        if ae:  # README 4.9: scale0_x_raw is stored, the others are derived the same way
            raw = t(ref["inj_scale0_x_raw"])[None] if i == 0 else denormalise(
                t(reference_normalise(ref[f"inj_scale{i}_u8"]))[None])
        out = model.infer_head(t(ref[f"inj_scale{i}_in_cam_raw"]), sides, label, raw)
        close(out["norm_cam"], ref[f"inj_scale{i}_norm_cam"], 1e-6)
        assert torch.equal(out["seeds"], t(ref[f"inj_scale{i}_seeds"])[0])
        close(out["IS_cam"], ref[f"inj_scale{i}_IS_cam"], 1e-6)
        if ae:
            close(out["pamr_quarter"], ref[f"inj_scale{i}_pamr_out"][0], 1e-6)
            assert torch.equal(out["dec_bin_mask"], t(ref[f"inj_scale{i}_dec_bin_mask"])[0])
        is_cams.append(out["IS_cam"])
    keys, fused = fuse_is_cams(is_cams, ref["inj_raw_u8"].shape[:2], label)
    assert keys.tolist() == ref["inj_saved_keys"].tolist()
    close(fused, ref["inj_saved_IS_CAM"], 1e-6)


def test_real_inference(portable_net):
    ae = portable_net.affinity_enhanced
    ref = load_reference("sipe/aesipe_cam_infer.npz" if ae else "sipe/sipe_cam_infer.npz")
    label = t(ref["real_label_padded"]).float()
    is_cams = []
    with torch.no_grad():
        for i in range(4):
            image = reference_normalise(ref[f"real_scale{i}_u8"])
            pair = torch.from_numpy(np.stack([image, image[:, :, ::-1]]).copy())
            out = portable_net.infer_scale(pair, label)
            close(out["norm_cam"], ref[f"real_scale{i}_norm_cam"], 1e-4)
            close(out["IS_cam"], ref[f"real_scale{i}_IS_cam"], 1e-5)
            is_cams.append(out["IS_cam"])
    keys, fused = fuse_is_cams(is_cams, ref["real_raw_u8"].shape[:2], label)
    assert keys.tolist() == ref["real_saved_keys"].tolist()
    close(fused, ref["real_saved_IS_CAM"], 1e-5)
