"""Run a training script under a real 2-process ``torchrun`` (gloo on CPU) and read each rank's weights."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_torchrun(target: Sequence[str], timeout: float = 120) -> None:
    """``python -m torch.distributed.run --nproc_per_node 2 <target>``; fails with the output's tail."""
    env = {key: value for key, value in os.environ.items() if key not in DISTRIBUTED_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *target]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def train_on_two_ranks(script: str, argv: Sequence[str], work_dir: Path) -> list[dict[str, torch.Tensor]]:
    """Run ``<script>.run(<script>.parse_args(argv))`` on 2 ranks; the returned model's state dict of each rank."""
    driver = work_dir / "driver.py"
    driver.write_text(
        f"import os, sys, torch\nimport {script}\n"
        f"model = {script}.run({script}.parse_args(sys.argv[1:]))\n"
        "torch.save(model.state_dict(), os.path.join(os.path.dirname(__file__), f\"rank{os.environ['RANK']}.pt\"))\n")
    run_torchrun([str(driver), *argv])
    return [torch.load(work_dir / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]


def assert_ranks_agree_with_checkpoint(ranks: list[dict[str, torch.Tensor]], checkpoint_path: Path,
                                       steps: int) -> None:
    """Both ranks end with identical weights (BatchNorm buffers included), and the final
    checkpoint, written by rank 0 after ``steps`` steps, holds them."""
    from tool.checkpoint import read_checkpoint

    rank0, rank1 = ranks
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    final = read_checkpoint(str(checkpoint_path))
    assert final["step"] == steps
    for key, value in final["model"].items():
        assert torch.equal(value, rank0[key]), key
