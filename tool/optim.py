"""Optimiser set-up: parameter groups, SGD and the poly schedule.

* ``parameter_groups``: SEAM's four learning-rate groups (``GROUP_SPECS``), read from a
  model's ``new_layers``; ``lr_prefix_groups``: groups by parameter-name prefix.
* ``make_sgd`` + ``PolyLR``: SGD with the poly schedule (power 0.9) of SEAM/PSA/DeepLab.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from tool.device import unwrap_model


# SEAM's multipliers: backbone weights, backbone biases, new-layer weights, new-layer biases.
GROUP_SPECS = (
    ("backbone_weight", 1.0, True),
    ("backbone_bias", 2.0, False),
    ("new_weight", 10.0, True),
    ("new_bias", 20.0, False),
)


def _is_new_layer(name: str, new_layers: Sequence[str]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in new_layers)


def parameter_groups(model: nn.Module, lr: float, weight_decay: float,
                     group_specs: Sequence[tuple[str, float, bool]] = GROUP_SPECS) -> list[dict[str, Any]]:
    """SEAM's four parameter groups, from the model class's ``new_layers`` name prefixes.

    Like SEAM's ``get_parameter_groups``, weights (conv and normalisation scales) get
    weight decay and biases (conv and normalisation shifts) do not: backbone weights
    1x ``lr``, backbone biases 2x, new-layer weights 10x, new-layer biases 20x.
    Parameters with ``requires_grad`` False (frozen BN, conv1a, b2*) are left out. Each
    group carries ``name`` and ``lr_mult``; empty groups are kept so indices stay fixed.
    ``group_specs`` replaces the four (name, lr multiplier, decays) rows (SIPE: 1, 1, 10, 10,
    all decayed).
    A model class with ``lr_groups`` gets those instead (:func:`lr_prefix_groups`).
    """
    model = unwrap_model(model)
    if getattr(type(model), "lr_groups", None) is not None:
        return lr_prefix_groups(model, lr, weight_decay)
    new_layers = getattr(type(model), "new_layers", None)
    if new_layers is None or isinstance(new_layers, str):
        raise TypeError(f"{type(model).__name__} must declare new_layers = (name prefixes, ...) "
                        f"as a tuple class attribute")
    named = list(model.named_parameters())
    unmatched = [prefix for prefix in new_layers if not any(_is_new_layer(name, (prefix,)) for name, _ in named)]
    if unmatched:
        raise ValueError(f"{type(model).__name__}.new_layers names {unmatched}, which match no parameter")
    groups = [{"params": [], "name": name, "lr_mult": mult, "lr": lr * mult,
               "weight_decay": weight_decay if decays else 0.0}
              for name, mult, decays in group_specs]
    for name, parameter in named:
        if not parameter.requires_grad:
            continue
        is_bias = name.rsplit(".", 1)[-1] == "bias"
        index = 2 * int(_is_new_layer(name, new_layers)) + int(is_bias)
        groups[index]["params"].append(parameter)
    return groups


def lr_prefix_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """One group per ``(submodule, lr_mult)`` of the model class's ``lr_groups`` (IRN: the boundary
    branch x1, the displacement branch x10), weight decay on every parameter (biases and
    GroupNorm included, as IRN); parameters in no listed submodule or with requires_grad False
    train not."""
    model = unwrap_model(model)
    groups = []
    for prefix, mult in type(model).lr_groups:
        # The submodule's own parameter order (shared modules may be registered under other names first).
        params = [p for p in model.get_submodule(prefix).parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{type(model).__name__}.lr_groups names {prefix!r}, "
                             f"which matches no trainable parameter")
        groups.append({"params": params, "name": prefix, "lr_mult": mult, "lr": lr * mult,
                       "weight_decay": weight_decay})
    return groups


def make_sgd(groups: list[dict[str, Any]], momentum: float = 0.0) -> torch.optim.SGD:
    """Plain SGD over ``parameter_groups``; SEAM/PSA train without momentum, DeepLab with 0.9.

    (SEAM's PolyOptimizer passes weight_decay positionally into SGD's momentum slot, so its
    momentum is 5e-4 by accident; that is negligible and not reproduced.)
    """
    trainable = [group for group in groups if group["params"]]
    if not trainable:
        raise ValueError("no trainable parameters: every parameter has requires_grad False")
    return torch.optim.SGD(trainable, lr=trainable[0]["lr"], momentum=momentum)


def poly_factor(step: int, max_step: int, power: float = 0.9) -> float:
    """(1 - step / max_step) ** power; past the end it stays at the last step's value (SEAM)."""
    if max_step <= 0:
        raise ValueError(f"max_step must be positive, got {max_step}")
    step = min(max(step, 0), max_step - 1)
    return (1.0 - step / max_step) ** power


class PolyLR(torch.optim.lr_scheduler.LRScheduler):
    """lr of group g at optimiser step t (0-based) = lr_g * (1 - t' / max_step) ** power.

    t' = t rounded down to a multiple of ``update_every`` (1: every step; DeepLabV2 updates
    the lr every 10 steps). Call ``scheduler.step()`` after each ``optimizer.step()``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_step: int, power: float = 0.9,
                 last_epoch: int = -1, update_every: int = 1) -> None:
        if update_every < 1:
            raise ValueError(f"update_every must be at least 1, got {update_every}")
        self.max_step = max_step  # poly_factor refuses max_step <= 0 at the first get_lr below
        self.power = power
        self.update_every = update_every
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        step = self.last_epoch - self.last_epoch % self.update_every
        factor = poly_factor(step, self.max_step, self.power)
        return [base_lr * factor for base_lr in self.base_lrs]
