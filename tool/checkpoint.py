"""Checkpoints: paths, atomic save, strict load, finiteness and key mismatches.

* ``save_checkpoint`` / ``read_checkpoint`` / ``load_checkpoint``: one dict (model, optimiser,
  scheduler, step, epoch, args, RNG state of every rank) written atomically, for a bit-exact
  resume; loading is strict.
* ``require_finite_weights`` / ``non_finite_keys``: no NaN/inf weights enter a run.
* ``state_mismatch`` / ``format_keys``: one readable line for keys or shapes that differ.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from tool.device import rng_state, set_rng_state, unwrap_model
from tool.distributed import all_gather_object, barrier, get_rank
from tool.fileio import DataError, atomic_path
from tool.logs import config_dict
from tool.nan_guard import NonFiniteLossError

logger = logging.getLogger(__name__)


def non_finite_keys(state: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors in ``state`` (nested dicts/lists too) holding NaN or inf."""
    bad: list[str] = []

    def visit(name: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not _all_finite(value):
                bad.append(name)
        elif isinstance(value, Mapping):
            for key, item in value.items():
                visit(f"{name}.{key}" if name else str(key), item)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                visit(f"{name}.{index}", item)

    visit("", state)
    return bad


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry is finite. A NaN or inf entry makes the sum non-finite, so a finite sum
    (one reduction, no mask: 10x faster than ``isfinite(t).all()`` on a full-width ResNet38, where
    that took 1.9 s a start) proves it; a non-finite sum may be an overflow of finite entries, so
    that case gets the entry-wise check."""
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def require_finite_weights(state: Mapping[str, Any], path: str) -> None:
    """DataError when a state dict read from ``path`` holds NaN/inf (a diverged run's weights)."""
    bad = non_finite_keys(state)
    if bad:
        raise DataError(f"{path}: {len(bad)} tensors are not finite (NaN or inf), e.g. {format_keys(bad, 3)}: "
                        f"the weights of a diverged training; use an earlier checkpoint")


def format_keys(keys: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def state_mismatch(model: nn.Module, file_state: Mapping[str, torch.Tensor], path: str) -> str | None:
    """The strict loader's short report (missing, unexpected keys, first shape conflict), or None
    when ``file_state`` fits ``model`` exactly."""
    target = unwrap_model(model)
    model_state = target.state_dict()
    missing = [k for k in model_state if k not in file_state]
    unexpected = [k for k in file_state if k not in model_state]
    conflicts = [f"{k}: file {tuple(file_state[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in model_state.items() if k in file_state and file_state[k].shape != v.shape]
    if not (missing or unexpected or conflicts):
        return None
    message = [f"{path} does not match {type(target).__name__}"]
    if missing:
        message.append(f"missing keys ({len(missing)}): {format_keys(missing)}")
    if unexpected:
        message.append(f"unexpected keys ({len(unexpected)}): {format_keys(unexpected)}")
    if conflicts:
        more = f" ({len(conflicts) - 1} more: another --width_mult?)" if len(conflicts) > 1 else ""
        message.append(f"first shape conflict: {conflicts[0]}{more}")
    return "; ".join(message)


# --------------------------------------------------------------------------- checkpoints
def checkpoint_paths(save_dir: str, session_name: str) -> tuple[str, str]:
    """(``<save_dir>/<session>_last.pth``, ``<save_dir>/<session>.pth``)."""
    return (os.path.join(save_dir, f"{session_name}_last.pth"), os.path.join(save_dir, f"{session_name}.pth"))


def save_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None, step: int,
                    epoch: int, args: argparse.Namespace | Mapping[str, Any] | None = None,
                    extra: Mapping[str, Any] | None = None, *, scheduler: Any = None) -> None:
    """Write one checkpoint dict atomically (rank 0 writes; every rank must call it).

    Keys: ``model`` (state dict, unwrapped from DDP), ``optimizer``, ``scheduler``,
    ``step`` (completed optimiser steps), ``epoch``, ``args``
    (plain dict), ``rng`` (rank 0's python/numpy/torch/cuda states), ``rng_by_rank`` (every
    rank's, for a bit-exact distributed resume) and ``extra``.

    A model or optimiser state with a NaN/inf tensor on any rank is never written: every rank
    raises NonFiniteLossError naming the tensors, and the previous file stays as it was.
    """
    optimizer_state = optimizer.state_dict() if optimizer is not None else None
    local_bad = non_finite_keys({"model": unwrap_model(model).state_dict(), "optimizer": optimizer_state})
    gathered = all_gather_object((rng_state(), local_bad))
    rng_by_rank = [rng for rng, _ in gathered]
    bad = sorted({name for _, names in gathered for name in names})
    if bad:
        raise NonFiniteLossError(f"after step {step}: {len(bad)} parameters/buffers are not finite, e.g. "
                                 f"{format_keys(bad, 3)}; {path} was not written")
    if get_rank() == 0:
        state = {
            "model": unwrap_model(model).state_dict(),
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "step": int(step),
            "epoch": int(epoch),
            "args": config_dict(args) if args is not None else {},
            "rng": rng_by_rank[0],
            "rng_by_rank": rng_by_rank,
            "extra": dict(extra) if extra else {},
        }
        with atomic_path(path) as tmp_path:
            torch.save(state, tmp_path)
    barrier()


def read_checkpoint(path: str) -> dict[str, Any]:
    """Load a checkpoint dict on the CPU; a missing or foreign file raises DataError."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: checkpoint does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and unpickling-policy errors alike
        raise DataError(f"{path}: cannot read checkpoint ({error})") from error
    if not isinstance(state, dict) or not {"model", "step", "epoch"} <= set(state):
        raise DataError(f"{path}: not a training checkpoint (expected a dict with model, step, epoch)")
    return state


def load_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                    scheduler: Any = None) -> dict[str, Any]:
    """Restore model (strict), optimiser, scheduler and this rank's RNG state.

    Returns the checkpoint dict (``step``, ``epoch``, ``args``, ``extra`` ...).
    """
    state = read_checkpoint(path)
    mismatch = state_mismatch(model, state["model"], path)
    if mismatch:
        raise DataError(mismatch)
    require_finite_weights({"model": state["model"], "optimizer": state.get("optimizer")}, path)
    try:
        unwrap_model(model).load_state_dict(state["model"], strict=True)
    except RuntimeError as error:  # e.g. a dtype the model cannot take
        raise DataError(f"{path}: weights do not fit the model: {str(error).splitlines()[0]}") from error
    for name, target in (("optimizer", optimizer), ("scheduler", scheduler)):
        if target is None:
            continue
        if state.get(name) is None:
            raise DataError(f"{path}: checkpoint has no {name} state to resume from")
        try:
            target.load_state_dict(state[name])
        except (ValueError, KeyError, RuntimeError) as error:
            raise DataError(f"{path}: {name} state does not fit: {error}") from error
    rank = get_rank()
    by_rank = state.get("rng_by_rank") or [state["rng"]]
    if rank < len(by_rank):
        set_rng_state(by_rank[rank])
    else:
        logger.warning("%s: saved with %d process(es); rank %d reuses rank 0's RNG state "
                       "(the resume is not bit-exact)", path, len(by_rank), rank)
        set_rng_state(by_rank[0])
    return state
