"""Pictures of tool/vis.py: exact colours, blocks in the affinity picture."""
import numpy as np

from tool.vis import affinity_matrix_picture, cam_overlay, colorize_label, label_overlay, tile_row


def test_colorize_label_uses_voc_palette():
    label = np.array([[0, 1], [15, 255]], np.uint8)
    rgb = colorize_label(label)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert rgb[0, 1].tolist() == [128, 0, 0] and rgb[1, 0].tolist() == [192, 128, 128]


def test_overlays_keep_shape_and_background():
    image = np.full((4, 5, 3), 100, np.uint8)
    label = np.zeros((4, 5), np.uint8)
    label[1, 1] = 1
    out = label_overlay(image, label)
    assert (out[0, 0] == 100).all() and not (out[1, 1] == 100).all()
    assert cam_overlay(image, np.linspace(0, 1, 20).reshape(4, 5)).shape == (4, 5, 3)
    assert tile_row([image, image]).shape == (4, 14, 3)


def test_affinity_picture_groups_pixels_into_blocks():
    labels = np.array([1, 0, 1, 0])
    affinity = (labels[:, None] == labels[None, :]).astype(np.float32)
    picture = affinity_matrix_picture(affinity, labels, size=4)
    # After sorting by label the two classes form two bright diagonal blocks.
    bright = picture.sum(-1) > picture.sum(-1).mean()
    np.testing.assert_array_equal(bright, np.kron(np.eye(2), np.ones((2, 2))).astype(bool))
