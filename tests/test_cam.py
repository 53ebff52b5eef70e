"""CAM fusion, CAM dicts, seeds and background scores against SEAM's infer_SEAM vector."""
import numpy as np
import pytest

from tool.cam import (SEAM_SEED_BG_THRESHOLD, alpha_for_threshold, bg_score, cam_dict_from, fuse_cams,
                      labels_from_scores, scores_with_background, seed_from_cam_dict)
from tests.reference_data import load_reference



@pytest.fixture(scope="module")
def ref():
    return load_reference("seam_cam_postproc.npz")


def test_fuse_cams_matches_seam(ref):
    norm_cam = fuse_cams(ref["cam_in"], ref["label"])
    assert norm_cam.dtype == np.float32 and norm_cam.shape == (20, 28, 36)
    np.testing.assert_allclose(norm_cam, ref["norm_cam"], atol=1e-5, rtol=0)
    # Quirks: absent classes are exactly -1; present maxima stay below 1; zeroed pixels are tiny negatives.
    absent = ref["label"] <= 1e-5
    assert np.all(norm_cam[absent] == -1.0)
    assert norm_cam[~absent].max() < 1.0
    assert -1e-5 < norm_cam[~absent].min() < 0


def test_fuse_cams_rejects_label_length_mismatch(ref):
    with pytest.raises(ValueError):
        fuse_cams(ref["cam_in"], ref["label"][:19])


def test_cam_dict_and_seed_match_seam(ref):
    norm_cam = fuse_cams(ref["cam_in"], ref["label"])
    cam_dict = cam_dict_from(norm_cam, ref["label"])
    assert list(cam_dict) == ref["cam_dict_keys"].tolist()
    np.testing.assert_allclose(np.stack(list(cam_dict.values())), ref["cam_dict_values"], atol=1e-5, rtol=0)
    seed = seed_from_cam_dict(cam_dict, 20, float(ref["out_cam_pred_alpha"]))
    assert seed.dtype == np.uint8
    np.testing.assert_array_equal(seed, ref["pred"])


def test_seed_ties_go_to_lowest_index_and_empty_dict():
    cam_dict = {3: np.array([[0.5, 0.2]], np.float32), 1: np.array([[0.5, 0.2]], np.float32)}
    # Class 1 and class 3 tie at 0.5 -> class 1 (label 2); 0.2 ties the threshold -> background.
    np.testing.assert_array_equal(seed_from_cam_dict(cam_dict, 20, 0.2), [[2, 0]])
    np.testing.assert_array_equal(seed_from_cam_dict({}, 20, 0.26, image_hw=(2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError):
        seed_from_cam_dict({}, 20, 0.26)
    with pytest.raises(ValueError):
        seed_from_cam_dict({20: np.zeros((1, 1), np.float32)}, 20, 0.26)


def test_background_scores_match_seam(ref):
    cam_dict = dict(zip(ref["cam_dict_keys"].tolist(), ref["cam_dict_values"]))
    for alpha in (4, 24):
        keys, probs = scores_with_background(cam_dict, alpha)
        assert keys == ref["cam_dict_keys"].tolist()
        assert probs.dtype == np.float32
        np.testing.assert_allclose(probs, ref[f"bgcam{alpha}"], atol=1e-5, rtol=0)
    # Slightly negative CAMs push the background above 1 (reference quirk, kept).
    assert bg_score(ref["cam_dict_values"], 4).max() > 1.0


def test_bg_score_hand_values():
    cams = np.array([[[0.5, 0.0]], [[0.25, 1.0]]], np.float32)
    np.testing.assert_allclose(bg_score(cams, 2), [[[0.25, 0.0]]])
    np.testing.assert_array_equal(bg_score(np.zeros((0, 1, 2), np.float32), 4), np.ones((1, 1, 2)))


def test_labels_from_scores_maps_channels_to_ids():
    scores = np.array([[[0.1, 0.7]], [[0.9, 0.2]], [[0.0, 0.7]]], np.float32)
    np.testing.assert_array_equal(labels_from_scores([0, 9, 16], scores), [[9, 0]])


def test_alpha_for_threshold_moves_boundary_to_threshold():
    alpha = alpha_for_threshold(SEAM_SEED_BG_THRESHOLD)
    assert alpha == pytest.approx(4.47, abs=0.01)
    top = np.linspace(0.0, 1.0, 1001, dtype=np.float32)
    cam_dict = {0: top[None]}
    with_threshold = seed_from_cam_dict(cam_dict, 20, SEAM_SEED_BG_THRESHOLD)
    keys, probs = scores_with_background(cam_dict, alpha)
    with_alpha = labels_from_scores([0, 1], probs)
    # The two labellings agree except within float rounding of the boundary.
    assert np.count_nonzero(with_threshold != with_alpha) <= 1
    with pytest.raises(ValueError):
        alpha_for_threshold(1.0)


def test_fuse_cams_clip_fixes_class_positive_everywhere():
    # One class, positive everywhere: SEAM maps its minimum pixel to -min/range.
    view_cams = np.array([[[[2.0, 3.0], [4.0, 6.0]]]], np.float32)
    label = np.array([1.0], np.float32)
    seam = fuse_cams(view_cams, label)
    assert seam[0, 0, 0] < -0.4  # (0 - 2 - 1e-5) / (6 - 2 + 1e-5)
    fixed = fuse_cams(view_cams, label, clip=True)
    np.testing.assert_allclose(fixed[0], [[0.0, 0.25], [0.5, 1.0]], atol=1e-5)
