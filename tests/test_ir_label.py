"""IR labels of the three variants against the reference cam2ir vectors (pydensecrf2: exact)."""
import numpy as np
import pytest

from tool.fileio import DataError
from tool.ir_label import IR_LABEL_VARIANTS, confident_label, get_ir_variant, ir_label, split_cam_dict
from tests.reference_data import load_reference


@pytest.fixture(scope="module")
def ref():
    return load_reference("irn/irn_cam2ir.npz")


def test_irn_variant_matches_reference(ref):
    class_ids = (ref["irn_cam_keys"] + 1).tolist()
    cams = ref["irn_high_res"]
    variant = get_ir_variant("irn")
    for which, threshold in (("fg", 0.30), ("bg", 0.05)):
        scores = np.concatenate([np.full((1,) + cams.shape[1:], threshold, np.float32), cams])
        np.testing.assert_array_equal(np.argmax(scores, 0), ref[f"irn_{which}_conf_cam_argmax"])
        values = np.array([0] + class_ids)
        np.testing.assert_array_equal(confident_label(ref["img"], class_ids, scores),
                                      values[ref[f"irn_{which}_crf_pred"]])
    label = ir_label(ref["img"], class_ids, cams, variant)
    np.testing.assert_array_equal(label, ref["irn_ir_label"])
    assert set(np.unique(label)) == {0, 1, 15, 255}


@pytest.mark.parametrize("name,prefix", [("sipe", "sipe"), ("ae_sipe", "aesipe_0p8")])
def test_own_background_variants_match_reference(ref, name, prefix):
    keys = ref["sipe_keys"].tolist()
    cam_dict = {key: ref["sipe_is_cam"][index] for index, key in enumerate(keys)}
    class_ids, cams, background = split_cam_dict(cam_dict, True, ref["img"].shape[:2])
    assert class_ids == keys[1:]
    label = ir_label(ref["img"], class_ids, cams, IR_LABEL_VARIANTS[name], background)
    np.testing.assert_array_equal(label, ref[f"{prefix}_ir_label"])
    assert float(ref["aesipe_bg_scale_default"]) == IR_LABEL_VARIANTS["ae_sipe"].bg_scale
    assert float(ref["sipe_bg_scale"]) == IR_LABEL_VARIANTS["sipe"].bg_scale


def test_plain_cam_dict_and_errors(ref):
    cam_dict = {int(k): v for k, v in zip(ref["irn_cam_keys"], ref["irn_high_res"])}
    class_ids, cams, background = split_cam_dict(cam_dict, False, (50, 62))
    assert class_ids == [1, 15] and background is None and cams.shape == (2, 50, 62)
    with pytest.raises(DataError, match="own background"):
        split_cam_dict({14: cam_dict[14]}, True, (50, 62))
    with pytest.raises(DataError, match="do not match"):
        split_cam_dict(cam_dict, False, (50, 60))
    # An image without classes is all confident background.
    empty = ir_label(ref["img"], [], np.zeros((0, 50, 62), np.float32), IR_LABEL_VARIANTS["irn"])
    assert empty.shape == (50, 62) and not empty.any()
