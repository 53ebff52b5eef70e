"""Radius pair indexing and affinity labels (tool/affinity.py) against brute force and the reference."""
import itertools
import os

import numpy as np
import pytest
import torch

from network.affinity import AffinityNet, affinity_loss, pair_affinities
from tool import transforms as T
from tool.affinity import (affinity_pair_labels, affinity_radius, fuse_crf_labels, pair_indices,
                           pool_score_stack, radius_offsets)
from tool.fileio import DataError, save_npy, save_rgb_image
from voc12 import layout as voc_layout
from voc12.affinity_dataset import AffinityDataset, affinity_labels_from_crop, crf_score_stack
from tests.reference_data import load_reference, portable_state_dict, reference_keys

reference = load_reference


def brute_force_pairs(radius: int, h: int, w: int) -> set[tuple[int, int]]:
    """All within-radius pairs (p, q), p raster-earlier than q, by enumerating every pixel pair."""
    pairs = set()
    coords = list(itertools.product(range(h), range(w)))
    for (y0, x0), (y1, x1) in itertools.product(coords, coords):
        p, q = y0 * w + x0, y1 * w + x1
        if p < q and (y1 - y0) ** 2 + (x1 - x0) ** 2 < radius * radius:
            pairs.add((p, q))
    return pairs


def test_radius_offsets_reference_order():
    stored = reference("aff_labels_extract.npz")["search_dist"]
    assert [tuple(o) for o in stored.tolist()] == radius_offsets(5)
    assert len(radius_offsets(5)) == 34
    # 2^2 + 2^2 = 8 < 9: the corners (2, +-2) are inside radius 3.
    assert radius_offsets(3) == [(0, 1), (0, 2), (1, -2), (1, -1), (1, 0), (1, 1), (1, 2),
                                 (2, -2), (2, -1), (2, 0), (2, 1), (2, 2)]


@pytest.mark.parametrize("radius,h,w", [(5, 12, 15), (5, 9, 11), (3, 8, 8), (4, 10, 7), (2, 3, 5)])
def test_pair_indices_are_the_windowed_subset_of_brute_force(radius, h, w):
    ind_from, ind_to = pair_indices(radius, h, w)
    n_off = len(radius_offsets(radius))
    assert ind_to.shape == (n_off * ind_from.size,)
    graph = set(zip(np.tile(ind_from, n_off).tolist(), ind_to.tolist()))
    assert len(graph) == ind_to.size                      # no duplicates
    every_pair = brute_force_pairs(radius, h, w)
    # The quirk: a within-radius pair is present iff its earlier endpoint is in the from window.
    in_window = {(p, q) for p, q in every_pair
                 if p // w <= h - radius and radius - 1 <= p % w <= w - radius}
    assert graph == in_window
    if (h, w) == (12, 15) and radius == 5:
        assert len(every_pair) * 2 - 2 * len(graph) == 5000   # README: 5000 of 8808 ordered pairs missing
        assert (3, 4) not in graph and (4, 5) in graph


def test_pair_indices_match_reference_rw_common():
    data = reference("rw_common.npz")
    ind_from, ind_to = pair_indices(5, 12, 15)
    np.testing.assert_array_equal(ind_from, data["ind_from"])
    np.testing.assert_array_equal(ind_to, data["ind_to"])


def test_pair_indices_reject_maps_without_pairs():
    with pytest.raises(ValueError):
        pair_indices(5, 4, 20)
    with pytest.raises(ValueError):
        pair_indices(1, 10, 10)


def test_seam_radius_rule():
    assert affinity_radius(56, 56) == 5
    assert affinity_radius(12, 12) == 5
    assert affinity_radius(11, 40) == 5
    assert affinity_radius(10, 40) == 4
    assert affinity_radius(8, 8) == 3
    assert affinity_radius(20, 6) == 2


def test_affinity_labels_match_reference_extract():
    data = reference("aff_labels_extract.npz")
    bg_pos, fg_pos, neg = affinity_pair_labels(data["label"], int(data["radius"]))
    for name, ours in (("bg_pos", bg_pos), ("fg_pos", fg_pos), ("neg", neg)):
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours, data[name], err_msg=name)
    assert (bg_pos.sum(), fg_pos.sum(), neg.sum()) == (33871, 19604, 517)


def test_affinity_labels_hand_made_map_pair_by_pair():
    # Non-square 6x9 map, radius 3: bg, two fg classes and 255 regions.
    label = np.array([[0, 0, 0, 1, 1, 1, 255, 2, 2],
                      [0, 0, 255, 1, 1, 1, 255, 2, 2],
                      [0, 0, 0, 0, 1, 1, 2, 2, 2],
                      [255, 255, 0, 0, 0, 2, 2, 2, 2],
                      [0, 0, 0, 0, 0, 0, 2, 255, 2],
                      [0, 0, 1, 1, 0, 0, 0, 0, 0]], dtype=np.uint8)
    radius, (h, w) = 3, label.shape
    bg_pos, fg_pos, neg = affinity_pair_labels(label, radius)
    ind_from, _ = pair_indices(radius, h, w)
    flat = label.ravel()
    for d, (dy, dx) in enumerate(radius_offsets(radius)):
        for j, p in enumerate(ind_from):
            y, x = divmod(int(p), w)
            a, b = int(flat[p]), int(label[y + dy, x + dx])
            expect_bg = a == 0 and b == 0
            expect_fg = a == b and a not in (0, 255)
            expect_neg = a != b and a != 255 and b != 255
            assert (bg_pos[d, j], fg_pos[d, j], neg[d, j]) == (expect_bg, expect_fg, expect_neg), (dy, dx, y, x)
    # Every pair lands in at most one class, and 255 pairs in none.
    assert np.all(bg_pos + fg_pos + neg <= 1)
    assert bg_pos.sum() > 0 and fg_pos.sum() > 0 and neg.sum() > 0


def test_fuse_and_pool_match_reference_dataset():
    data = reference("aff_labels_dataset.npz")
    la, ha = data["la_values"], data["ha_values"]
    stack = np.concatenate([la, ha]).transpose(1, 2, 0)       # (H, W, 6), la first
    top, left, img_top, img_left, ch, cw = data["crop_box"].tolist()
    crop_size = int(data["cropsize"])
    container = np.zeros((crop_size, crop_size, stack.shape[2]), np.float32)
    container[top:top + ch, left:left + cw] = stack[img_top:img_top + ch, img_left:img_left + cw]
    np.testing.assert_array_equal(container, data["crop_label_stack"])
    pooled = pool_score_stack(container, 8)
    np.testing.assert_allclose(pooled, data["pooled_stack"], rtol=0, atol=1e-7)
    k = la.shape[0]
    label = fuse_crf_labels(pooled[..., :k], pooled[..., k:])
    np.testing.assert_array_equal(label, data["label"])
    bg_pos, fg_pos, neg = affinity_pair_labels(label, 5)
    np.testing.assert_array_equal(bg_pos, data["bg_pos"])
    np.testing.assert_array_equal(fg_pos, data["fg_pos"])
    np.testing.assert_array_equal(neg, data["neg"])


def test_fuse_rules_on_hand_made_cells():
    # cells: la fg/ha fg-other -> la class; la bg/ha fg -> 255; la bg/ha bg -> 0; la fg/ha bg -> 0; no score -> 255
    la = np.array([[[0.1, 0.8, 0.1], [0.7, 0.2, 0.1], [0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0, 0, 0]]], np.float32)
    ha = np.array([[[0.1, 0.1, 0.8], [0.2, 0.2, 0.6], [0.6, 0.2, 0.2], [0.6, 0.3, 0.1], [0, 0, 5e-6]]], np.float32)
    assert fuse_crf_labels(la, ha).tolist() == [[1, 255, 0, 0, 255]]


def test_pool_pads_partial_blocks_with_zeros():
    stack = np.ones((10, 9, 1), np.float32)
    pooled = pool_score_stack(stack, 8)
    assert pooled.shape == (2, 2, 1)
    np.testing.assert_allclose(pooled[..., 0], [[1, 8 / 64], [16 / 64, 2 / 64]])


# --------------------------------------------------------------------------- AffinityNet


def test_pair_affinities_match_reference_rw_common():
    data = reference("rw_common.npz")
    aff = pair_affinities(torch.from_numpy(data["x"]), 5)
    np.testing.assert_allclose(aff.numpy(), data["aff_pairs"], atol=1e-6)


def test_affinity_net_keys_match_released_checkpoints():
    expected = reference_keys("SEAM network.resnet38_aff.Net")
    state = AffinityNet().state_dict()
    assert len(state) == len(expected) == 232
    assert {k: list(v.shape) for k, v in state.items()} == expected


def test_affinity_net_portable_forward_matches_reference():
    from bench.dense_rw_baseline import dense_affinity
    data = reference("aff_forward_portable.npz")
    net = AffinityNet().eval()
    net.load_state_dict(portable_state_dict(net.state_dict()))
    x = torch.from_numpy(data["x"])
    with torch.no_grad():
        aff = net(x)
        graph = net.affinity_graph(x)
    np.testing.assert_allclose(aff.numpy(), data["aff"], atol=1e-5, rtol=1e-4)
    assert graph.feat_hw == (12, 12)
    np.testing.assert_allclose(dense_affinity(graph).numpy(), data["aff_dense"], atol=1e-5, rtol=1e-4)


def test_small_affinity_net_uses_radius_rule_and_trains():
    torch.manual_seed(0)
    net = AffinityNet(width_mult=0.0625)
    assert net.new_layers == ("f8_3", "f8_4", "f8_5", "f9")
    assert net.f8_5.weight.shape == (256, 256, 1, 1)          # head widths fixed, input scaled
    x = torch.randn(2, 3, 64, 64)
    aff = net(x)                                              # 8x8 map -> radius 3: 12 offsets, 6 x 4 from pixels
    assert aff.shape == (2, 12, 24)
    assert torch.all((aff > 0) & (aff <= 1))
    label = np.random.default_rng(0).integers(0, 3, (8, 8)).astype(np.uint8)
    label[0, :3] = 255
    pair_labels = [torch.from_numpy(a)[None].expand(2, -1, -1) for a in affinity_pair_labels(label, 3)]
    losses = affinity_loss(aff, *pair_labels)
    losses["total"].backward()
    assert net.f9.weight.grad is not None and torch.isfinite(net.f9.weight.grad).all()
    with pytest.raises(ValueError):
        net.affinity_graph(x)


def test_affinity_loss_by_hand():
    aff = torch.tensor([[[0.9, 0.2], [0.5, 0.7]]])
    bg = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    fg = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])
    neg = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
    losses = affinity_loss(aff, bg, fg, neg)
    eps = 1e-5
    expect_bg = -np.log(0.9 + eps) / (1 + eps)
    expect_fg = -(np.log(0.5 + eps) + np.log(0.7 + eps)) / (2 + eps)
    expect_neg = -np.log(1 + eps - 0.2) / (1 + eps)
    np.testing.assert_allclose(losses["bg"].item(), expect_bg, rtol=1e-6)
    np.testing.assert_allclose(losses["fg"].item(), expect_fg, rtol=1e-6)
    np.testing.assert_allclose(losses["neg"].item(), expect_neg, rtol=1e-6)
    np.testing.assert_allclose(losses["total"].item(), expect_bg / 4 + expect_fg / 4 + expect_neg / 2, rtol=1e-6)
    # No pairs of a kind: that term is 0, not NaN.
    assert affinity_loss(aff, torch.zeros_like(bg), fg, neg)["bg"].item() == 0


# --------------------------------------------------------------------------- AffinityDataset
def test_crop_pool_fuse_matches_reference_dataset():
    data = reference("aff_labels_dataset.npz")
    keys = data["keys"].tolist()
    la = {k: v for k, v in zip(keys, data["la_values"])}
    ha = {k: v for k, v in zip(keys, data["ha_values"])}
    stack = crf_score_stack(la, ha, "ref")
    box = T.CropBox(*data["crop_box"].tolist())
    label, (bg_pos, fg_pos, neg) = affinity_labels_from_crop(stack, box, int(data["cropsize"]), False, 5)
    np.testing.assert_array_equal(label, data["label"])
    np.testing.assert_array_equal(bg_pos, data["bg_pos"])
    np.testing.assert_array_equal(fg_pos, data["fg_pos"])
    np.testing.assert_array_equal(neg, data["neg"])
    flipped, _ = affinity_labels_from_crop(stack, box, int(data["cropsize"]), True, 5)
    np.testing.assert_array_equal(flipped, label[:, ::-1])


def make_affinity_data(root, ids, size_hw=(60, 50)):
    info = voc_layout.dataset_info("synthetic", str(root), class_names=["background", "a", "b", "c"])
    rng = np.random.default_rng(0)
    la_dir, ha_dir = str(root / "crf_4.0"), str(root / "crf_24.0")
    h, w = size_hw
    for image_id in ids:
        save_rgb_image(info.image_path(image_id), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        fg = np.zeros((h, w), np.float32)
        fg[10:40, 5:30] = 1
        for folder, bg_weight in ((la_dir, 0.3), (ha_dir, 0.8)):
            bg = np.where(fg > 0, 0.1, 0.9).astype(np.float32) * bg_weight
            save_npy(os.path.join(folder, image_id + ".npy"), {0: bg, 2: 1 - bg})
    return info, la_dir, ha_dir


def test_affinity_dataset_items_are_reproducible(tmp_path):
    ids = ["img_a", "img_b"]
    info, la_dir, ha_dir = make_affinity_data(tmp_path, ids)
    dataset = AffinityDataset(info, ids, la_dir, ha_dir, crop_size=64, seed=3)
    image_id, image, (bg_pos, fg_pos, neg) = dataset[1]
    assert image_id == "img_b"
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert bg_pos.shape == fg_pos.shape == neg.shape == (12, 24)       # 8x8 labels: radius 3
    assert bg_pos.sum() > 0 and fg_pos.sum() + neg.sum() > 0
    again = dataset[1]
    assert torch.equal(again[1], image) and all(torch.equal(a, b) for a, b in zip(again[2], (bg_pos, fg_pos, neg)))
    dataset.set_epoch(1)
    assert not torch.equal(dataset[1][1], image)
    plain = AffinityDataset(info, ids, la_dir, ha_dir, crop_size=64, augment=False)
    assert torch.equal(plain[0][1], plain[0][1])
    # The image padding (centre-padded 50 -> 64 columns) is 0 after normalisation.
    assert plain[0][1][:, :, :7].abs().max() == 0


def test_affinity_dataset_checks_files_and_keys(tmp_path):
    info, la_dir, ha_dir = make_affinity_data(tmp_path, ["img_a"])
    with pytest.raises(DataError, match="high-alpha CRF dicts"):
        os.remove(os.path.join(ha_dir, "img_a.npy"))
        AffinityDataset(info, ["img_a"], la_dir, ha_dir, crop_size=64)
    save_npy(os.path.join(ha_dir, "img_a.npy"), {0: np.zeros((60, 50), np.float32), 1: np.zeros((60, 50), np.float32)})
    dataset = AffinityDataset(info, ["img_a"], la_dir, ha_dir, crop_size=64)
    with pytest.raises(DataError, match="keys"):
        dataset[0]
