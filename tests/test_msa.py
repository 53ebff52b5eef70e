"""The MSA classifier, its IPC loss, optimiser and evaluator CAMs against the reference vectors
(tests/reference/msa/: msa_forward, msa_losses, msa_cam_infer, msa_keys).

Variant A (default) is the shipped bytecode forward, variant B (``widened=True``) the committed
design with 256-channel kernel heads. Tolerance of the reference README: |a - b| <= 1e-4 +
1e-3 |b| (prototypes 1e-3 absolute); integer predictions where the top-2 margin exceeds 1e-4.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from network.msa import (IPC_VARIANTS, MSANet, affinity_propagation, affinity_statistics, cosine_affinity, ipc_loss,
                         ipc_target, make_cam, merge_features, msa_cams, msa_losses, msa_optimizer, padding_mask,
                         propagation_matrix, prototypes, reconstruct, tile_features)
from network.spixel import SpixelNet
from tests.reference_data import load_reference, portable_state_dict, portable_value, reference_msa_keys
from tool.optim import PolyLR


def close(actual, expected: np.ndarray, atol: float = 1e-4, rtol: float = 1e-3) -> None:
    actual = actual.detach().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual.astype(np.float64), expected.astype(np.float64), atol=atol, rtol=rtol)


def portable_msa_state(model: MSANet) -> dict[str, torch.Tensor]:
    """The README's portable fill on the canonical keys; every alias gets its canonical tensor."""
    aliases = model.alias_map()
    state = {k: torch.from_numpy(portable_value(k, tuple(v.shape)))
             for k, v in model.state_dict().items() if k not in aliases}
    state.update({alias: state[canonical] for alias, canonical in aliases.items()})
    return {k: state[k] for k in model.state_dict()}


@pytest.fixture(scope="module")
def fwd():
    return load_reference("msa/msa_forward.npz")


@pytest.fixture(scope="module")
def losses_ref():
    return load_reference("msa/msa_losses.npz")


@pytest.fixture(scope="module")
def cam_ref():
    return load_reference("msa/msa_cam_infer.npz")


def _portable_model(widened: bool) -> tuple[MSANet, dict]:
    model = MSANet(20, widened=widened)
    state = portable_msa_state(model)
    model.load_state_dict(state)
    return model.eval(), state


@pytest.fixture(scope="module")
def model_a():
    return _portable_model(False)


@pytest.fixture(scope="module")
def model_b():
    return _portable_model(True)


def t(ref, key: str) -> torch.Tensor:
    return torch.from_numpy(ref[key])


# --------------------------------------------------------------------------- keys and groups
def test_keys_aliases_and_parameter_groups(model_a, model_b):
    keys = reference_msa_keys()["classifier"]
    model = model_a[0]
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == \
        [(k, list(s)) for k, s in keys["state_dict_full_order"]]
    assert model.alias_map() == keys["aliases"]
    optimizer = msa_optimizer(model, lr=0.1, weight_decay=4e-5)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {names[id(p)]: index for index, group in enumerate(optimizer.param_groups) for p in group["params"]}
    assert groups == {k: v for k, v in keys["canonical_param_groups"].items() if v is not None}
    assert [len(g["params"]) for g in optimizer.param_groups] == keys["param_group_sizes"]
    assert [sum(p.numel() for p in g["params"]) for g in optimizer.param_groups] == keys["param_group_numel"]
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.1, 0.2, 1.0, 2.0])
    assert [g["weight_decay"] for g in optimizer.param_groups] == [4e-5, 0.0, 4e-5, 0.0]
    assert optimizer.defaults["nesterov"] and optimizer.defaults["momentum"] == 4e-5
    widened = model_b[0].state_dict()
    for name, shape in keys["variant_B_only_differences"]:
        assert list(widened[name].shape) == shape


def test_released_layout_loads_strictly_and_aliases_must_agree(model_a):
    model, state = model_a
    fresh = MSANet(20)
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(fresh.stage4[0][0].conv1.weight, state["model.layer3.0.conv1.weight"])
    bad = dict(state)
    bad["stage2.0.0.conv1.weight"] = state["model.layer1.0.conv1.weight"] + 1
    with pytest.raises(RuntimeError, match="alias"):
        fresh.load_state_dict(bad)
    with pytest.raises(RuntimeError):
        fresh.load_state_dict({k: v for k, v in state.items() if not k.startswith("stage5")})


def test_poly_learning_rates(losses_ref):
    for variant, key in (("image", "poly_lr_image"), ("saliency", "poly_lr_sal")):
        optimizer = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr}
                                     for lr in (0.1, 0.2, 1.0, 2.0)], lr=0.1)
        scheduler = PolyLR(optimizer, int(losses_ref["poly_max_step"]), IPC_VARIANTS[variant].poly_power)
        for step, expected in zip(losses_ref["poly_lr_steps"], losses_ref[key]):
            scheduler.last_epoch = int(step)
            np.testing.assert_allclose(scheduler.get_lr(), expected, rtol=1e-6)


# --------------------------------------------------------------------------- forward
def test_forward_variant_a_train_mode(fwd, model_a):
    model, state = model_a
    images, prob = t(fwd, "images"), t(fwd, "prob")
    try:
        model.train()
        with torch.no_grad():
            out = model.forward_features(images, prob)
            logits = model(images, prob, 8, 0.6)
            x4_feats, x5_feats = model.x4_feats(out["x4"]), model.x5_feats(out["x5"])
    finally:
        model.load_state_dict(state)
        model.eval()
    for mine, ref in (("x4", "x4_stage4"), ("gate4", "ala1_gate"), ("x4_dp", "x4_dp_kernels"),
                      ("x4_recomposed", "x4_recomposed"), ("gate5", "ala2_gate"), ("x5_dp", "x5_dp_kernels"),
                      ("cls_raw", "cls_raw"), ("logits_dcr", "logits_dcr"), ("logits_min", "logits_min"),
                      ("q_feat", "q_feat")):
        close(out[mine], fwd[f"A_train_{ref}"])
    close(out["x5"], fwd["A_train_x5_stage5"], atol=1e-3)
    close(x4_feats, fwd["A_train_x4_feats"])
    close(x5_feats, fwd["A_train_x5_feats"])
    close(logits.logits, fwd["A_train_logits"])
    raw = cosine_affinity(out["x4_recomposed"])
    close(raw, fwd["A_train_aff_raw"])
    close(raw.clamp(0.01, 0.999), fwd["A_train_aff_clamped"])
    close(propagation_matrix(raw), fwd["A_train_aff_norm"])
    for steps in range(9):
        close(affinity_propagation(out["logits_dcr"], out["x4_recomposed"], steps), fwd["A_train_ap_iters"][steps])


def test_forward_variant_a_eval_and_ap_threshold(fwd, model_a):
    model, _ = model_a
    images, prob = t(fwd, "images"), t(fwd, "prob")
    with torch.no_grad():
        out = model.forward_features(images, prob)
        for steps, threshold, prefix in ((8, 0.6, "A_eval_"), (8, 0.965, "A_eval_th0965_")):
            close(model(images, prob, steps, threshold).logits, fwd[prefix + "logits"])
        sal = model(images, prob)  # the saliency script's call: no AP
    assert out["q_feat"] is None  # the bytecode drops get_qfeats; in eval it is not even computed
    for mine, ref in (("x4_dp", "x4_dp_kernels"), ("x5_dp", "x5_dp_kernels"), ("logits_dcr", "logits_dcr"),
                      ("logits_min", "logits_min")):
        close(out[mine], fwd[f"A_eval_{ref}"])
    close(sal.logits, fwd["A_eval_logits_dcr"])
    raw = t(fwd, "A_eval_aff_raw")
    close(propagation_matrix(raw), fwd["A_eval_aff_norm"])
    thresholded = raw.clamp(0.01, 0.999) * (raw.clamp(0.01, 0.999) >= 0.965)
    far = np.abs(raw.clamp(0.01, 0.999).numpy() - 0.965) > 1e-5
    assert np.array_equal((thresholded.numpy() == 0)[far], (fwd["A_eval_th0965_aff_thresholded"] == 0)[far])
    close(propagation_matrix(raw, 0.965), fwd["A_eval_th0965_aff_norm"])
    # AP steps on the stored eval affinity (k = 8: training-time evaluator, 10: evaluator default)
    matrix = propagation_matrix(raw)
    flat = t(fwd, "A_eval_logits_dcr").flatten(2)
    for steps in range(13):
        close(flat.reshape(2, 21, 6, 6), fwd["A_eval_ap_iters"][steps])
        flat = torch.bmm(flat, matrix)


def test_forward_variant_b(fwd, model_b):
    model, _ = model_b
    images, prob = t(fwd, "images"), t(fwd, "prob")
    with torch.no_grad():
        out = model.forward_features(images, prob)
        logits = model(images, prob, 8, 0.6)
    close(logits.logits, fwd["B_eval_logits"])
    close(logits.logits_min, fwd["B_eval_logits_min"])
    close(out["x4_dp"], fwd["B_eval_x4_dp_kernels"])
    close(out["x5_dp"], fwd["B_eval_x5_dp_kernels"])


# --------------------------------------------------------------------------- losses
IPC_FIELDS = (("valid_before_fallback", "tile_valid_before_fallback"), ("valid", "tile_valid_nnn"),
              ("fallback", "fallback_all_invalid"), ("mask", "final_mask"), ("probs", "probs"),
              ("origin", "origin_f"), ("reconstruction", "reconstruction"), ("mse", "masked_mse_map"),
              ("ipc", "ipc_raw"))


def check_ipc(result: dict, ref, prefix: str) -> None:
    for mine, key in IPC_FIELDS:
        close(result[mine].float(), ref[prefix + key].astype(np.float32))
    close(result["prototypes"], ref[prefix + "prototypes"], atol=1e-3)


def test_tiles_prototypes_and_padding_mask(losses_ref, fwd):
    spixel_ref = load_reference("msa/spixel.npz")
    tiles = tile_features(t(spixel_ref, "tile_in"), 9)
    close(tiles, spixel_ref["tile_out_P9"])
    close(merge_features(tiles, 9, 2), spixel_ref["merge_out_P9"])
    probs, feats = t(spixel_ref, "pool_feat_2_probs"), t(spixel_ref, "pool_feat_2_feats")
    close(prototypes(probs, feats), spixel_ref["pool_feat_2_out"])
    close(reconstruct(t(spixel_ref, "pool_feat_2_out"), probs), spixel_ref["up_feat_2_out"])
    assert np.array_equal(padding_mask(t(fwd, "images"), (6, 6)).numpy(), losses_ref["img_imgmin_mask"])


@pytest.mark.parametrize("variant,prefix,logits_key", [("image", "img_", "A_train_logits"),
                                                       ("image", "img_pcm0_", "A_trainsal_logits"),
                                                       ("saliency", "sal_", "A_trainsal_logits")])
def test_ipc_loss(losses_ref, fwd, variant, prefix, logits_key):
    labels = t(fwd, "labels")[:, 1:]
    fg_cam = make_cam(t(fwd, logits_key)[:, 1:]) * labels[:, :, None, None]
    if prefix + "fg_cam" in losses_ref.files:
        close(fg_cam, losses_ref[prefix + "fg_cam"])
    target = ipc_target(variant, t(fwd, "images"), t(fwd, "prob"), t(losses_ref, "sal_input"))
    if prefix + "target_feat" in losses_ref.files:
        close(target, losses_ref[prefix + "target_feat"])
    settings = IPC_VARIANTS[variant]
    check_ipc(ipc_loss(fg_cam, target, settings.patches, settings.ignore_threshold), losses_ref, prefix + "ipc_")


def test_ipc_fallback_edge_case(losses_ref):
    result = ipc_loss(t(losses_ref, "edge_fg_cam"), t(losses_ref, "edge_target"), 1, 0.1)
    check_ipc(result, losses_ref, "edge_ipc_")
    assert bool(result["fallback"])


@pytest.mark.parametrize("variant,key", [("image", "img_losses_values"), ("saliency", "sal_losses_values"),
                                         ("image", "B_img_losses_values"), ("saliency", "B_sal_losses_values")])
def test_total_losses(losses_ref, fwd, variant, key):
    """msa_losses on a model that returns the stored forward outputs (the forward is tested above)."""
    prefix = "B_" if key.startswith("B_") else "A_"
    stored = {8: (t(fwd, prefix + "train_logits"), t(fwd, prefix + "train_logits_min")),
              0: (t(fwd, prefix + "trainsal_logits"), t(fwd, prefix + "trainsal_logits_min"))}

    def model(images, association, ap_steps, ap_threshold):
        logits, logits_min = stored[ap_steps]
        return type("Out", (), {"logits": logits, "logits_min": logits_min})

    terms = msa_losses(model, t(fwd, "images"), t(fwd, "labels")[:, 1:], t(fwd, "prob"), variant,
                       saliency=t(losses_ref, "sal_input"))
    expected = losses_ref[key]
    np.testing.assert_allclose([terms["cls"].item(), terms["ipc"].item(), terms["total"].item()],
                               expected[[0, 1, 3]], rtol=1e-4)


def test_losses_backpropagate_through_a_small_model():
    torch.manual_seed(0)
    model = MSANet(3, width_mult=0.125).train()
    images = torch.randn(2, 3, 64, 64)
    association = torch.softmax(torch.randn(2, 9, 64, 64), dim=1)
    labels = torch.tensor([[1.0, 0, 0], [0, 1.0, 1.0]])
    for variant in ("image", "saliency"):
        terms = msa_losses(model, images, labels, association, variant, saliency=torch.rand(2, 1, 64, 64))
        model.zero_grad()
        terms["total"].backward()
        assert torch.isfinite(terms["total"])
        assert model.classifier[0].weight.grad.abs().sum() > 0
        assert model.model.conv1.weight.grad is not None  # the reference trains the stem


# --------------------------------------------------------------------------- evaluator CAMs
@pytest.fixture(scope="module")
def spixel():
    net = SpixelNet()
    net.load_state_dict(portable_state_dict(net.state_dict()))
    return net.eval()


def check_cams(cam_ref, model: MSANet, spixel: SpixelNet, prefix: str, tags: str, sum_at: str = "image") -> None:
    beta, threshold = cam_ref[prefix + "beta_th"]
    scales = [float(s) for s in cam_ref[prefix + "scales"]]
    with torch.no_grad():
        result = msa_cams(model, spixel, t(cam_ref, prefix + "images"), scales, int(beta), float(threshold), sum_at)
    for index in range(len(scales)):
        close(result["logits"][index], cam_ref[f"{prefix}logits_scale{index}"])
        if f"{prefix}Q_scale{index}" in cam_ref.files:
            close(result["association"][index], cam_ref[f"{prefix}Q_scale{index}"])
    if prefix + "refine_cam_sum" in cam_ref.files:
        close(result["summed"], cam_ref[prefix + "refine_cam_sum"])
    cams = result["cams"] * t(cam_ref, tags)[None, :, None, None]
    close(cams, cam_ref[prefix + "cams_final"])
    for index, bg in enumerate(cam_ref[prefix + "th_list"]):
        scores = cams[0].clone()
        scores[0] = float(bg)
        top2 = np.sort(scores.numpy(), axis=0)[-2:]
        sure = top2[1] - top2[0] > 1e-4
        assert np.array_equal(scores.argmax(0).numpy()[sure], cam_ref[prefix + "pred_per_th"][index][sure])


@pytest.mark.parametrize("prefix", ["single_", "single_th0965_", "single_noap_"])
def test_evaluator_cams_single_scale(cam_ref, model_a, spixel, prefix):
    check_cams(cam_ref, model_a[0], spixel, prefix, "single_tags")


@pytest.mark.parametrize("prefix,sum_at", [("multi_", "image"), ("salev_multi_", "saliency")])
def test_evaluator_cams_multi_scale(cam_ref, model_a, spixel, prefix, sum_at):
    check_cams(cam_ref, model_a[0], spixel, prefix, "multi_tags", sum_at)


def test_evaluator_cams_variant_b(cam_ref, model_b, spixel):
    check_cams(cam_ref, model_b[0], spixel, "B_single_", "single_tags")


def test_affinity_statistics_count_the_affinities_ap_keeps():
    torch.manual_seed(0)
    model, spixel = MSANet(3, width_mult=0.0625).eval(), SpixelNet(width_mult=0.125).eval()
    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    every = affinity_statistics(model, spixel, image, threshold=0.0)   # AP's clamp floor is 0.01
    none = affinity_statistics(model, spixel, image, threshold=1.0)    # its ceiling is 0.999
    some = affinity_statistics(model, spixel, image, threshold=0.6)
    assert every["above"] == 1.0 and none["above"] == 0.0 and 0.0 <= some["above"] <= 1.0
    assert 0.01 <= some["q50"] <= some["q90"] <= 0.999
    assert (some["above"] >= 0.5) == (some["q50"] >= 0.6)  # the share and the median agree
