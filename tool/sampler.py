"""The order of the training batches.

``EpochBatchSampler`` + ``make_loader``: the same global batches for any worker or process
count, permuted from (seed, epoch), with mid-epoch resume.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from tool.fileio import DataError


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
