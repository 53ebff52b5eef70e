"""The dense random walk of PSA/SEAM ``infer_aff.py``, kept as the baseline to test and time against.

Dense A (N x N, symmetric, unit diagonal) from the pair affinities, ``A ** beta``,
column normalisation into T, ``logt`` squarings (T^(2^logt)), then ``scores @ T``:
O(N^3) time and O(N^2) memory, float32 as the reference. Not used by the pipeline.
"""
from __future__ import annotations

import torch

from tool.random_walk import AffinityGraph


def dense_affinity(graph: AffinityGraph) -> torch.Tensor:
    """The reference's ``to_dense`` affinity: A[from, to] = A[to, from] = aff, A[i, i] = 1."""
    num_nodes, device = graph.num_nodes, graph.weights.device
    weights = graph.weights.float().reshape(-1)
    ind_from = graph.ind_from.repeat(graph.weights.shape[0])
    nodes = torch.arange(num_nodes, device=device)
    indices = torch.stack([torch.cat([ind_from, nodes, graph.ind_to]),
                           torch.cat([graph.ind_to, nodes, ind_from])])
    values = torch.cat([weights, torch.ones(num_nodes, device=device), weights])
    return torch.sparse_coo_tensor(indices, values, (num_nodes, num_nodes), check_invariants=False).to_dense()


def dense_transition(graph: AffinityGraph, beta: float, logt: int) -> torch.Tensor:
    """T^(2^logt) with T = column-normalised ``A ** beta`` (dense, float32)."""
    affinity = dense_affinity(graph) ** beta
    transition = affinity / torch.sum(affinity, dim=0, keepdim=True)
    for _ in range(logt):
        transition = torch.matmul(transition, transition)
    return transition


def dense_random_walk(graph: AffinityGraph, scores: torch.Tensor, beta: float = 8, logt: int = 8) -> torch.Tensor:
    """``scores @ T^(2^logt)`` for scores (C, h, w); returns (C, h, w) float32."""
    channels = scores.shape[0]
    transition = dense_transition(graph, beta, logt)
    walked = torch.matmul(scores.float().reshape(channels, -1).to(transition.device), transition)
    return walked.reshape(channels, *graph.feat_hw)
