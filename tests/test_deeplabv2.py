"""DeepLabV2-ResNet101 + MSC against the vectors of the reference (kazuto1011/deeplab-pytorch):
keys and layout, forward at every scale, label resize and loss, param groups, one accumulated
SGD step, the poly table, the init loaders, the test forward and the CRF (reference/deeplabv2)."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch

import test_deeplab
import train_deeplab
from network.deeplabv2 import CAFFE_MEAN_BGR, DeepLabV2MSC, to_input_convention
from network.segmenters import arch_of, get_segmenter, msc_loss, resize_labels_nearest
from network.weights import (load_deeplabv2_init, load_trained, torchvision_to_deeplabv2_name)
from tests.reference_data import load_reference, portable_state_dict, reference_path
from tool import transforms as T
from tool.crf import DEEPLABV2_TEST_CRF, dense_crf, wrapped_mean_subtracted
from tool.distributed import DistInfo
from tool.fileio import DataError
from tool.optim import PolyLR, make_sgd, parameter_groups
from tool.trainer import build_trainer

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = ("s1", "s050", "s075", "max")
NUM_FG = 20  # the reference's 21 VOC classes


def _keys() -> dict:
    with open(reference_path("deeplabv2/deeplabv2_keys.json"), encoding="utf-8") as handle:
        return json.load(handle)


def _close(actual, expected, rel: float) -> None:
    """|actual - expected| <= rel * max|expected| (the README's per-array tolerance)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= rel * np.abs(expected).max()


@pytest.fixture(scope="module")
def portable() -> dict[str, torch.Tensor]:
    return portable_state_dict(DeepLabV2MSC(NUM_FG).state_dict())


@pytest.fixture(scope="module")
def model(portable) -> DeepLabV2MSC:
    net = DeepLabV2MSC(NUM_FG)
    net.load_state_dict(portable, strict=True)
    return net.eval()


def test_state_dict_is_the_references_and_portable_weights_hash_as_stored(portable):
    keys = _keys()
    assert [[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in portable.items()] == keys["state_dict"]
    digest = hashlib.sha256()
    for name, value in portable.items():
        digest.update(name.encode("utf-8") + value.numpy().astype(np.float32).tobytes())
    assert digest.hexdigest() == keys["portable_sha256"]


def test_msc_forward_matches_reference_at_every_scale(model):
    ref = load_reference("deeplabv2/deeplabv2_forward.npz")
    for tag in ("x65", "x81"):
        x = torch.from_numpy(ref[f"{tag}_input"])
        with torch.no_grad():
            fused = model(x).numpy()
            model.train()
            outputs = [o.numpy() for o in model(x)]
            model.eval()
        _close(fused, ref[f"{tag}_eval_max"], 2e-5)
        np.testing.assert_array_equal(fused.argmax(1), ref[f"{tag}_eval_max"].argmax(1))
        for name, output in zip(NAMES, outputs):
            _close(output, ref[f"{tag}_train_{name}"], 2e-5)
        assert [list(o.shape[-2:]) for o in outputs[:3]] == ref[f"{tag}_sizes_logits"].tolist()
        assert list(model.base.layer1(x).shape[-2:]) == ref[f"{tag}_sizes_layer1"].tolist()  # ceil-mode pool


def test_legacy_resize_reproduces_old_torch_variant(model):
    ref = load_reference("deeplabv2/deeplabv2_forward.npz")
    legacy = copy.copy(model)
    legacy.legacy_resize = True
    for tag in ("x65", "x81"):
        with torch.no_grad():
            _close(legacy(torch.from_numpy(ref[f"{tag}_input"])).numpy(), ref[f"{tag}_variant_oldtorch_max"], 2e-5)


def test_caffe_input_convention_from_dataset_normalisation():
    ref = load_reference("deeplabv2/deeplabv2_forward.npz")
    rgb = np.ascontiguousarray(ref["x65_image_bgr_uint8"][:, :, ::-1])
    ours = to_input_convention(torch.from_numpy(T.hwc_to_chw(T.normalize(rgb)))[None], "caffe_bgr")
    np.testing.assert_allclose(ours.numpy(), ref["x65_input"], atol=1e-3)
    same = torch.ones(1, 3, 2, 2)
    assert to_input_convention(same, "torchvision") is same


def test_label_resize_and_loss_terms_match_reference():
    loss_ref = load_reference("deeplabv2/deeplabv2_loss.npz")
    fwd = load_reference("deeplabv2/deeplabv2_forward.npz")
    for batch in ("b0", "b1"):
        labels = torch.from_numpy(loss_ref[f"{batch}_labels"])
        logits = [torch.from_numpy(loss_ref[f"{batch}_logits_{n}"]) for n in NAMES]
        for name, logit in zip(NAMES, logits):
            np.testing.assert_array_equal(resize_labels_nearest(labels, logit.shape[-2:]).numpy(),
                                          loss_ref[f"{batch}_labels_{name}"])
        terms = msc_loss(logits, labels)
        np.testing.assert_allclose([t.item() for t in terms.values()], loss_ref[f"{batch}_ce_terms"], rtol=1e-5)
    # On the forward file's outputs; x81 (non-square logits) crashes the reference: the fixed variant.
    for tag, key in (("x65", "x65_ce_terms"), ("x81", "x81_variant_fixed_ce_terms")):
        logits = [torch.from_numpy(fwd[f"{tag}_train_{n}"]) for n in NAMES]
        labels = torch.from_numpy(loss_ref[f"{tag}_label"]).long()
        terms = msc_loss(logits, labels)
        np.testing.assert_allclose([t.item() for t in terms.values()], loss_ref[key], rtol=1e-5)
    for name in NAMES:
        logit = fwd[f"x81_train_{name}"]
        resized = resize_labels_nearest(torch.from_numpy(loss_ref["x81_label"]).long(), logit.shape[-2:])
        np.testing.assert_array_equal(resized.numpy(), loss_ref[f"x81_variant_fixed_labels_{name}"])


def test_param_groups_and_poly_every_10_match_reference():
    ref = load_reference("deeplabv2/deeplabv2_loss.npz")
    net = DeepLabV2MSC(NUM_FG, width_mult=0.0625)
    names = {id(p): n for n, p in net.named_parameters()}
    groups = {g["name"]: g for g in parameter_groups(net, 2.5e-4, 5e-4)}
    for index, ours in enumerate(("backbone_weight", "new_weight", "new_bias")):
        assert [names[id(p)] for p in groups[ours]["params"]] == ref[f"group{index}_param_names"].tolist()
        assert groups[ours]["lr"] == pytest.approx(float(ref[f"group{index}_initial_lr"]), rel=1e-12)
        assert groups[ours]["weight_decay"] == float(ref[f"group{index}_weight_decay"])
    assert groups["backbone_bias"]["params"] == []
    frozen = sorted(n for n, p in net.named_parameters() if not p.requires_grad)
    assert frozen == sorted(ref["params_not_in_optimizer"].tolist())

    optimizer = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr}
                                 for lr in (2.5e-4, 2.5e-3, 5e-3)], lr=1.0)
    scheduler = PolyLR(optimizer, 20000, update_every=10)
    for epoch, values in zip(ref["lr_table_epoch"], ref["lr_table_values"]):
        if epoch >= 20000:  # the reference's lr 0 after its last step; training has stopped by then
            continue
        scheduler.last_epoch = int(epoch)
        np.testing.assert_allclose(scheduler.get_lr(), values, rtol=1e-12)


WATCHED = {"aspp_c0_bias": ("base.aspp.c0.bias", 2), "aspp_c3_bias": ("base.aspp.c3.bias", 2),
           "aspp_c0_weight": ("base.aspp.c0.weight", 1),
           "layer1_conv1_conv_weight": ("base.layer1.conv1.conv.weight", 0),
           "layer5_block3_increase_conv_weight": ("base.layer5.block3.increase.conv.weight", 0)}


def test_sgd_step_of_the_groups_matches_reference_iteration_1():
    """Iteration 1 of the real main.train: the stored gradients through our groups and SGD."""
    ref = load_reference("deeplabv2/deeplabv2_loss.npz")
    lrs, decays = (2.5e-4, 2.5e-3, 5e-3), (5e-4, 5e-4, 0.0)
    params = {name: torch.nn.Parameter(torch.from_numpy(ref[f"it1_{name}_before"].copy())) for name in WATCHED}
    groups = [{"params": [params[n] for n, (_, g) in WATCHED.items() if g == index], "lr": lr, "weight_decay": wd}
              for index, (lr, wd) in enumerate(zip(lrs, decays))]
    optimizer = make_sgd(groups, momentum=0.9)
    for name, parameter in params.items():
        parameter.grad = torch.from_numpy(ref[f"it1_{name}_grad"].copy())
    optimizer.step()
    for name, parameter in params.items():
        _close(parameter.detach().numpy(), ref[f"it1_{name}_after"], 2e-4)
    np.testing.assert_allclose(lrs, ref["step_lr"][0], rtol=1e-12)
    # The logged iteration loss: (sum of b0's four terms) / 2 + (sum of b1's) / 2.
    logged = sum(sum(t.item() for t in msc_loss([torch.from_numpy(ref[f"{b}_logits_{n}"]) for n in NAMES],
                                                torch.from_numpy(ref[f"{b}_labels"])).values()) / 2
                 for b in ("b0", "b1"))
    assert logged == pytest.approx(float(ref["iter_loss_logged"][0]), rel=1e-5)


def test_accumulated_step_equals_the_mean_of_its_sub_batch_gradients(tmp_path):
    """train_deeplab's ITER_SIZE loop: one SGD step on the mean gradient; BN and the stem untouched."""
    torch.manual_seed(0)
    net = DeepLabV2MSC(2, width_mult=0.0625)
    net.train()
    reference = copy.deepcopy(net)
    images, labels = torch.randn(4, 3, 33, 41), torch.randint(0, 3, (4, 33, 41))
    labels[0, :5] = 255
    args = argparse.Namespace(lr=0.1, wt_dec=5e-4, momentum=0.9, batch_size=4, seed=0, save_dir=str(tmp_path),
                              session_name="dlv2", save_every=0, amp=False, resume=None, lr_update_every=10)
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)
    segmenter = get_segmenter("deeplabv2")
    trainer, _ = build_trainer(net, 4, args, dist, segmenter.loss_names, max_step=100)
    train_deeplab.accumulate_step(trainer, net, segmenter, images, labels, 2, "torchvision")

    total = sum(sum(msc_loss(reference(images[k:k + 2]), labels[k:k + 2]).values()) / 2 for k in (0, 2))
    total.backward()
    by_name = dict(reference.named_parameters())
    for group in parameter_groups(reference, 0.1, 5e-4):
        for parameter in group["params"]:
            name = next(n for n, p in by_name.items() if p is parameter)
            expected = parameter - group["lr"] * (parameter.grad + group["weight_decay"] * parameter)
            torch.testing.assert_close(dict(net.named_parameters())[name], expected, rtol=1e-4, atol=1e-6)
    assert torch.equal(net.base.layer1.conv1.bn.running_mean, reference.base.layer1.conv1.bn.running_mean)
    with open(trainer.csv_path, encoding="utf-8") as handle:
        header, row = handle.read().splitlines()[:2]
    assert header.split(",")[4:] == list(segmenter.loss_names)
    assert float(row.split(",")[3]) == pytest.approx(total.item(), rel=1e-4)


def test_dense_crf_with_deeplabv2_parameters_matches_reference():
    ref = load_reference("deeplabv2/deeplabv2_crf.npz")
    params = dict(zip(ref["crf_params_keys"].tolist(), ref["crf_params_values"].tolist()))
    assert DEEPLABV2_TEST_CRF == dataclasses.replace(
        DEEPLABV2_TEST_CRF, iterations=int(params["ITER_MAX"]), gauss_compat=params["POS_W"],
        gauss_sxy=params["POS_XY_STD"], bilateral_compat=params["BI_W"], bilateral_sxy=params["BI_XY_STD"],
        bilateral_srgb=params["BI_RGB_STD"])
    image, prob = ref["direct_image_bgr_uint8"], ref["direct_prob"]
    wrapped = wrapped_mean_subtracted(image, CAFFE_MEAN_BGR)
    np.testing.assert_array_equal(wrapped, ref["direct_mainimage_uint8"])
    for crf_image, params_, q_key, label_key in (
            (image, DEEPLABV2_TEST_CRF, "direct_Q", "direct_label"),
            (wrapped, DEEPLABV2_TEST_CRF, "direct_Q_mainimage", "direct_label_mainimage"),
            (image, dataclasses.replace(DEEPLABV2_TEST_CRF, iterations=1), "direct_Q_iter1", None)):
        q = dense_crf(crf_image, prob, params_)
        np.testing.assert_allclose(q, ref[q_key], atol=1e-5)
        if label_key:
            np.testing.assert_array_equal(q.argmax(0), ref[label_key])


def _labels_match_where_confident(q: np.ndarray, labels: np.ndarray, ref_q: np.ndarray) -> None:
    top2 = np.sort(ref_q, axis=0)[-2:]
    confident = (top2[1] - top2[0]) >= 1e-3
    np.testing.assert_array_equal(q.argmax(0)[confident], labels[confident])


def test_test_forward_and_crf_match_main_test_crf_and_demo(model):
    ref = load_reference("deeplabv2/deeplabv2_crf.npz")
    recipe = get_segmenter("deeplabv2_resnet101").test
    for i in (0, 1):
        image_bgr = ref[f"val{i}_image_bgr_uint8"]
        rgb = np.ascontiguousarray(image_bgr[:, :, ::-1])
        views = [torch.from_numpy(ref[f"val{i}_input"])]
        with torch.no_grad():
            _close(model(views[0])[0].numpy(), ref[f"val{i}_test_logit"], 2e-5)
        probs = test_deeplab.predict_probabilities(model, views, rgb.shape[:2], align_corners=recipe.align_corners,
                                                   convention="torchvision")  # input stored pre-converted
        np.testing.assert_allclose(probs, ref[f"val{i}_crfmain_prob"], atol=1e-3)
        _labels_match_where_confident(probs, ref[f"val{i}_test_pred"], ref[f"val{i}_crfmain_prob"])
        np.testing.assert_array_equal(test_deeplab.crf_input_image(rgb, "reference"),
                                      ref[f"val{i}_crfmain_image_uint8"])
        for mode, q_key, label_key in ((recipe.crf_channels, "demo_Q", "demo_label"),
                                       ("reference", "crfmain_Q", "crfmain_label")):
            q = dense_crf(test_deeplab.crf_input_image(rgb, mode), probs, recipe.crf)
            np.testing.assert_allclose(q, ref[f"val{i}_{q_key}"], atol=1e-3)
            _labels_match_where_confident(q, ref[f"val{i}_{label_key}"], ref[f"val{i}_{q_key}"])


# --------------------------------------------------------------------------- weights
def test_coco_init_and_released_checkpoint_load_strictly(tmp_path):
    """The init file's 626 keys (float64 BN statistics, a 91-class fc) at a tiny width: the
    backbone is taken, fc dropped, the ASPP new; a release in the MSC layout loads strictly."""
    keys = _keys()
    width = 0.0625
    state = portable_state_dict(DeepLabV2MSC(NUM_FG, width_mult=width).state_dict())
    coco = {}
    for name, _, dtype in keys["init_file_keys"]:
        if name.startswith("fc."):
            coco[name] = torch.full((91, 128, 1, 1) if name.endswith("weight") else (91,), 0.5)
        else:
            coco[name] = state["base." + name].double() if dtype == "float64" else state["base." + name]
    assert len(coco) == 626
    path = tmp_path / "deeplabv1_resnet101-coco.pth"
    torch.save(coco, path)
    net = DeepLabV2MSC(NUM_FG, width_mult=width)
    kind, convention, report = load_deeplabv2_init(net, str(path))
    assert (kind, convention) == ("coco_segmentation", "caffe_bgr")
    assert report.new_keys == ["base." + k for k in keys["init_file_missing_keys"]]
    assert sorted(report.unused_keys) == sorted(keys["init_file_unexpected_keys"])
    loaded = net.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state if not k.startswith("base.aspp."))
    assert not torch.equal(loaded["base.aspp.c0.weight"], state["base.aspp.c0.weight"])

    released = tmp_path / "deeplabv2_resnet101_msc.pth"
    torch.save(state, released)
    fresh = DeepLabV2MSC(NUM_FG, width_mult=width)
    load_trained(fresh, str(released))
    assert torch.equal(fresh.state_dict()["base.aspp.c3.bias"], state["base.aspp.c3.bias"])
    kind, convention, report = load_deeplabv2_init(DeepLabV2MSC(5, width_mult=width), str(released))
    assert kind == "deeplabv2_checkpoint" and convention == "caffe_bgr"  # other class count: ASPP new
    assert len(report.new_keys) == 8 and len(report.unused_keys) == 8
    assert arch_of({}, list(state)) == "deeplabv2_resnet101"
    del coco["layer3.block1.shortcut.conv.weight"]
    torch.save(coco, path)
    with pytest.raises(DataError, match="missing backbone keys"):
        load_deeplabv2_init(DeepLabV2MSC(NUM_FG, width_mult=width), str(path))
    torch.save({"b2.conv_branch1.weight": torch.zeros(1)}, path)  # a ResNet38 file
    with pytest.raises(DataError, match="deeplabv1_resnet101-coco.pth: not a DeepLabV2 start"):
        load_deeplabv2_init(DeepLabV2MSC(NUM_FG, width_mult=width), str(path))


def test_torchvision_name_map_is_the_references_and_loads(tmp_path):
    name_map = _keys()["torchvision_name_map"]
    for tv_key, ours, _ in name_map:
        assert torchvision_to_deeplabv2_name(tv_key) == ours
    with pytest.raises(DataError):
        torchvision_to_deeplabv2_name("layer1.0.conv9.weight")
    net = DeepLabV2MSC(3, width_mult=0.0625)
    state = net.state_dict()
    rng = np.random.default_rng(0)
    tv_state = {tv_key: (torch.from_numpy(rng.standard_normal(state[ours].shape).astype(np.float32))
                         if ours and state[ours].is_floating_point() else
                         state[ours].clone() if ours else torch.zeros(1000, 128))
                for tv_key, ours, _ in name_map}
    path = tmp_path / "resnet101-63fe2227.pth"
    torch.save(tv_state, path)
    kind, convention, report = load_deeplabv2_init(net, str(path))
    assert (kind, convention) == ("imagenet_torchvision", "torchvision")
    assert sorted(report.unused_keys) == ["fc.bias", "fc.weight"]
    assert all(k.startswith("base.aspp.") for k in report.new_keys) and len(report.new_keys) == 8
    assert torch.equal(net.state_dict()["base.layer4.block23.conv3x3.bn.running_var"],
                       tv_state["layer3.22.bn2.running_var"])
    del tv_state["layer2.0.downsample.0.weight"]
    torch.save(tv_state, path)
    with pytest.raises(DataError, match="layer3.block1.shortcut.conv.weight"):
        load_deeplabv2_init(DeepLabV2MSC(3, width_mult=0.0625), str(path))
