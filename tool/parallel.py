"""Several images in flight: the per-image work of the inference scripts spread over the cores.

Used by infer_seed.py, test_deeplab.py, infer_aff.py and refine_mask.py; each script writes its
work for one image (read, forward, CRF, write) as a function of the image's index and hands it
to :func:`run_in_flight`, which yields the results in list order.

On CPU the work runs in worker processes, not threads: the forward releases the GIL but
pydensecrf's mean-field inference holds it, so in threads the CRF of one image stalls the
Python of every other image (measured: two CRFs in two threads take as long as in one). The
workers are forked once, after the model is built, so they share its weights copy-on-write
(nothing is pickled but image indices and small results, no interpreter starts on the critical
path), and each runs whole images with ``threads // workers`` torch threads: the CRF of one
image overlaps the forward of the next, and no image waits for a drain at the end. With one
worker the work runs in this process, in order: the sequential path, same outputs.

Batched (CUDA by default, ``--batch_images``): the images are decoded and resized ahead by a
DataLoader, consecutive images whose views have the same shapes share one forward, and the
per-image finish (CRF, writing) runs in the worker processes, off the device's critical path.

The cores come from ``os.sched_getaffinity`` (what this process may run on, not the machine's
count), divided among torchrun's local ranks; ``--threads`` (``tool.cli.add_parallel_args``) caps
them for a shared machine.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import multiprocessing
import os
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Hashable, Iterable, Iterator, Sequence, TypeVar

import torch
from torch.utils.data import DataLoader, Dataset

T = TypeVar("T")
R = TypeVar("R")

# Images per forward on CUDA when --batch_images is not given.
CUDA_BATCH_IMAGES = 8
# Workers beyond this share their cores as intra-op threads: every worker holds its own
# activations (a full-width ResNet38 at scale 2 needs ~1-2 GB), so memory grows with workers.
MAX_WORKERS = 8


def available_cores() -> int:
    """The cores this process may run on, shared among the torchrun ranks of this machine."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores // max(1, local_ranks))


@dataclasses.dataclass(frozen=True)
class WorkPlan:
    """``workers`` images in flight, each forward on ``threads_per_worker`` torch threads."""

    workers: int
    threads_per_worker: int

    @property
    def threads(self) -> int:
        return self.workers * self.threads_per_worker


def plan_workers(threads: int | None = None, num_items: int | None = None,
                 max_workers: int = MAX_WORKERS) -> WorkPlan:
    """One worker per core (one torch thread each: images are independent, so there is no
    intra-op synchronisation to pay), at most ``max_workers`` and at most one per item; the
    cores left over become intra-op threads. ``threads`` None: :func:`available_cores`."""
    threads = available_cores() if threads is None else threads
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    workers = min(threads, max_workers, num_items if num_items else threads)
    workers = max(1, workers)
    return WorkPlan(workers=workers, threads_per_worker=max(1, threads // workers))


def set_torch_threads(threads: int) -> None:
    """Intra-op threads for this process; inter-op too where torch still allows it (it can be set
    only before the first inter-op work, so a second call keeps the first value)."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:
        pass


def _start_worker(threads: int, work: Callable) -> None:
    global _WORK  # the forked worker's own copy; the parent never reads it
    set_torch_threads(threads)
    _WORK = work


_WORK: Callable | None = None


def _call_work(item):
    return _WORK(item)


def run_in_flight(work: Callable[[T], R], items: Iterable[T], plan: WorkPlan,
                  window: int | None = None) -> Iterator[R]:
    """``work(item)`` for every item, results in item order.

    ``plan.workers == 1``: in this process, one item after the other. Otherwise in
    ``plan.workers`` forked processes holding ``work`` (closures and models welcome: they are
    inherited, not pickled; items and results are pickled), with at most ``window`` items
    (default 2 per worker) submitted ahead of the one being yielded, so memory stays bounded.
    An exception raised by ``work`` is raised here as itself (a ``DataError`` stays the
    one-line ``DataError``) and the remaining items are cancelled.
    """
    if plan.workers <= 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(plan.threads_per_worker)
        try:
            for item in items:
                yield work(item)
        finally:
            torch.set_num_threads(threads)  # the caller's setting, as it was
        return
    window = window or 2 * plan.workers
    # Fork: the workers inherit the model and the work function; nothing is re-imported.
    context = multiprocessing.get_context("fork")
    pool = concurrent.futures.ProcessPoolExecutor(plan.workers, mp_context=context, initializer=_start_worker,
                                                  initargs=(plan.threads_per_worker, work))
    pending: collections.deque[concurrent.futures.Future] = collections.deque()
    try:
        # Fork now, before ``items`` is first pulled (it may start a DataLoader or CUDA).
        _result(pool.submit(int))
        for item in items:
            pending.append(pool.submit(_call_work, item))
            if len(pending) >= window:
                yield _result(pending.popleft())
        while pending:
            yield _result(pending.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _result(future: concurrent.futures.Future) -> R:
    try:
        return future.result()
    except BrokenProcessPool as error:
        raise RuntimeError("an inference worker process died (out of memory? try fewer --threads)") from error


def consecutive_groups(items: Iterable[T], key: Callable[[T], Hashable], size: int) -> Iterator[list[T]]:
    """Runs of consecutive items with equal ``key``, at most ``size`` each, in order."""
    group: list[T] = []
    for item in items:
        if group and (len(group) >= size or key(item) != key(group[0])):
            yield group
            group = []
        group.append(item)
    if group:
        yield group


def _single(batch: list[Any]) -> Any:
    return batch[0]


def run_images(dataset: Dataset, infer: Callable[[list[Any]], Sequence[Any]], finish: Callable[[Any, Any], R], *,
               device: torch.device, threads: int | None = None, batch_images: int | None = None,
               num_workers: int = 0, key: Callable[[Any], Hashable] | None = None,
               strip: Sequence[str] = ()) -> Iterator[R]:
    """``finish(item, output)`` for every dataset item, results in dataset order.

    ``infer(items)`` is the network part (one output per item), ``finish`` the rest (numpy: CRF,
    writing). In flight (CPU, ``batch_images`` 1): each worker process reads ``dataset[index]``,
    infers and finishes it. Batched (CUDA default, or ``batch_images`` > 1): a DataLoader with
    ``num_workers`` decodes ahead; runs of up to ``batch_images`` consecutive items with equal
    ``key(item)`` (the view shapes; None: never grouped) share one ``infer`` call in this process,
    and ``finish`` runs in the workers, its item without the ``strip`` entries (the views: not
    pickled back and forth for nothing).
    """
    batch = batch_images or (CUDA_BATCH_IMAGES if device.type == "cuda" else 1)
    if key is None:
        batch = 1
    plan = plan_workers(threads, len(dataset))  # type: ignore[arg-type]
    if batch == 1 and device.type == "cpu" and not batch_images:
        def work(index: int) -> R:
            item = dataset[index]
            return finish(item, infer([item])[0])
        return run_in_flight(work, range(len(dataset)), plan)  # type: ignore[arg-type]
    loader = DataLoader(dataset, batch_size=1, collate_fn=_single, num_workers=num_workers,
                        pin_memory=device.type == "cuda")

    def inferred() -> Iterator[tuple[Any, Any]]:
        for group in consecutive_groups(loader, key or id, batch):
            for item, output in zip(group, infer(group)):
                yield {name: value for name, value in item.items() if name not in strip}, output

    def finish_pair(pair: tuple[Any, Any]) -> R:
        return finish(*pair)
    return run_in_flight(finish_pair, inferred(), plan)
