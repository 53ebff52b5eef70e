"""Flags shared by several scripts, declared once.

Each ``add_*_args(parser, **defaults)`` takes the per-script defaults as arguments, so a
script states its defaults in one call and no flag is re-declared with drifting values.
``run_cli(main)`` runs a script's main and turns bad input into a one-line message.
"""
from __future__ import annotations

import argparse
import atexit
import errno
import logging
import os
import sys
from typing import Any, Callable, Sequence, TypeVar

from tool.fileio import DataError

PRECISIONS = ("auto", "fp32", "bf16")  # --precision of the inference scripts (tool.device.resolve_precision)

T = TypeVar("T")


def _checked_number(convert: Callable[[str], T], accept: Callable[[T], bool], expected: str,
                    name: str) -> Callable[[str], T]:
    """An argparse ``type``: ``convert`` the text, then reject values ``accept`` refuses."""
    def parse(text: str) -> T:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    parse.__name__ = parse.__qualname__ = name
    return parse


positive_int = _checked_number(int, lambda value: value > 0, "a positive integer", "positive_int")
non_negative_int = _checked_number(int, lambda value: value >= 0, "an integer >= 0", "non_negative_int")
positive_float = _checked_number(float, lambda value: value > 0, "a positive number", "positive_float")


def add_dataset_args(parser: argparse.ArgumentParser, names: Sequence[str], *, dataset: str = "voc12",
                     root: str | None = None) -> None:
    """``--dataset`` and ``--voc12_root`` (SEAM's name for the dataset root, any dataset).

    ``--data_root`` and ``--coco_root`` are aliases; the value lands in ``args.voc12_root``.
    ``names`` are the accepted datasets (``workflow.datasets.DATASET_NAMES`` for the scripts).
    """
    group = parser.add_argument_group("dataset")
    group.add_argument("--dataset", choices=tuple(names), default=dataset,
                       help=f"dataset layout (default {dataset})")
    group.add_argument("--voc12_root", "--data_root", "--coco_root", dest="voc12_root", default=root,
                       required=root is None, metavar="DIR",
                       help="dataset root folder (VOC2012, COCO 2014 or a synthetic set)")


def add_model_args(parser: argparse.ArgumentParser, *, width_mult: float = 1.0) -> None:
    """``--width_mult``: channel multiplier of the ResNet38 backbone (1.0 = the published net)."""
    parser.add_argument("--width_mult", type=positive_float, default=width_mult,
                        help=f"backbone channel multiplier for small CPU runs (default {width_mult})")


def add_inference_model_args(parser: argparse.ArgumentParser, precision: bool = True) -> None:
    """``--width_mult`` for inference (by default the width the checkpoint was trained with) and,
    with ``precision``, ``--precision`` (resolved by ``tool.device.resolve_precision``; the settings
    records hold the resolved value, so outputs of both precisions are never mixed)."""
    parser.add_argument("--width_mult", type=positive_float, default=None,
                        help="backbone width (default: the value saved in the checkpoint, else 1.0)")
    if not precision:
        return
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="network precision: auto = bf16 autocast on CUDA and on CPUs with native bf16 "
                             "(AVX512-BF16 / AMX), float32 elsewhere; fp32 = float32 everywhere")


def add_training_args(parser: argparse.ArgumentParser, *, batch_size: int, lr: float, wt_dec: float,
                      crop_size: int, session_name: str, max_epoches: int | None = None,
                      max_iters: int | None = None, momentum: float = 0.0, num_workers: int = 4,
                      seed: int = 0, weights: str | None = None, save_dir: str = "checkpoints",
                      save_every: int = 0) -> None:
    """Training flags; the script passes its own defaults (e.g. SEAM: batch 8, lr 0.01).

    ``--max_epoches`` is declared when ``max_epoches`` is given, ``--max_iters`` when
    ``max_iters`` is given (iteration-based DeepLab training).
    """
    if max_epoches is None and max_iters is None:
        raise ValueError("give a default for max_epoches or max_iters")
    group = parser.add_argument_group("training")
    group.add_argument("--batch_size", type=positive_int, default=batch_size,
                       help=f"global batch size, split over torchrun processes (default {batch_size})")
    if max_epoches is not None:
        group.add_argument("--max_epoches", type=positive_int, default=max_epoches,
                           help=f"training epochs (default {max_epoches})")
    if max_iters is not None:
        group.add_argument("--max_iters", type=positive_int, default=max_iters,
                           help=f"training iterations (default {max_iters})")
    group.add_argument("--lr", type=positive_float, default=lr, help=f"base learning rate (default {lr})")
    group.add_argument("--wt_dec", type=float, default=wt_dec, help=f"weight decay (default {wt_dec})")
    group.add_argument("--momentum", type=float, default=momentum, help=f"SGD momentum (default {momentum})")
    group.add_argument("--crop_size", type=positive_int, default=crop_size,
                       help=f"training crop size (default {crop_size})")
    group.add_argument("--weights", default=weights, metavar="PATH",
                       help="initial weights: ImageNet .params/.pth backbone or a trained .pth")
    group.add_argument("--session_name", default=session_name,
                       help=f"name of the checkpoint, log and config files (default {session_name})")
    group.add_argument("--save_dir", default=save_dir, metavar="DIR",
                       help=f"folder for checkpoints, CSV log and config (default {save_dir})")
    group.add_argument("--save_every", type=non_negative_int, default=save_every,
                       help="also checkpoint every N steps (0: only after each epoch)")
    group.add_argument("--resume", default=None, metavar="PATH",
                       help="checkpoint to resume from; 'auto' = <save_dir>/<session>_last.pth if present")
    add_overwrite_arg(group, "start over when <save_dir> already holds a run of this --session_name "
                             "(its log is replaced once the first new checkpoint is written)")
    group.add_argument("--num_workers", type=non_negative_int, default=num_workers,
                       help=f"data loader workers per process (default {num_workers})")
    group.add_argument("--seed", type=int, default=seed, help=f"random seed (default {seed})")
    group.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                       help="bf16 autocast on CUDA (ignored on CPU)")


def add_overwrite_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                      help: str = "recompute every listed image even if its outputs exist with other "
                                  "settings (they are removed first)") -> None:
    """``--overwrite``: redo what a rerun would otherwise refuse to mix with earlier outputs."""
    parser.add_argument("--overwrite", action="store_true", help=help)


def add_parallel_args(parser: argparse.ArgumentParser, *, batching: bool = True) -> None:
    """``--threads`` (and with ``batching``, ``--batch_images``) of the inference scripts (``tool.parallel``)."""
    group = parser.add_argument_group("parallelism")
    group.add_argument("--threads", type=positive_int, default=None,
                       help="CPU cores to use (default: all this process may run on, os.sched_getaffinity); "
                            "on CPU, one image in flight per core")
    if batching:
        group.add_argument("--batch_images", type=positive_int, default=None,
                           help="images batched into one forward where their view shapes agree, the CRF "
                                "and writing in --threads background processes (default: 8 on CUDA; "
                                "on CPU 1, i.e. images in flight instead)")


def parse_shard(text: str) -> tuple[int, int]:
    """``'K/N'`` (1-based K of N) -> (K - 1, N); anything else raises ArgumentTypeError."""
    parts = text.split("/")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"shard must look like K/N (e.g. 1/4), got {text!r}")
    try:
        index, count = int(parts[0]), int(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"shard K/N needs two integers, got {text!r}") from None
    if count < 1 or not 1 <= index <= count:
        raise argparse.ArgumentTypeError(f"shard {text!r}: need 1 <= K <= N")
    return index - 1, count


def add_shard_args(parser: argparse.ArgumentParser) -> None:
    """``--shard K/N``: process only the K-th of N parts of the image list."""
    parser.add_argument("--shard", type=parse_shard, default=None, metavar="K/N",
                        help="process the K-th of N interleaved parts of the list (1-based), "
                             "e.g. one per machine; combined with torchrun ranks")


def shard_list(ids: Sequence[T], shard: tuple[int, int] | None, dist: Any = None) -> list[T]:
    """This process's part of ``ids``: shard K of N, then rank r of the torchrun world.

    Parts are interleaved (``ids[i::n]``) so every part gets a similar mix of images;
    the union over all (shard, rank) is ``ids`` exactly once.
    """
    index, count = shard if shard is not None else (0, 1)
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard index {index} outside 0..{count - 1}")
    rank = getattr(dist, "rank", 0) if dist is not None else 0
    world_size = getattr(dist, "world_size", 1) if dist is not None else 1
    return list(ids[index * world_size + rank::count * world_size])


EXIT_BAD_INPUT = 2
EXIT_NON_FINITE_LOSS = 3


def describe_os_error(error: OSError) -> str:
    """One line naming the path and what the filesystem said (read-only, full, a file in the way)."""
    path = error.filename
    reason = error.strerror or str(error)
    if path is None and "\n" in reason.strip():  # re-raised from a DataLoader worker: its last line
        reason = reason.strip().splitlines()[-1]
    if error.errno in (errno.EEXIST, errno.ENOTDIR):
        reason += " (a file is where a folder is needed)"
    if path is None:
        return reason
    return f"{path}: {reason}" + (f" -> {error.filename2}" if error.filename2 else "")


def main_exit_code(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)`` and return its exit code: bad input (DataError) and filesystem errors
    (OSError: read-only, full disk, a file where a folder should be) print one line and give 2,
    a NaN/inf loss or non-finite weights give 3, anything else ``main`` returned (0 for None)."""
    try:
        result = main(argv)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as error:
        print(f"error: {describe_os_error(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RuntimeError as error:
        from tool.nan_guard import NonFiniteLossError  # imported late: not every script needs torch
        if not isinstance(error, NonFiniteLossError):
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_NON_FINITE_LOSS
    return result if isinstance(result, int) else 0


def run_cli(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> None:
    """A script's entry point: exit with ``main_exit_code(main, argv)``.

    From the command line (``argv`` None) the process ends without the interpreter's teardown:
    after a torch script it spends 0.6-0.9 s freeing objects one by one that the OS frees at
    once (measured: ``python -c "import torch"`` 3.5 s, 2.8 s this way). Every output is written
    and closed before ``main`` returns; the exit handlers still run (logging's flush and close,
    multiprocessing's and concurrent.futures' joins) and the standard streams are flushed.
    With ``argv`` given (a test, a caller in the same process) it raises ``SystemExit`` as usual.
    """
    code = main_exit_code(main, argv)
    if argv is not None:
        sys.exit(code)
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing left to write to
            pass
    os._exit(code)
