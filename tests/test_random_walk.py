"""Sparse random walk (tool/random_walk.py) against the reference vectors and the dense baseline."""

import numpy as np
import pytest
import torch

from bench.dense_rw_baseline import dense_affinity, dense_random_walk, dense_transition
from network.affinity import pair_affinities
from tests.reference_data import load_reference, reference_cam_dict, reference_graph
from tool.fileio import DataError
from tool.random_walk import (AffinityGraph, chebyshev_power_coefficients, propagate, random_walk,
                              random_walk_labels, rw_scores_from_cam_dict, walk_operator)

RW_CASES = ["rw_a6_t8", "rw_a6_t6", "rw_a24_t8", "rw_a24_t6"]


reference = load_reference


def random_graph(radius: int, h: int, w: int, seed: int) -> AffinityGraph:
    """Affinities of a piecewise-constant feature map plus noise, as AffinityNet would give."""
    rng = np.random.default_rng(seed)
    regions = (np.arange(h)[:, None] * 3 // h) * 2 + (np.arange(w)[None, :] * 2 // w)
    features = rng.normal(size=(6, 8))[regions] + 0.2 * rng.normal(size=(h, w, 8))
    features = torch.from_numpy(features.transpose(2, 0, 1)[None].astype(np.float32))
    return AffinityGraph.from_pairs(pair_affinities(features, radius)[0], radius, (h, w))


def test_dense_baseline_reproduces_reference_matrices():
    graph = reference_graph()
    common, data = reference("rw_common.npz"), reference("rw_a6_t8.npz")
    np.testing.assert_array_equal(dense_affinity(graph).numpy(), common["aff_dense"])
    np.testing.assert_allclose(dense_transition(graph, 8, 8).numpy(), data["trans_mat"], atol=5e-5, rtol=1e-4)


def test_walk_operator_is_sparse_transposed_transition():
    graph, data = reference_graph(), reference("rw_a6_t8.npz")
    operator = walk_operator(graph, beta=8)
    assert operator.layout == torch.sparse_csr
    assert operator._nnz() == graph.num_nodes + 2 * graph.ind_to.numel()
    np.testing.assert_allclose(operator.to_dense().t().numpy(), data["trans_mat0"], atol=1e-6)


@pytest.mark.parametrize("case", RW_CASES)
def test_random_walk_matches_reference(case):
    data = reference(f"{case}.npz")
    alpha, beta, logt = float(data["alpha"]), int(data["beta"]), int(data["logt"])
    scores = rw_scores_from_cam_dict(reference_cam_dict(), 20, alpha, (90, 117))
    np.testing.assert_allclose(scores.numpy(), data["cam_pooled"], atol=1e-6)
    walked = random_walk(reference_graph(), scores, beta, logt)
    np.testing.assert_allclose(walked.numpy(), data["cam_rw"], atol=5e-5, rtol=1e-4)
    label = random_walk_labels(walked, (90, 117))
    assert label.dtype == np.uint8 and label.shape == (90, 117)
    differ = label != data["label"]
    assert np.all(data["label_margin"][differ] < 1e-4), "labels differ away from near-ties"
    assert differ.sum() <= 1


@pytest.mark.parametrize("method", ["chebyshev", "power"])
@pytest.mark.parametrize("radius,h,w,beta,logt,seed", [(5, 13, 17, 8, 8, 0), (3, 8, 8, 8, 6, 1),
                                                       (5, 20, 11, 4, 5, 2)])
def test_sparse_walk_equals_dense_baseline(radius, h, w, beta, logt, seed, method):
    graph = random_graph(radius, h, w, seed)
    rng = np.random.default_rng(seed + 100)
    scores = torch.from_numpy(rng.uniform(0, 1, (21, h, w)).astype(np.float32) ** 3)
    ours = random_walk(graph, scores, beta, logt, method=method)
    dense = dense_random_walk(graph, scores, beta, logt)
    np.testing.assert_allclose(ours.numpy(), dense.numpy(), rtol=1e-4, atol=1e-4 * float(dense.abs().max()))
    image_hw = (h * 8 - 3, w * 8 - 5)
    np.testing.assert_array_equal(random_walk_labels(ours, image_hw), random_walk_labels(dense, image_hw))
    # Each walked score is a weighted average of scores (T is column-stochastic).
    assert ours.min() >= scores.min() - 1e-6 and ours.max() <= scores.max() + 1e-6


def test_float32_walk_stays_close():
    graph, data = reference_graph(), reference("rw_a6_t8.npz")
    scores = torch.from_numpy(data["cam_pooled"])
    walked = random_walk(graph, scores, 8, 8, dtype=torch.float32)
    np.testing.assert_allclose(walked.numpy(), data["cam_rw"], atol=5e-5, rtol=1e-4)


def test_scores_background_and_padding():
    cam = {2: np.full((10, 12), 0.5, np.float32)}
    scores = rw_scores_from_cam_dict(cam, 4, 2.0, (10, 12))
    assert scores.shape == (5, 2, 2)
    # bottom-right cell: 2 x 4 real pixels of the 8 x 8 block, the rest zero padding
    np.testing.assert_allclose(scores[3, 1, 1].item(), 0.5 * 8 / 64)
    np.testing.assert_allclose(scores[0, 0, 0].item(), 0.25)
    assert scores[1].abs().max() == 0


def test_bad_inputs_raise():
    with pytest.raises(DataError, match="class key 7"):
        rw_scores_from_cam_dict({7: np.zeros((8, 8), np.float32)}, 4, 1.0, (8, 8), source="x.npy")
    with pytest.raises(DataError, match="x.npy"):
        rw_scores_from_cam_dict({1: np.zeros((8, 9), np.float32)}, 4, 1.0, (8, 8), source="x.npy")
    with pytest.raises(ValueError):
        AffinityGraph.from_pairs(torch.zeros(34, 55), 5, (12, 15))


@pytest.mark.parametrize("radius,h,w,seed", [(5, 13, 17, 3), (3, 8, 8, 4), (5, 6, 11, 5)])
def test_walk_operator_rows_match_dense_with_missing_pairs(radius, h, w, seed):
    graph = random_graph(radius, h, w, seed)
    operator = walk_operator(graph, beta=8)
    assert operator.crow_indices().dtype == torch.int32 and operator.col_indices().dtype == torch.int32
    crow, cols = operator.crow_indices().long(), operator.col_indices().long()
    for row in range(graph.num_nodes):                                  # tiny graph: columns sorted per row
        assert torch.all(cols[crow[row] + 1:crow[row + 1]] > cols[crow[row]:crow[row + 1] - 1])
    dense = operator.to_dense()
    expected = dense_transition(graph, 8, 0).double().t()
    np.testing.assert_allclose(dense.numpy(), expected.numpy(), atol=1e-7)
    # Missing pairs (the reference's border quirk) are absent entries, not small ones.
    assert operator._nnz() == graph.num_nodes + 2 * graph.ind_to.numel()
    assert torch.equal(dense != 0, expected > 0)
    left_edge = radius - 2                                              # (0, r-2)-(0, r-1): within radius, missing
    assert dense[left_edge, left_edge + 1] == 0 and dense[left_edge + 1, left_edge + 2] > 0
    np.testing.assert_allclose(dense.sum(dim=1).numpy(), 1.0, atol=1e-12)


@pytest.mark.parametrize("power,tolerance", [(256, 1e-12), (64, 1e-8), (7, 1e-3), (1, 1e-12)])
def test_chebyshev_coefficients_bound_the_error(power, tolerance):
    coefficients = chebyshev_power_coefficients(power, tolerance)
    x = np.linspace(-1, 1, 2001)
    error = np.abs(x ** power - np.polynomial.chebyshev.chebval(x, coefficients)).max()
    assert error <= tolerance * (1 + 1e-6) + 1e-14
    assert abs(sum(chebyshev_power_coefficients(power, 0.0)) - 1) < 1e-12       # untruncated: p(1) = 1
    if power == 256:
        assert len(coefficients) - 1 < 128                              # the point: far fewer products


def test_propagate_methods_agree_and_leave_input_alone():
    graph = random_graph(5, 12, 15, 6)
    operator = walk_operator(graph, beta=8)
    scores = torch.rand(1, graph.num_nodes, dtype=torch.float64)        # one channel: (N, 1) view is contiguous
    kept = scores.clone()
    for logt in (0, 3, 8):
        power = propagate(operator, scores, logt, method="power")
        chebyshev = propagate(operator, scores, logt)
        np.testing.assert_allclose(chebyshev.numpy(), power.numpy(), rtol=1e-9, atol=1e-12)
    assert torch.equal(scores, kept)
    with pytest.raises(ValueError, match="method"):
        propagate(operator, scores, 2, method="lanczos")


def test_thread_cap_is_restored_and_does_not_change_results():
    graph = random_graph(5, 12, 15, 7)
    scores = torch.rand(3, 12, 15)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        capped = random_walk(graph, scores, 8, 4)
        assert torch.get_num_threads() == 2
        uncapped = random_walk(graph, scores, 8, 4, max_threads=None)
    finally:
        torch.set_num_threads(before)
    np.testing.assert_allclose(capped.numpy(), uncapped.numpy(), rtol=1e-6, atol=1e-7)


def test_zero_channels_are_skipped_exactly():
    graph = random_graph(5, 12, 15, 8)
    scores = torch.zeros(5, 12, 15)
    scores[2] = torch.rand(12, 15)
    walked = random_walk(graph, scores, 8, 5)
    assert torch.count_nonzero(walked[[0, 1, 3, 4]]) == 0
    np.testing.assert_allclose(walked[2].numpy(), random_walk(graph, scores[2:3], 8, 5)[0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(walked.numpy(), dense_random_walk(graph, scores, 8, 5).numpy(), rtol=1e-4, atol=1e-6)
    assert torch.count_nonzero(random_walk(graph, torch.zeros(2, 12, 15), 8, 5)) == 0
