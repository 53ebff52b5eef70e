"""Training machinery shared by train_avc.py, train_aff.py and train_deeplab.py.

* ``parameter_groups``: SEAM's four learning-rate groups, read from a model's ``new_layers``.
* ``make_sgd`` + ``PolyLR``: SGD with the poly schedule (power 0.9) of SEAM/PSA/DeepLab.
* ``save_checkpoint`` / ``load_checkpoint``: one dict (model, optimiser, scheduler, step,
  epoch, args, RNG state of every rank) written atomically, for a bit-exact resume.
* ``check_finite``: the NaN guard; ``autocast_context`` / ``prepare_model``: bf16 autocast,
  channels_last and DDP on CUDA, plain modules on CPU.
* ``EpochBatchSampler`` + ``make_loader``: the same global batches for any worker or
  process count, permuted from (seed, epoch), with mid-epoch resume.
* ``Trainer``: the loop body (backward, step, schedule, CSV log, tqdm, checkpoints);
  ``build_trainer``: the set-up every train script shares, from its flags.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import random
from typing import Any, ContextManager, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from tool.distributed import (DistInfo, all_gather_object, all_reduce_tensor, barrier,
                              broadcast_buffers_from_main, get_rank)
from tool.fileio import DataError, atomic_path
from tool.logs import CsvLogger, config_dict, save_config

logger = logging.getLogger(__name__)

# SEAM's multipliers: backbone weights, backbone biases, new-layer weights, new-layer biases.
GROUP_SPECS = (
    ("backbone_weight", 1.0, True),
    ("backbone_bias", 2.0, False),
    ("new_weight", 10.0, True),
    ("new_bias", 20.0, False),
)


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; the message names the step and the terms."""


# --------------------------------------------------------------------------- model helpers
def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


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


def images_to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch of images (N, C, H, W) on ``device``; channels_last on CUDA, as the models there."""
    images = images.to(device, non_blocking=True)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def autocast_context(device: torch.device | str, enabled: bool = True) -> ContextManager:
    """bf16 autocast on CUDA (no loss scaling needed); nothing on CPU."""
    device = torch.device(device)
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_model(model: nn.Module, dist: DistInfo) -> nn.Module:
    """Move to the device; channels_last on CUDA; wrap in DDP when the run has several processes."""
    model = model.to(dist.device)
    if dist.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if dist.distributed:
        device_ids = [dist.device.index] if dist.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=device_ids)
    return model


# --------------------------------------------------------------------------- randomness
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices). Call from main(), never at import."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's RNG states, as plain lists and tensors (loadable with weights_only)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": np_state[1].tolist(), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np.asarray(np_state["keys"], dtype=np.uint32),
                         np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices: a permutation drawn from (seed, epoch), cut into global
    batches of ``batch_size`` (the tail that does not fill a batch is dropped); rank r of
    ``world_size`` takes its contiguous slice of each global batch.

    ``batch_size`` is the global batch, so the number of steps, the schedule and the
    samples of each step do not depend on the number of processes (as SEAM's batch 8
    spread over 4 GPUs). ``set_epoch(epoch, skip_batches=k)`` resumes mid-epoch.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True) -> None:
        if batch_size <= 0 or batch_size % world_size:
            raise ValueError(f"batch size {batch_size} must be a positive multiple of the "
                             f"number of processes ({world_size})")
        if num_samples < batch_size:
            raise DataError(f"the dataset has {num_samples} samples, fewer than one batch of {batch_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.batches_per_epoch = num_samples // batch_size
        self.epoch = 0
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        if not 0 <= skip_batches <= self.batches_per_epoch:
            raise ValueError(f"cannot skip {skip_batches} of {self.batches_per_epoch} batches")
        self.epoch = epoch
        self.skip_batches = skip_batches

    def global_batches(self) -> np.ndarray:
        """(batches_per_epoch, batch_size) indices of this epoch, identical on every rank."""
        if self.shuffle:
            order = np.random.default_rng((self.seed, self.epoch)).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        return order[: self.batches_per_epoch * self.batch_size].reshape(self.batches_per_epoch, self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self.batch_size // self.world_size
        start = self.rank * per_rank
        for batch in self.global_batches()[self.skip_batches:]:
            yield batch[start:start + per_rank].tolist()

    def __len__(self) -> int:
        return self.batches_per_epoch - self.skip_batches


def make_loader(dataset: Dataset, sampler: EpochBatchSampler, num_workers: int) -> DataLoader:
    """A DataLoader over ``sampler``'s batches for its current epoch.

    Calls ``dataset.set_epoch(epoch)`` when the dataset has it (augmentation drawn from
    (seed, epoch, index)); workers are created per epoch so they see it. The loader gets
    its own generator, so iterating it never draws from the global torch RNG and a
    resumed run continues the same random stream.
    """
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(sampler.epoch)
    generator = torch.Generator()
    generator.manual_seed(int(np.random.default_rng((sampler.seed, sampler.epoch, 7)).integers(2**62)))
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), generator=generator, persistent_workers=False)


# --------------------------------------------------------------------------- NaN guard
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


def non_finite_keys(state: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors in ``state`` (nested dicts/lists too) holding NaN or inf."""
    bad: list[str] = []

    def visit(name: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                bad.append(name)
        elif isinstance(value, Mapping):
            for key, item in value.items():
                visit(f"{name}.{key}" if name else str(key), item)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                visit(f"{name}.{index}", item)

    visit("", state)
    return bad


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


# --------------------------------------------------------------------------- trainer
class Trainer:
    """Owns the optimiser step, the NaN guard, the CSV log, the tqdm bar and the checkpoints.

    A train script builds the model, optimiser, scheduler and sampler, then::

        trainer = Trainer(model, optimizer, scheduler, dist, max_step=..., steps_per_epoch=...,
                          loss_names=("cls", "er"), save_dir=args.save_dir,
                          session_name=args.session_name, save_every=args.save_every, args=args)
        trainer.resume(args.resume)
        for epoch in trainer.epochs(sampler):        # saves <session>_last.pth after each epoch
            for batch in trainer.progress(make_loader(dataset, sampler, args.num_workers)):
                with trainer.autocast():
                    terms = compute_losses(model, batch)
                trainer.step(sum(terms.values()), terms)
        trainer.finish()                              # writes <session>.pth

    ``global_step`` counts completed optimiser steps; the CSV's ``step`` column and the
    NaN guard number steps from 1.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 dist: DistInfo, *, max_step: int, steps_per_epoch: int, loss_names: Sequence[str],
                 save_dir: str, session_name: str, save_every: int = 0,
                 args: argparse.Namespace | Mapping[str, Any] | None = None, amp: bool = True,
                 start_over: bool = False, clip_grad_norm: float | None = None) -> None:
        if max_step <= 0 or steps_per_epoch <= 0:
            raise ValueError(f"max_step ({max_step}) and steps_per_epoch ({steps_per_epoch}) must be positive")
        reserved = {"step", "epoch", "lr", "loss"} & set(loss_names)
        if reserved:
            raise ValueError(f"loss term names {sorted(reserved)} clash with CSV columns")
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.dist = dist
        self.max_step = max_step
        self.steps_per_epoch = steps_per_epoch
        self.loss_names = tuple(loss_names)
        self.save_every = save_every
        self.args = args
        self.amp = amp
        self.clip_grad_norm = clip_grad_norm  # max total gradient L2 norm (SIPE: 1.0); None: no clipping
        self.last_path, self.final_path = checkpoint_paths(save_dir, session_name)
        self.csv_path = os.path.join(save_dir, f"{session_name}_log.csv")
        self.global_step = 0
        self._saved_step = -1
        self._bar: tqdm | None = None
        self._csv: CsvLogger | None = None
        self._start_over = start_over
        self._extra_logs: list[CsvLogger] = []
        if dist.is_main:
            os.makedirs(save_dir, exist_ok=True)
            # start_over: an earlier run's log stays untouched until this run's first checkpoint.
            self._csv = CsvLogger(self.csv_path, ("step", "epoch", "lr", "loss") + self.loss_names,
                                  start_over=start_over)

    # ---- position
    @property
    def epoch(self) -> int:
        return self.global_step // self.steps_per_epoch

    @property
    def batches_done_in_epoch(self) -> int:
        return self.global_step % self.steps_per_epoch

    @property
    def num_epochs(self) -> int:
        return math.ceil(self.max_step / self.steps_per_epoch)

    @property
    def done(self) -> bool:
        return self.global_step >= self.max_step

    # ---- resume / save
    def resume(self, path: str | None) -> bool:
        """Continue from ``path`` (``'auto'``: this session's last checkpoint if it exists).

        Without a checkpoint the run starts at step 0 and the CSV log starts empty.
        Returns True when a checkpoint was loaded.
        """
        if path == "auto":
            path = self.last_path if os.path.isfile(self.last_path) else None
        loaded = path is not None
        if loaded:
            state = load_checkpoint(path, self.model, self.optimizer, scheduler=self.scheduler)
            self.global_step = int(state["step"])
            self._saved_step = self.global_step
            logger.info("resumed from %s at step %d (epoch %d)", path, self.global_step, self.epoch + 1)
        if self._csv is not None:
            self._csv.drop_rows_after("step", self.global_step)
        return loaded

    def save_last(self) -> None:
        """Write ``<session>_last.pth`` (every rank calls it; rank 0 writes)."""
        self._save(self.last_path)
        self._saved_step = self.global_step

    def _save(self, path: str) -> None:
        try:
            save_checkpoint(path, self.model, self.optimizer, self.global_step, self.epoch, self.args,
                            scheduler=self.scheduler)
        except NonFiniteLossError as error:
            raise NonFiniteLossError(f"{error}; training stopped, {self.last_good()}") from None
        for log in ([self._csv] if self._csv is not None else []) + self._extra_logs:
            log.commit()

    def open_log(self, path: str, fieldnames: Sequence[str]) -> CsvLogger:
        """Another CSV log of this run (e.g. validation), kept like the main one: continued on
        resume (rows past the checkpoint dropped), held back under --overwrite until the first
        checkpoint. Call after :meth:`resume`, on the main rank."""
        log = CsvLogger(path, fieldnames, start_over=self._start_over and self._saved_step < 0)
        log.drop_rows_after("step", self.global_step)
        self._extra_logs.append(log)
        return log

    def last_good(self) -> str:
        """Which checkpoint holds the last good state (for the NaN guard's message)."""
        if self._saved_step >= 0:
            return f"{self.last_path} (step {self._saved_step}) is the last good state"
        return "no checkpoint of this run was written"

    def finish(self) -> str:
        """Write the final ``<session>.pth`` (same dict; weights under ``'model'``).

        Every rank ends with rank 0's BatchNorm statistics, the ones the checkpoint holds.
        """
        self._close_bar()
        broadcast_buffers_from_main(unwrap_model(self.model))
        if self._saved_step != self.global_step:
            self.save_last()
        self._save(self.final_path)
        if self.dist.is_main:
            logger.info("final weights written to %s (step %d)", self.final_path, self.global_step)
        return self.final_path

    # ---- loop
    def epochs(self, sampler: EpochBatchSampler | None = None) -> Iterator[int]:
        """Yield epoch numbers (0-based) from the resumed position until ``max_step``.

        Positions ``sampler`` for each epoch (skipping the batches a resumed run already
        did) and writes ``<session>_last.pth`` after each epoch's body.
        """
        if sampler is not None and sampler.batches_per_epoch != self.steps_per_epoch:
            raise ValueError(f"sampler has {sampler.batches_per_epoch} batches per epoch, "
                             f"the trainer expects {self.steps_per_epoch}")
        while not self.done:
            epoch = self.epoch
            if sampler is not None:
                sampler.set_epoch(epoch, skip_batches=self.batches_done_in_epoch)
            yield epoch
            self._close_bar()
            if self.epoch == epoch and not self.done:
                raise RuntimeError(f"epoch {epoch + 1} ended after step {self.global_step}, before its "
                                   f"{self.steps_per_epoch} steps: the loader is shorter than steps_per_epoch")
            if self._saved_step != self.global_step:
                self.save_last()

    def progress(self, batches: Iterable) -> Iterator[Any]:
        """Iterate one epoch's ``batches`` with a tqdm bar (rank 0 only), stopping at ``max_step``."""
        epoch_start = self.epoch * self.steps_per_epoch
        self._close_bar()
        self._bar = tqdm(total=min(self.steps_per_epoch, self.max_step - epoch_start),
                         initial=self.global_step - epoch_start, desc=f"epoch {self.epoch + 1}/{self.num_epochs}",
                         disable=not self.dist.is_main, dynamic_ncols=True, leave=False)
        for batch in batches:
            if self.done:
                break
            yield batch
        self._close_bar()

    def images_to_device(self, images: torch.Tensor) -> torch.Tensor:
        """A batch of images (N, C, H, W) on this rank's device; channels_last on CUDA, as the model."""
        return images_to_device(images, self.dist.device)

    def autocast(self) -> ContextManager:
        return autocast_context(self.dist.device, enabled=self.amp)

    def zero_grad(self) -> None:
        """Clear the gradients before sub-batches accumulate into them (``step(..., backward=False)``)."""
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, loss: torch.Tensor, terms: Mapping[str, torch.Tensor | float], *,
             backward: bool = True) -> None:
        """Guard, backward, optimiser and scheduler step, log; checkpoint every ``save_every``.

        ``loss`` is what is back-propagated; ``terms`` (names = ``loss_names``) are logged.
        The guard sees the terms averaged over ranks, so every rank stops together.
        ``backward=False``: the caller accumulated the gradients itself (:meth:`zero_grad`,
        then ``backward()`` per sub-batch, as DeepLabV2's ITER_SIZE); ``loss`` is only logged
        and guarded, and a non-finite one still stops before the weights change.
        """
        if set(terms) != set(self.loss_names):
            raise ValueError(f"loss terms {sorted(terms)} differ from the declared {sorted(self.loss_names)}")
        step_number = self.global_step + 1
        values = [loss.detach().float().reshape(())]
        values += [(term.detach().float().reshape(()) if isinstance(term, torch.Tensor)
                    else torch.tensor(float(term), device=loss.device)) for term in
                   (terms[name] for name in self.loss_names)]
        averaged = all_reduce_tensor(torch.stack([value.to(loss.device) for value in values]), op="mean")
        numbers = dict(zip(("loss",) + self.loss_names, averaged.tolist()))
        check_finite(numbers, step_number, self.last_good())

        if backward:
            self.zero_grad()
            loss.backward()
        if self.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
        self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scheduler is not None:
            self.scheduler.step()
        self.global_step = step_number

        if self._csv is not None:
            self._csv.log({"step": step_number, "epoch": self.epoch_of_step(step_number), "lr": f"{lr:.6g}",
                           **{name: f"{value:.6g}" for name, value in numbers.items()}})
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix({name: f"{value:.4f}" for name, value in numbers.items()}, refresh=False)
        if self.save_every and step_number % self.save_every == 0:
            self.save_last()

    def epoch_of_step(self, step_number: int) -> int:
        """1-based epoch in which the 1-based step ``step_number`` ran."""
        return (step_number - 1) // self.steps_per_epoch + 1

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def build_trainer(model: nn.Module, num_samples: int, args: argparse.Namespace, dist: DistInfo,
                  loss_names: Sequence[str], *, max_step: int | None = None,
                  group_specs: Sequence[tuple[str, float, bool]] = GROUP_SPECS,
                  clip_grad_norm: float | None = None, optimizer: torch.optim.Optimizer | None = None,
                  poly_power: float | None = 0.9) -> tuple[Trainer, EpochBatchSampler]:
    """The set-up the three train scripts share, from their common flags.

    SGD over SEAM's four parameter groups with the poly schedule, DDP wrapping, the epoch
    sampler, the Trainer, the resolved configuration saved beside the checkpoints, and
    ``--resume``. ``max_step`` defaults to ``--max_epoches`` epochs; the poly lr is updated every
    ``args.lr_update_every`` steps (default 1). The (possibly DDP-wrapped)
    model is ``trainer.model``. A folder that already holds a run of this session is refused
    unless ``--resume`` or ``--overwrite`` says what to do with it (see :func:`check_new_run`).
    ``group_specs`` and ``clip_grad_norm``: a seed method's parameter groups and gradient
    clipping (network.methods). A method with another optimiser passes it as ``optimizer`` (MSA:
    Nesterov SGD; SpixelFCN: Adam); ``poly_power`` is the poly schedule's power (MSA: 0.5 / 0.9),
    None keeps the learning rate constant (SpixelFCN).
    """
    start_over = check_new_run(args)
    barrier()  # every rank has looked before rank 0 creates this run's files
    if optimizer is None:
        optimizer = make_sgd(parameter_groups(model, args.lr, args.wt_dec, group_specs), momentum=args.momentum)
    model = prepare_model(model, dist)
    sampler = EpochBatchSampler(num_samples, args.batch_size, seed=args.seed,
                                rank=dist.rank, world_size=dist.world_size)
    if max_step is None:
        max_step = sampler.batches_per_epoch * args.max_epoches
    scheduler = (PolyLR(optimizer, max_step, poly_power, update_every=getattr(args, "lr_update_every", 1))
                 if poly_power is not None else None)
    trainer = Trainer(model, optimizer, scheduler, dist, max_step=max_step,
                      steps_per_epoch=sampler.batches_per_epoch, loss_names=loss_names,
                      save_dir=args.save_dir, session_name=args.session_name,
                      save_every=args.save_every, args=args, amp=args.amp, start_over=start_over,
                      clip_grad_norm=clip_grad_norm)
    if dist.is_main:
        save_config(args, os.path.join(args.save_dir, f"{args.session_name}_config.json"), keep_previous=True)
    trainer.resume(args.resume)
    return trainer, sampler


def check_new_run(args: argparse.Namespace) -> bool:
    """Refuse to start a run over an earlier one of the same ``--session_name`` unless told.

    With ``--resume`` the earlier run is continued; with ``--overwrite`` it is replaced (its
    checkpoints as the new ones are written, its log at the first new checkpoint). Returns
    whether this run starts over an earlier one.
    """
    if args.resume is not None:
        return False
    last_path, final_path = checkpoint_paths(args.save_dir, args.session_name)
    csv_path = os.path.join(args.save_dir, f"{args.session_name}_log.csv")
    existing = [path for path in (final_path, last_path, csv_path) if os.path.isfile(path)]
    if existing and not getattr(args, "overwrite", False):
        raise DataError(f"{existing[0]}: {args.save_dir} already holds a run named '{args.session_name}'; "
                        f"continue it with --resume auto, start over with --overwrite, or choose another "
                        f"--session_name")
    return bool(existing)
