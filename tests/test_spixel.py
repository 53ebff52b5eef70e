"""SpixelNet and the superpixel association ops against the MSA reference (tests/reference/msa/spixel.npz).

Tolerance of the reference README: |a - b| <= 1e-4 + 1e-3 |b| for float32 CPU results.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from network.spixel import (SpixelNet, hard_superpixels, labxy_target, one_hot,
                            pixel_coordinates, pool_features, refine_with_affinity, refine_with_association,
                            spixel_loss, superpixel_affinity, superpixel_scores, upsample_features)
from tests.reference_data import load_reference, portable_state_dict, reference_msa_keys
from tool.transforms import rgb_to_lab_uint8


def close(actual: torch.Tensor | np.ndarray, expected: np.ndarray, atol: float = 1e-4, rtol: float = 1e-3) -> None:
    actual = actual.detach().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol)


@pytest.fixture(scope="module")
def ref():
    return load_reference("msa/spixel.npz")


@pytest.fixture(scope="module")
def net():
    model = SpixelNet()
    model.load_state_dict(portable_state_dict(model.state_dict()))
    return model


def test_state_dict_keys_are_the_reference_ones(net):
    expected = [(name, tuple(shape)) for name, shape, _ in reference_msa_keys()["superpixel_net"]["state_dict"]]
    assert [(k, tuple(v.shape)) for k, v in net.state_dict().items()] == expected


def test_checkpoints_load_with_or_without_module_prefix(net):
    state = portable_state_dict(net.state_dict())
    wrapped = SpixelNet()
    wrapped.load_state_dict({"module." + k: v for k, v in state.items()}, strict=True)
    for key, value in state.items():
        assert torch.equal(wrapped.state_dict()[key], value)
    with pytest.raises(RuntimeError):
        SpixelNet().load_state_dict({k: v for k, v in state.items() if "pred_mask0" not in k}, strict=True)


def test_forward_train_and_eval(ref, net):
    images = torch.from_numpy(ref["image_norm"])
    state = {k: v.clone() for k, v in net.state_dict().items()}
    try:
        with torch.no_grad():
            net.train()
            close(net(images), ref["prob_train"])
            net.load_state_dict(state)
            net.eval()
            close(net(images), ref["prob_eval"])
    finally:
        net.load_state_dict(state)
        net.eval()


def test_labxy_target_and_loss(ref):
    assert np.array_equal(rgb_to_lab_uint8(ref["src0_uint8"]), ref["lab_uint8"][0])
    labxy = labxy_target(torch.from_numpy(ref["lab_uint8"]))
    close(labxy, ref["labxy"])
    close(pixel_coordinates(2, 64, 64), ref["xy_feat"])
    for mode in ("train", "eval"):
        prob = torch.from_numpy(ref[f"prob_{mode}"])
        loss = spixel_loss(prob, labxy)
        close(torch.stack([loss["total"], loss["sem"], loss["pos"]]), ref[f"qloss_{mode}"], atol=0, rtol=1e-4)
    prob = torch.from_numpy(ref["prob_train"])
    pooled = pool_features(labxy, prob)
    close(pooled, ref["qloss_train_pooled_labxy"])
    close(upsample_features(pooled, prob), ref["qloss_train_reconstr"])


def test_dynamic_convolution_is_upsampling_with_cell_one(ref):
    out = upsample_features(torch.from_numpy(ref["upfeat1_x"]), torch.from_numpy(ref["upfeat1_dp"]), 1)
    close(out, ref["upfeat1_out"], atol=1e-6, rtol=1e-5)


def test_affinity_and_refinement(ref):
    prob = torch.from_numpy(ref["prob_eval"])
    close(superpixel_affinity(prob), ref["calc_affmat"], atol=1e-6, rtol=1e-4)
    close(refine_with_affinity(torch.from_numpy(ref["refine_with_affmat_in"]), torch.from_numpy(ref["calc_affmat"])),
          ref["refine_with_affmat_out"], atol=1e-6, rtol=1e-4)
    assert np.array_equal(one_hot(torch.from_numpy(ref["one_hot_in"]), 21).numpy(), ref["one_hot_out"])
    # train_scn's validation recipe: 255 -> 0, one-hot, 12 x 12 and back, refine_with_q(iter=20).
    gt = torch.from_numpy(ref["refine_q_gt"]).clone()
    gt[gt == 255] = 0
    maps = F.interpolate(one_hot(gt[:, None], 21), size=(12, 12), mode="bilinear", align_corners=False)
    maps = F.interpolate(maps, size=(64, 64), mode="bilinear", align_corners=False)
    close(pool_features(maps, prob), ref["refine_q_pooled"], atol=1e-6, rtol=1e-4)
    cells, affinity = pool_features(maps, prob), superpixel_affinity(prob)
    for _ in range(19):
        cells = refine_with_affinity(cells, affinity)
    close(cells, ref["refine_q_after19"], atol=1e-7, rtol=1e-3)
    refined = refine_with_association(maps, prob, iterations=20)
    assert np.array_equal(refined.argmax(1).numpy(), ref["refine_q_pred"])


def test_superpixel_scores_of_hard_superpixels():
    # An association that puts every pixel in its own cell: superpixel edges are the grid lines.
    association = torch.zeros(1, 9, 32, 32)
    association[:, 4] = 1
    cells = hard_superpixels(association, cell=16)[0].numpy()
    assert len(np.unique(cells)) == 4
    gt = np.zeros((32, 32), dtype=np.int64)
    gt[:, 16:] = 1                      # on a grid line: found, and the cells are pure
    scores = superpixel_scores(cells, gt, tolerance=0)
    assert (scores["recall_found"], scores["recall_total"]) == (32, 32)
    assert scores["precision_found"] == 32 and scores["precision_total"] == 63  # the row 15 edge is no gt edge
    assert scores["asa_correct"] == scores["asa_total"] == 1024
    gt = np.zeros((32, 32), dtype=np.int64)
    gt[:, 8:] = 1                       # between grid lines: missed, except within 2 px of row 15/16
    scores = superpixel_scores(cells, gt, tolerance=2)
    assert (scores["recall_found"], scores["recall_total"]) == (5, 32)
    assert scores["asa_correct"] == 1024 - 2 * 8 * 16   # each left cell's 8 minority columns
