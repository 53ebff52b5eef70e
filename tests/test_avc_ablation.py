"""bench/avc_ablation.py without training: its commands parse with the stage scripts and carry
each configuration's weights, and its table aggregates mean, spread and gain over the seeds."""
from __future__ import annotations

import statistics

import pytest

import train_avc
from bench import avc_ablation
from network.methods import avc_loss_weights


@pytest.mark.parametrize("config, expected", [
    ("seam", {"avc": 0.0, "avc_cross": 1.0, "avc_sem": 1.0}),
    ("avc", {"avc": 1.0, "avc_cross": 1.0, "avc_sem": 1.0}),
    ("avc_cross", {"avc": 1.0, "avc_cross": 1.0, "avc_sem": 0.0}),
    ("avc_sem", {"avc": 1.0, "avc_cross": 0.0, "avc_sem": 1.0}),
])
def test_train_command_parses_with_the_profile_and_config(config, expected, tmp_path):
    argv = avc_ablation.train_command("ROOT", str(tmp_path), config, seed=2, max_epoches=7)
    assert argv[0] == "train_avc.py"
    args = train_avc.parse_args(argv[1:])
    weights = avc_loss_weights(args)
    assert {k: weights[k] for k in expected} == expected
    settings = avc_ablation.PROFILE["train_avc"]
    assert (args.seed, args.max_epoches, args.lr, args.crop_size) == (2, 7, settings["lr"], settings["crop_size"])
    assert args.view_scale == 0.5 and args.dropout is False  # the profile's flags


def test_datasets_differ_in_generator_seed_and_class_count():
    default, other = avc_ablation.DATASETS["default"], avc_ablation.DATASETS["d2"]
    assert default == avc_ablation.PROFILE["synthetic"]
    assert default["seed"] != other["seed"] and default["num_classes"] != other["num_classes"]


def test_table_mean_spread_and_gain():
    seeds = [0, 1, 2]
    values = {"seam": [30.0, 32.0, 34.0], "avc": [35.0, 36.0, 40.0]}
    results = {("d", c, s): {"miou": v, "threshold": 0.5} for c, vs in values.items() for s, v in zip(seeds, vs)}
    text = avc_ablation.table(results, ["d"], ["seam", "avc"], seeds, max_epoches=10)
    seam_row = next(line for line in text.splitlines() if line.startswith("| d | seam"))
    avc_row = next(line for line in text.splitlines() if line.startswith("| d | avc"))
    assert "| 32.0 | 2.0 | 30.0..34.0 |  |" in seam_row
    std = statistics.stdev(values["avc"])
    assert f"| 37.0 | {std:.1f} | 35.0..40.0 | +5.0 (+5.0 / +4.0 / +6.0) |" in avc_row
    # A missing run shows as '-' and leaves the statistics (and the paired gain).
    del results["d", "avc", 1]
    text = avc_ablation.table(results, ["d"], ["seam", "avc"], seeds, max_epoches=10)
    avc_row = next(line for line in text.splitlines() if line.startswith("| d | avc"))
    assert "| 35.0 / - / 40.0 | 37.5 |" in avc_row and "+5.5 (+5.0 / +6.0)" in avc_row
