"""Layers shared by every backbone: frozen BatchNorm, the width multiplier's rounding."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d that always normalises with its running statistics (never updates them).

    Its affine parameters do not learn either, unless ``trainable_affine`` (the reference
    ``FixedBatchNorm`` of IRN/SIPE/MSA: running statistics, trained gamma/beta).

    Keeps the parameter/buffer names of ``nn.BatchNorm2d`` (``weight``, ``bias``,
    ``running_mean``, ``running_var``, ``num_batches_tracked``), so state-dict keys do not
    change. Deliberately not a ``_BatchNorm`` subclass: ``SyncBatchNorm`` conversion and
    ``model.train()`` leave it frozen.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, trainable_affine: bool = False) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        # trainable_affine: the IRN/SIPE/MSA "FixedBatchNorm" (running statistics, learnt gamma/beta).
        self.weight = nn.Parameter(torch.ones(num_features), requires_grad=trainable_affine)
        self.bias = nn.Parameter(torch.zeros(num_features), requires_grad=trainable_affine)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, trainable_affine: bool = False) -> "FrozenBatchNorm2d":
        frozen = cls(bn.num_features, bn.eps, trainable_affine)
        with torch.no_grad():
            frozen.weight.copy_(bn.weight)
            frozen.bias.copy_(bn.bias)
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
            frozen.num_batches_tracked.copy_(bn.num_batches_tracked)
        return frozen.to(bn.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, momentum=0.0, eps=self.eps)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        # Files written before torch 0.4.1 have no num_batches_tracked (as nn.BatchNorm2d).
        state_dict.setdefault(prefix + "num_batches_tracked", torch.tensor(0, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def scaled_channels(channels: int, width_mult: float) -> int:
    """Channel count of the full model scaled by ``width_mult``; at least 8."""
    return max(8, int(round(channels * width_mult)))


def replace_batchnorms(module: nn.Module, parent: nn.Module, name: str,
                       trainable_affine: bool = False) -> None:
    """Swap ``module`` (child ``name`` of ``parent``) and its BatchNorm descendants for frozen ones."""
    if isinstance(module, nn.BatchNorm2d):
        setattr(parent, name, FrozenBatchNorm2d.from_batchnorm(module, trainable_affine))
        return
    for child_name, child in list(module.named_children()):
        replace_batchnorms(child, module, child_name, trainable_affine)
