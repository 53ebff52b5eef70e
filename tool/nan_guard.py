"""The NaN guard of the losses: a non-finite loss term stops a run with a message naming it.

``NonFiniteLossError`` is what the entry points turn into exit 3 (``tool.cli.run_cli``);
``check_finite`` raises it for the loss terms of a step, ``tool.checkpoint`` for weights.
"""
from __future__ import annotations

from typing import Mapping

import torch


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; the message names the step and the terms."""


def check_finite(loss_terms: Mapping[str, torch.Tensor | float], step: int,
                 last_good: str = "the last checkpoint is the last good state") -> None:
    """Raise NonFiniteLossError naming ``step``, every NaN/inf term and ``last_good``."""
    bad = {}
    for name, value in loss_terms.items():
        number = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        if not bool(torch.isfinite(number).all()):
            bad[name] = number.flatten()[0].item() if number.numel() == 1 else "non-finite entries"
    if bad:
        listed = ", ".join(f"{name}={value}" for name, value in bad.items())
        raise NonFiniteLossError(f"non-finite loss at step {step}: {listed}; training stopped, {last_good}")
