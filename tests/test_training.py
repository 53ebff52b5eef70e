"""Tests of tool/trainer, optim, sampler, checkpoint, cli and logs (single process, CPU)."""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from tests import helpers_toy_train
from tool.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from tool.cli import (add_dataset_args, add_model_args, add_shard_args, add_training_args, parse_shard,
                      run_cli, shard_list)
from tool.device import seed_everything
from tool.distributed import DistInfo, all_reduce_confusion, all_reduce_tensor, setup_distributed
from tool.fileio import DataError
from tool.logs import CsvLogger, save_config
from tool.nan_guard import NonFiniteLossError, check_finite
from tool.optim import PolyLR, make_sgd, parameter_groups, poly_factor
from tool.sampler import EpochBatchSampler
from tool.trainer import Trainer
from workflow.datasets import DATASET_NAMES


class ToyWithNewLayers(nn.Module):
    new_layers = ("fc8", "f9")

    def __init__(self) -> None:
        super().__init__()
        self.conv1a = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.b2 = nn.Conv2d(4, 4, 1, bias=True)
        self.frozen = nn.Conv2d(4, 4, 1, bias=True)
        self.fc8 = nn.Conv2d(4, 5, 1, bias=False)
        self.f9 = nn.Conv2d(5, 5, 1, bias=True)
        self.f9_bn = nn.BatchNorm2d(5)  # shares the prefix "f9" textually but is not a new layer
        for parameter in self.frozen.parameters():
            parameter.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b2(self.bn(self.conv1a(x)))
        return self.f9_bn(self.f9(self.fc8(self.frozen(x))))


# --------------------------------------------------------------------------- parameter groups
def test_parameter_groups_split_and_multipliers():
    model = ToyWithNewLayers()
    groups = parameter_groups(model, lr=0.01, weight_decay=5e-4)
    by_name = {group["name"]: group for group in groups}
    ids = {name: {id(p) for p in group["params"]} for name, group in by_name.items()}
    assert ids["backbone_weight"] == {id(model.conv1a.weight), id(model.bn.weight), id(model.b2.weight),
                                      id(model.f9_bn.weight)}
    assert ids["backbone_bias"] == {id(model.bn.bias), id(model.b2.bias), id(model.f9_bn.bias)}
    assert ids["new_weight"] == {id(model.fc8.weight), id(model.f9.weight)}
    assert ids["new_bias"] == {id(model.f9.bias)}
    assert [g["lr_mult"] for g in groups] == [1.0, 2.0, 10.0, 20.0]
    assert [g["lr"] for g in groups] == pytest.approx([0.01, 0.02, 0.1, 0.2])
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0, 5e-4, 0.0]
    frozen = {id(p) for p in model.frozen.parameters()}
    assert not frozen & set().union(*ids.values())


def test_parameter_groups_reject_bad_declarations():
    class NoDeclaration(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 1)

    class Typo(NoDeclaration):
        new_layers = ("fc8",)

    with pytest.raises(TypeError, match="new_layers"):
        parameter_groups(NoDeclaration(), 0.1, 0.0)
    with pytest.raises(ValueError, match="fc8"):
        parameter_groups(Typo(), 0.1, 0.0)


# --------------------------------------------------------------------------- poly schedule
def test_poly_factor_hand_values():
    assert poly_factor(0, 100) == 1.0
    assert poly_factor(50, 100) == pytest.approx(0.5 ** 0.9)
    assert poly_factor(99, 100) == pytest.approx(0.01 ** 0.9)
    assert poly_factor(500, 100) == poly_factor(99, 100)  # SEAM stops updating after max_step


def test_poly_lr_scheduler_per_group():
    model = ToyWithNewLayers()
    optimizer = make_sgd(parameter_groups(model, lr=0.1, weight_decay=0.0))
    scheduler = PolyLR(optimizer, max_step=10)
    seen = []
    for _ in range(3):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    # 0.1 * mult * (1 - t/10)^0.9, computed by hand: 0.9^0.9 = 0.909532576, 0.8^0.9 = 0.818052146
    assert seen[0] == pytest.approx([0.1, 0.2, 1.0, 2.0])
    assert seen[1] == pytest.approx([0.0909532576, 0.1819065152, 0.909532576, 1.819065152])
    assert seen[2] == pytest.approx([0.0818052146, 0.1636104292, 0.818052146, 1.636104292])


def test_make_sgd_momentum_and_empty_groups():
    model = ToyWithNewLayers()
    optimizer = make_sgd(parameter_groups(model, lr=0.1, weight_decay=0.0), momentum=0.9)
    assert all(group["momentum"] == 0.9 for group in optimizer.param_groups)
    assert len(optimizer.param_groups) == 4
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        make_sgd(parameter_groups(model, lr=0.1, weight_decay=0.0))


# --------------------------------------------------------------------------- NaN guard
def test_check_finite_names_step_and_terms():
    check_finite({"a": torch.tensor(1.0), "b": 2.0}, step=3)
    with pytest.raises(NonFiniteLossError, match=r"step 7: .*er=nan.*avc=inf"):
        check_finite({"cls": torch.tensor(0.5), "er": torch.tensor(float("nan")), "avc": float("inf")}, step=7)


# --------------------------------------------------------------------------- sampler
def test_epoch_batch_sampler_determinism_sharding_and_skip():
    sampler = EpochBatchSampler(11, batch_size=4, seed=3)
    assert sampler.batches_per_epoch == 2
    epoch0 = list(sampler)
    assert len(epoch0) == 2 and all(len(batch) == 4 for batch in epoch0)
    assert len(set(sum(epoch0, []))) == 8  # no index twice; 3 dropped
    assert list(EpochBatchSampler(11, batch_size=4, seed=3)) == epoch0
    sampler.set_epoch(1)
    assert list(sampler) != epoch0
    sampler.set_epoch(0, skip_batches=1)
    assert list(sampler) == epoch0[1:] and len(sampler) == 1
    ranks = [EpochBatchSampler(11, batch_size=4, seed=3, rank=r, world_size=2) for r in range(2)]
    for step, batch in enumerate(epoch0):
        assert list(ranks[0])[step] + list(ranks[1])[step] == batch
    with pytest.raises(ValueError, match="multiple"):
        EpochBatchSampler(11, batch_size=3, seed=0, world_size=2)
    with pytest.raises(DataError, match="fewer than one batch"):
        EpochBatchSampler(3, batch_size=4, seed=0)


# --------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip(tmp_path):
    seed_everything(0)
    model = ToyWithNewLayers()
    optimizer = make_sgd(parameter_groups(model, 0.1, 5e-4), momentum=0.9)
    scheduler = PolyLR(optimizer, max_step=10)
    model(torch.randn(1, 3, 5, 5)).sum().backward()
    optimizer.step()
    scheduler.step()
    path = str(tmp_path / "ckpt.pth")
    save_checkpoint(path, model, optimizer, step=1, epoch=0, args=argparse.Namespace(lr=0.1, name="x"),
                    extra={"note": "hi"}, scheduler=scheduler)
    expected_random = torch.rand(3)
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp")]

    seed_everything(99)
    restored = ToyWithNewLayers()
    restored_opt = make_sgd(parameter_groups(restored, 0.1, 5e-4), momentum=0.9)
    restored_sched = PolyLR(restored_opt, max_step=10)
    state = load_checkpoint(path, restored, restored_opt, scheduler=restored_sched)
    assert state["step"] == 1 and state["args"] == {"lr": 0.1, "name": "x"} and state["extra"] == {"note": "hi"}
    for key, value in model.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key
    assert restored_opt.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"] < 0.1
    momentum_a = optimizer.state[model.fc8.weight]["momentum_buffer"]
    momentum_b = restored_opt.state[restored.fc8.weight]["momentum_buffer"]
    assert torch.equal(momentum_a, momentum_b)
    assert torch.equal(torch.rand(3), expected_random)  # RNG restored to the save point


def test_load_checkpoint_errors(tmp_path):
    model = ToyWithNewLayers()
    with pytest.raises(DataError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.pth"), model)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="cannot read"):
        read_checkpoint(str(bad))
    other = tmp_path / "other.pth"
    save_checkpoint(str(other), nn.Linear(2, 2), None, step=0, epoch=0)
    with pytest.raises(DataError, match="does not match ToyWithNewLayers; missing keys"):
        load_checkpoint(str(other), model)


# --------------------------------------------------------------------------- resume equality
def _weights(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_resume_is_bitwise_identical(tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    helpers_toy_train.main(["--save_dir", straight, "--max_iters", "4"])
    helpers_toy_train.main(["--save_dir", resumed, "--max_iters", "4", "--stop_after", "2"])
    assert read_checkpoint(os.path.join(resumed, "toy_last.pth"))["step"] == 2
    assert not os.path.exists(os.path.join(resumed, "toy.pth"))
    helpers_toy_train.main(["--save_dir", resumed, "--max_iters", "4", "--resume", "auto"])

    weights_a = _weights(os.path.join(straight, "toy.pth"))
    weights_b = _weights(os.path.join(resumed, "toy.pth"))
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key
    # The 4 steps cross an epoch boundary (3 batches per epoch) and the CSV has each step once.
    rows_a = CsvLogger(os.path.join(straight, "toy_log.csv"), ["step", "epoch", "lr", "loss", "ce", "l2"]).read_rows()
    rows_b = CsvLogger(os.path.join(resumed, "toy_log.csv"), ["step", "epoch", "lr", "loss", "ce", "l2"]).read_rows()
    assert [row["step"] for row in rows_b] == ["1", "2", "3", "4"]
    assert rows_a == rows_b
    assert [row["epoch"] for row in rows_a] == ["1", "1", "1", "2"]
    # Without a restored RNG the run differs: the test can detect a broken resume.
    fresh = str(tmp_path / "fresh_seed")
    helpers_toy_train.main(["--save_dir", fresh, "--max_iters", "4", "--seed", "1"])
    assert not torch.equal(_weights(os.path.join(fresh, "toy.pth"))["head.weight"], weights_a["head.weight"])


def test_nan_guard_stops_and_keeps_last_checkpoint(tmp_path):
    save_dir = str(tmp_path / "nan")
    with pytest.raises(NonFiniteLossError, match=r"step 3: .*\bce=nan"):
        helpers_toy_train.main(["--save_dir", save_dir, "--max_iters", "4", "--nan_at_step", "3"])
    last = read_checkpoint(os.path.join(save_dir, "toy_last.pth"))
    assert last["step"] == 2
    assert all(torch.isfinite(value).all() for value in last["model"].values() if value.is_floating_point())
    assert not os.path.exists(os.path.join(save_dir, "toy.pth"))
    # The command line turns it into exit status 3 with the message.
    with pytest.raises(SystemExit) as exit_info:
        run_cli(helpers_toy_train.main, ["--save_dir", str(tmp_path / "nan2"), "--nan_at_step", "1"])
    assert exit_info.value.code == 3


def test_trainer_rejects_undeclared_terms(tmp_path):
    model = ToyWithNewLayers()
    optimizer = make_sgd(parameter_groups(model, 0.1, 0.0))
    dist = setup_distributed(use_cuda=False)
    trainer = Trainer(model, optimizer, None, dist, max_step=2, steps_per_epoch=1, loss_names=("a",),
                      save_dir=str(tmp_path), session_name="t")
    loss = model(torch.randn(1, 3, 5, 5)).sum()
    with pytest.raises(ValueError, match="differ"):
        trainer.step(loss, {"b": loss})
    with pytest.raises(ValueError, match="clash"):
        Trainer(model, optimizer, None, dist, max_step=2, steps_per_epoch=1, loss_names=("lr",),
                save_dir=str(tmp_path), session_name="t2")


# --------------------------------------------------------------------------- distributed (1 process)
def test_single_process_distributed_helpers():
    dist = setup_distributed(use_cuda=False)
    assert dist == DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)
    confusion = np.arange(4, dtype=np.int64).reshape(2, 2)
    assert np.array_equal(all_reduce_confusion(confusion), confusion)
    assert torch.equal(all_reduce_tensor(torch.ones(2), op="mean"), torch.ones(2))


# --------------------------------------------------------------------------- cli
def test_parse_shard_values_and_errors():
    assert parse_shard("1/4") == (0, 4)
    assert parse_shard("4/4") == (3, 4)
    for bad in ("0/4", "5/4", "1/0", "a/b", "1-4", "1/2/3", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_shard(bad)
    parser = argparse.ArgumentParser()
    add_shard_args(parser)
    assert parser.parse_args(["--shard", "2/3"]).shard == (1, 3)
    with pytest.raises(SystemExit):
        parser.parse_args(["--shard", "3/2"])


def test_shard_list_partitions_ids():
    ids = [f"id{i}" for i in range(10)]
    assert shard_list(ids, None) == ids
    parts = [shard_list(ids, (k, 2), DistInfo(r, 2, r, torch.device("cpu"), r == 0))
             for k in range(2) for r in range(2)]
    assert sorted(sum(parts, [])) == sorted(ids)
    assert parts[0] == ["id0", "id4", "id8"] and parts[1] == ["id1", "id5", "id9"]
    assert parts[2] == ["id2", "id6"]


def test_shared_flags_and_defaults():
    parser = argparse.ArgumentParser()
    add_dataset_args(parser, DATASET_NAMES)
    add_model_args(parser, width_mult=0.25)
    add_training_args(parser, batch_size=8, max_epoches=8, lr=0.01, wt_dec=5e-4, crop_size=448,
                      session_name="avc")
    args = parser.parse_args(["--coco_root", "/data/coco", "--dataset", "coco14", "--no-amp"])
    assert args.voc12_root == "/data/coco" and args.dataset == "coco14"
    assert (args.batch_size, args.max_epoches, args.lr, args.crop_size, args.width_mult) == (8, 8, 0.01, 448, 0.25)
    assert args.amp is False and args.resume is None and not hasattr(args, "max_iters")
    with pytest.raises(SystemExit):
        parser.parse_args(["--voc12_root", "x", "--batch_size", "0"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--voc12_root", "x", "--dataset", "imagenet"])
    with pytest.raises(SystemExit):
        parser.parse_args([])  # the dataset root is required when no default is given


def test_run_cli_turns_data_error_into_exit_2(capsys):
    def failing_main(argv):
        raise DataError("/data/x.png: label file does not exist")

    with pytest.raises(SystemExit) as exit_info:
        run_cli(failing_main, [])
    assert exit_info.value.code == 2
    assert "x.png: label file does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------- logs
def test_csv_logger_appends_and_checks_header(tmp_path):
    path = str(tmp_path / "log.csv")
    CsvLogger(path, ["step", "loss"]).log({"step": 1, "loss": 0.5})
    logger = CsvLogger(path, ["step", "loss"])
    logger.log({"step": 2, "loss": 0.25})
    logger.log({"step": 3, "loss": 0.125})
    assert [row["step"] for row in logger.read_rows()] == ["1", "2", "3"]
    assert logger.drop_rows_after("step", 2) == 1
    assert [row["loss"] for row in logger.read_rows()] == ["0.5", "0.25"]
    with pytest.raises(DataError, match="columns"):
        CsvLogger(path, ["step", "other"])


def test_save_config_writes_json(tmp_path):
    path = str(tmp_path / "sub" / "config.json")
    save_config(argparse.Namespace(lr=0.01, shard=(0, 2), amp=True, weights=None), path)
    with open(path, encoding="utf-8") as handle:
        assert json.load(handle) == {"lr": 0.01, "shard": [0, 2], "amp": True, "weights": None}
