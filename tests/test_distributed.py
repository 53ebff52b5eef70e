"""A real 2-process torchrun run (gloo, CPU) of the toy training script."""
from __future__ import annotations

import os

import torch

from tests.helpers_torchrun import run_torchrun
from tool.checkpoint import read_checkpoint


def test_two_process_torchrun_keeps_ranks_identical(tmp_path):
    save_dir = str(tmp_path / "ddp")
    run_torchrun(["-m", "tests.helpers_toy_train", "--save_dir", save_dir, "--max_iters", "2",
                  "--batch_size", "4", "--num_samples", "8", "--dump_weights"], timeout=90)

    rank0 = torch.load(os.path.join(save_dir, "rank0.pt"), weights_only=True)
    rank1 = torch.load(os.path.join(save_dir, "rank1.pt"), weights_only=True)
    # DDP averages gradients, so every parameter is identical on both ranks. BatchNorm
    # running statistics are per rank (DDP re-broadcasts rank 0's before each forward);
    # the checkpoint holds rank 0's.
    from tests.helpers_toy_train import ToyNet
    parameter_names = [name for name, _ in ToyNet().named_parameters()]
    assert "bn.weight" in parameter_names and "head.bias" in parameter_names
    for key in parameter_names:
        assert torch.equal(rank0[key], rank1[key]), key
    final = read_checkpoint(os.path.join(save_dir, "toy.pth"))
    assert final["step"] == 2
    assert len(final["rng_by_rank"]) == 2  # both ranks' RNG states, for a bit-exact resume
    assert not torch.equal(final["rng_by_rank"][0]["torch"], final["rng_by_rank"][1]["torch"])
    for key, value in final["model"].items():
        assert torch.equal(value, rank0[key]), key
    # The weights moved away from their initialisation (the run really trained).
    torch.manual_seed(0)
    initial_head = ToyNet().state_dict()["head.weight"]
    assert not torch.equal(initial_head, rank0["head.weight"])
