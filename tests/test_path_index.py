"""IRN path indices, boundary affinities and pair labels against the reference vectors."""
import numpy as np
import pytest
import torch

from tool.path_index import PathIndex, check_path_size, edge_to_affinity, path_pair_labels
from tests.reference_data import load_reference


@pytest.fixture(scope="module")
def ref():
    return load_reference("irn/irn_path_index.npz")


@pytest.mark.parametrize("prefix", ["r5_16x16_", "r10_24x24_", "inf_r5_"])
def test_path_index_matches_reference(ref, prefix):
    height, width = ref[prefix + "default_size"].tolist()
    index = PathIndex(int(ref[prefix + "radius"]), height, width)
    assert index.radius_floor == int(ref[prefix + "radius_floor"])
    assert len(index.search_paths) == int(ref[prefix + "n_groups"])
    for k, paths in enumerate(index.search_paths):
        np.testing.assert_array_equal(paths, ref[f"{prefix}search_paths_{k}"])
        np.testing.assert_array_equal(index.path_indices[k], ref[f"{prefix}path_indices_{k}"])
    np.testing.assert_array_equal(index.search_dst, ref[prefix + "search_dst"])
    np.testing.assert_array_equal(index.src_indices, ref[prefix + "src_indices"])
    np.testing.assert_array_equal(index.dst_indices, ref[prefix + "dst_indices"])


def test_edge_to_affinity_matches_reference(ref):
    index = PathIndex(5, 15, 22)
    aff = edge_to_affinity(torch.from_numpy(ref["edge_padded"])[None], index)
    np.testing.assert_allclose(aff.numpy(), ref["sparse_aff"], atol=1e-7)
    aff10 = edge_to_affinity(torch.from_numpy(ref["in_edge_r10"]), PathIndex(10, 24, 24))
    np.testing.assert_allclose(aff10.numpy(), ref["aff_r10"], atol=1e-7)


def test_small_maps_are_refused():
    check_path_size(10, 10, 19)
    with pytest.raises(ValueError, match="too small"):
        PathIndex(10, 24, 18)
    with pytest.raises(ValueError, match="too small"):
        PathIndex(5, 4, 30)


def test_pair_labels_match_reference():
    ref = load_reference("irn/irn_labels.npz")
    index = PathIndex(10, 24, 24)
    np.testing.assert_array_equal(index.dst_indices, ref["dst_indices"])
    for name in ("hand_", "0", "1"):
        label = ref["hand_reduced_label"] if name == "hand_" else ref[f"reduced_label_{name}"]
        prefix = "hand_aff" if name == "hand_" else "aff"
        suffix = "" if name == "hand_" else f"_{name}"
        bg, fg, neg = path_pair_labels(label, index)
        np.testing.assert_array_equal(bg, ref[f"{prefix}_bg_pos_label{suffix}"])
        np.testing.assert_array_equal(fg, ref[f"{prefix}_fg_pos_label{suffix}"])
        np.testing.assert_array_equal(neg, ref[f"{prefix}_neg_label{suffix}"])
