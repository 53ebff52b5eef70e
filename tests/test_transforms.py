"""Joint transforms of tool/transforms.py: label padding, joint flips, rng determinism."""
import numpy as np
import pytest
import torch

from tests.reference_data import load_reference
from tool import transforms as T
from tool.contract import IGNORE_LABEL, IMAGENET_MEAN, IMAGENET_STD


def _image_and_label(height=20, width=30, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    label = rng.integers(0, 4, size=(height, width), dtype=np.uint8)
    return image, label


def test_crop_of_small_image_pads_label_with_255_and_image_with_fill():
    image, label = _image_and_label(20, 30)
    normalised = T.normalize(image)
    cropped, cropped_label, box = T.random_crop(normalised, 40, np.random.default_rng(3), label)
    assert cropped.shape == (40, 40, 3) and cropped_label.shape == (40, 40)
    assert (box.height, box.width, box.img_top, box.img_left) == (20, 30, 0, 0)
    inside = np.zeros((40, 40), dtype=bool)
    inside[box.cont_top:box.cont_top + 20, box.cont_left:box.cont_left + 30] = True
    assert np.all(cropped_label[~inside] == IGNORE_LABEL)
    assert np.all(cropped[~inside] == 0.0)
    np.testing.assert_array_equal(cropped_label[inside].reshape(20, 30), label)
    np.testing.assert_array_equal(cropped[inside].reshape(20, 30, 3), normalised)


def test_crop_of_large_image_is_a_window_of_both():
    image, label = _image_and_label(50, 60)
    cropped, cropped_label, box = T.random_crop(image, 16, np.random.default_rng(5), label)
    assert (box.cont_top, box.cont_left, box.height, box.width) == (0, 0, 16, 16)
    window = (slice(box.img_top, box.img_top + 16), slice(box.img_left, box.img_left + 16))
    np.testing.assert_array_equal(cropped, image[window])
    np.testing.assert_array_equal(cropped_label, label[window])


def test_crop_box_draws_width_first_as_psa():
    # h=140 > 128 and w=100 < 128: first draw gives cont_left, second img_top (reference 3b).
    box = T.random_crop_box(140, 100, 128, np.random.default_rng(11))
    replay = np.random.default_rng(11)
    assert box.cont_left == int(replay.integers(29)) and box.img_top == int(replay.integers(13))
    assert (box.cont_top, box.img_left, box.height, box.width) == (0, 0, 128, 100)


def test_center_crop_box_centres():
    assert T.center_crop_box(10, 20, 14) == T.CropBox(2, 0, 0, 3, 10, 14)


def test_flip_flips_image_and_label_together():
    image, label = _image_and_label()
    flipped, flipped_label = T.hflip(image, label)
    np.testing.assert_array_equal(flipped, image[:, ::-1])
    np.testing.assert_array_equal(flipped_label, label[:, ::-1])
    outcomes = set()
    for seed in range(12):
        out_image, out_label = T.random_hflip(image, np.random.default_rng(seed), label)
        is_flipped = np.array_equal(out_image, flipped)
        assert np.array_equal(out_label, flipped_label) == is_flipped
        outcomes.add(is_flipped)
    assert outcomes == {True, False}


def test_resize_long_side_within_range_and_label_nearest():
    image, label = _image_and_label(20, 30)
    for seed in range(5):
        resized, resized_label = T.random_resize_long(image, np.random.default_rng(seed), (40, 50), label)
        assert 40 <= max(resized.shape[:2]) <= 50
        assert resized_label.shape == resized.shape[:2]
        assert set(np.unique(resized_label)) <= set(np.unique(label))
        assert resized.shape[1] == max(resized.shape[:2])   # the long side stays the width


def test_rescale_keeps_aspect_and_label_values():
    image, label = _image_and_label(20, 30)
    resized, resized_label = T.random_rescale(image, np.random.default_rng(2), (0.5, 1.5), label)
    assert resized_label.shape == resized.shape[:2]
    assert abs(resized.shape[1] / resized.shape[0] - 1.5) < 0.1
    assert set(np.unique(resized_label)) <= set(np.unique(label))


def test_scaled_size_uses_python_round_as_seam():
    assert T.scaled_size(25, 35, 0.5) == (18, 12)   # round(17.5) = 18, round(12.5) = 12


def test_random_transforms_depend_only_on_the_given_rng():
    image, _ = _image_and_label(24, 24)
    np.random.seed(1)
    torch.manual_seed(1)
    first = T.color_jitter(image, np.random.default_rng(7))
    np.random.seed(2)
    torch.manual_seed(2)
    again = T.color_jitter(image, np.random.default_rng(7))
    other = T.color_jitter(image, np.random.default_rng(8))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert first.dtype == np.uint8 and first.shape == image.shape
    hsv_a = T.hsv_jitter(image, np.random.default_rng(3))
    np.testing.assert_array_equal(hsv_a, T.hsv_jitter(image, np.random.default_rng(3)))


def test_hsv_jitter_without_shift_is_nearly_identity():
    image, _ = _image_and_label(16, 16)
    same = T.hsv_jitter(image, np.random.default_rng(0), 0, 0, 0)
    assert np.abs(same.astype(int) - image.astype(int)).max() <= 8   # OpenCV's uint8 HSV is lossy


def test_normalize_values_and_exact_round_trip():
    image = np.arange(256, dtype=np.uint8).repeat(3).reshape(16, 16, 3)
    normalised = T.normalize(image)
    assert normalised.dtype == np.float32
    expected = (255 / 255.0 - IMAGENET_MEAN[1]) / IMAGENET_STD[1]
    assert normalised[15, 15, 1] == pytest.approx(expected, rel=1e-6)
    np.testing.assert_array_equal(T.denormalize(normalised), image)
    assert T.denormalize(normalised, truncate=True).dtype == np.uint8


def test_hwc_to_chw_is_contiguous():
    image, _ = _image_and_label(5, 7)
    chw = T.hwc_to_chw(image)
    assert chw.shape == (3, 5, 7) and chw.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(chw[2], image[..., 2])


def test_crop_box_reproduces_the_psa_reference_crop():
    reference = load_reference("aff_labels_dataset.npz")
    stack = np.concatenate([reference["la_values"], reference["ha_values"]]).transpose(1, 2, 0)
    box = T.CropBox(*reference["crop_box"].tolist())
    cropped = T.apply_crop_box(stack, box, int(reference["cropsize"]), 0.0)
    np.testing.assert_array_equal(cropped, reference["crop_label_stack"])
