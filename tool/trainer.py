"""The training loop shared by every train script.

* ``Trainer``: the loop body (backward, step, schedule, CSV log, tqdm, checkpoints);
  ``check_finite`` (tool.nan_guard) on every step.
* ``build_trainer``: the set-up every train script shares, from its flags;
  ``check_new_run``: refuses to overwrite a finished or different run.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
from typing import Any, ContextManager, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn
from tqdm import tqdm

from tool.checkpoint import checkpoint_paths, load_checkpoint, save_checkpoint
from tool.device import autocast_context, images_to_device, prepare_model, unwrap_model
from tool.distributed import DistInfo, all_reduce_tensor, barrier, broadcast_buffers_from_main
from tool.fileio import DataError
from tool.logs import CsvLogger, save_config
from tool.nan_guard import NonFiniteLossError, check_finite
from tool.optim import GROUP_SPECS, PolyLR, make_sgd, parameter_groups
from tool.sampler import EpochBatchSampler

logger = logging.getLogger(__name__)


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
