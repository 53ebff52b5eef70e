"""One code path for 1 or N training processes (``torchrun``), on CPU or CUDA.

``setup_distributed`` reads the variables that ``torchrun`` sets (RANK, WORLD_SIZE,
LOCAL_RANK). Without them it returns a single-process ``DistInfo`` and creates no
process group; every helper below is then a no-op, so a script never branches on
whether it runs distributed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the run and which device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as error:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from error


def setup_distributed(use_cuda: bool | None = None) -> DistInfo:
    """Join the process group that torchrun describes (nccl on CUDA, gloo on CPU).

    ``use_cuda`` None means "CUDA when available". A single process (no torchrun, or
    WORLD_SIZE=1) gets no process group.
    """
    if use_cuda is None:
        use_cuda = torch.cuda.is_available()
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside 0..WORLD_SIZE-1 (WORLD_SIZE={world_size})")
    if use_cuda:
        device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch_dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                    is_main=rank == 0)


def is_distributed() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def get_rank() -> int:
    return torch_dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return torch_dist.get_world_size() if is_distributed() else 1


def cleanup() -> None:
    """Leave the process group (safe to call when none exists)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        torch_dist.barrier()


def _collective_device() -> torch.device:
    # nccl only reduces CUDA tensors; gloo reduces CPU tensors.
    if is_distributed() and torch_dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_tensor(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (``op='sum'``), average (``'mean'``) or take the max (``'max'``) over ranks.

    Returns a new tensor on the input's device; the input is not modified.
    """
    if op not in ("sum", "mean", "max"):
        raise ValueError(f"op must be 'sum', 'mean' or 'max', got {op!r}")
    if not is_distributed():
        return tensor.clone()
    work = tensor.detach().to(_collective_device(), copy=True)
    torch_dist.all_reduce(work, op=torch_dist.ReduceOp.MAX if op == "max" else torch_dist.ReduceOp.SUM)
    if op == "mean":
        work = work / get_world_size()
    return work.to(tensor.device)


def all_reduce_confusion(confusion: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Sum a confusion matrix (counts) over ranks, in int64 so no count is rounded."""
    if isinstance(confusion, np.ndarray):
        summed = all_reduce_tensor(torch.from_numpy(np.ascontiguousarray(confusion, dtype=np.int64)))
        return summed.numpy().astype(confusion.dtype, copy=False)
    return all_reduce_tensor(confusion.to(torch.int64)).to(confusion.dtype)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    torch_dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_buffers_from_main(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics).

    DDP broadcasts them at the start of each forward, so rank 0's are the ones in effect
    and in the checkpoint; after the last forward the ranks' copies differ until this call.
    """
    if not is_distributed():
        return
    for buffer in module.buffers():
        torch_dist.broadcast(buffer, src=0)
