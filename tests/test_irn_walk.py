"""IRN's random walk through the sparse operator against the reference's dense T^256."""
import numpy as np
import pytest
import torch

from tool.irn_walk import SEG_LABEL_VARIANTS, propagate_to_edge, seg_label, walk_scores, walked_to_label
from tests.reference_data import load_reference


def margin_ok(got: np.ndarray, expected: np.ndarray, scores: np.ndarray, max_ties: int = 3) -> None:
    """Labels equal, except at most ``max_ties`` pixels where the reference's top-2 margin < 1e-3."""
    top2 = np.sort(scores, axis=0)[-2:]
    near_tie = (top2[1] - top2[0]) < 1e-3
    differ = got != expected
    assert not (differ & ~near_tie).any()
    assert differ.sum() <= max_ties


def test_propagate_matches_reference():
    ref = load_reference("irn/irn_path_index.npz")
    x, edge = torch.from_numpy(ref["in_x"]), torch.from_numpy(ref["in_edge"])
    rw = propagate_to_edge(x, edge, radius=5, beta=10, logt=8)
    np.testing.assert_allclose(rw.numpy(), ref["rw"][:, 0], atol=2e-4)
    rw = propagate_to_edge(x, edge, radius=5, beta=1, logt=2)
    np.testing.assert_allclose(rw.numpy(), ref["rw_beta1_exp2"][:, 0], atol=2e-4)


@pytest.fixture(scope="module")
def rw():
    return load_reference("irn/irn_rw.npz")


@pytest.mark.parametrize("case", ["sedge", "net"])
def test_irn_variant_labels(rw, case):
    edge = torch.from_numpy(rw["sedge_edge"] if case == "sedge" else rw["net_edge"])
    class_ids = (rw["irn_cam_keys"] + 1).tolist()
    variant = SEG_LABEL_VARIANTS["irn"]
    walked = propagate_to_edge(torch.from_numpy(rw["irn_cam"]), edge)
    np.testing.assert_allclose(walked.numpy(), rw[f"{case}_irn_rw"][:, 0], atol=2e-4)
    image_hw = tuple(rw["img_size"].tolist())
    label = walked_to_label(variant, walked, class_ids, image_hw)
    margin_ok(label, rw[f"{case}_irn_label"], rw[f"{case}_irn_rw_up_bg"])
    whole = seg_label(variant, edge, class_ids, rw["irn_cam"], None, image_hw)
    np.testing.assert_array_equal(whole, label)


@pytest.mark.parametrize("case", ["sedge", "net"])
@pytest.mark.parametrize("name", ["sipe", "ae_sipe"])
def test_own_background_variant_labels(rw, case, name):
    edge = torch.from_numpy(rw["sedge_edge"] if case == "sedge" else rw["net_edge"])
    keys = rw["sipe_keys"].tolist()
    is_cam = rw["sipe_is_cam"]
    variant = SEG_LABEL_VARIANTS[name]
    scores = walk_scores(variant, is_cam[1:], is_cam[0], tuple(edge.shape[-2:]))
    np.testing.assert_allclose(scores.numpy(), rw["sipe_x_in"], atol=1e-6)
    image_hw = tuple(rw["img_size"].tolist())
    label = seg_label(variant, edge, keys[1:], is_cam[1:], is_cam[0], image_hw)
    margin_ok(label, rw[f"{case}_sipe_label"], rw[f"{case}_sipe_rw_up_norm"])
    if case == "sedge":
        assert set(np.unique(label)) == {0, 1, 15}


def test_no_class_is_background(rw):
    edge = torch.from_numpy(rw["sedge_edge"])
    label = seg_label(SEG_LABEL_VARIANTS["irn"], edge, [], np.zeros((0, 13, 16), np.float32), None, (50, 62))
    assert label.shape == (50, 62) and not label.any()
