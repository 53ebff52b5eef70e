"""IRN training crops against the reference VOC12AffinityDataset (with its recorded draws)."""
import numpy as np
import pytest

from tool import transforms as T
from tool.path_index import PathIndex, path_pair_labels
from voc12.irn_dataset import irn_crop, reduce_label
from tests.reference_data import load_reference


@pytest.mark.parametrize("item", [0, 1])
def test_crop_and_labels_match_reference(item):
    ref = load_reference("irn/irn_labels.npz")
    image, label = ref[f"orig_img_{item}"], ref[f"orig_label_{item}"]
    scale = float(ref[f"draw_scale_{item}"])
    width, height = T.scaled_size(image.shape[0], image.shape[1], scale)
    assert (height, width) == tuple(ref[f"scaled_size_{item}"].tolist())
    ct, cb, cl, cr, it, ib, il, ir = ref[f"draw_box_{item}"].tolist()
    box = T.CropBox(ct, cl, it, il, cb - ct, cr - cl)
    crop_size = int(ref["crop_size"])
    crop, crop_label = irn_crop(image, label, scale, bool(ref[f"draw_flip_{item}"]), box, crop_size)
    np.testing.assert_allclose(T.hwc_to_chw(crop), ref[f"img_{item}"], atol=1e-6)
    np.testing.assert_array_equal(crop_label, ref[f"label_{item}"])
    reduced = reduce_label(crop_label)
    np.testing.assert_array_equal(reduced, ref[f"reduced_label_{item}"])
    bg, fg, neg = path_pair_labels(reduced, PathIndex(int(ref["radius"]), 24, 24))
    np.testing.assert_array_equal(neg, ref[f"aff_neg_label_{item}"])
    np.testing.assert_array_equal(fg, ref[f"aff_fg_pos_label_{item}"])
