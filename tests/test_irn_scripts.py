"""make_ir_labels.py, train_irn.py and make_seg_labels.py on a 4-image synthetic set: IR labels,
learning records, the displacement mean, bit-exact resume, masks, skip-existing, bad input."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

import make_ir_labels
import make_seg_labels
import train_irn
from tests.helpers_resume import assert_resume_is_bit_exact, log_rows
from tests.helpers_torchrun import assert_ranks_agree_with_checkpoint, train_on_two_ranks
from tool.checkpoint import read_checkpoint
from tool.cli import main_exit_code
from tool.fileio import DataError, atomic_write_text, read_label_png, save_npy, save_rgb_image

HEIGHT, WIDTH = 76, 84
IDS = [f"img{i}" for i in range(4)]
COLOURS = np.asarray([(40, 60, 200), (210, 40, 40), (40, 200, 60)], np.float64)
TINY = ["--width_mult", "0.0625", "--num_workers", "0", "--crop_size", "80"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    base = str(tmp_path_factory.mktemp("irn_data"))
    root = os.path.join(base, "root")
    atomic_write_text(os.path.join(root, "class_names.txt"), "background\nred\ngreen\n")
    rng = np.random.default_rng(0)
    for image_id in IDS:
        label = np.zeros((HEIGHT, WIDTH), np.uint8)
        for class_id, left in ((1, 6), (2, 46)):
            top = int(rng.integers(6, 30))
            label[top:top + 30, left:left + 30] = class_id
        image = np.clip(COLOURS[label] + rng.normal(0, 10, label.shape + (3,)), 0, 255).astype(np.uint8)
        save_rgb_image(os.path.join(root, "JPEGImages", f"{image_id}.jpg"), image, quality=100)
        cams = {c - 1: np.clip((label == c) * 0.8 + rng.uniform(0, 0.04, label.shape), 0, 1).astype(np.float32)
                for c in (1, 2)}
        save_npy(os.path.join(base, "cam", f"{image_id}.npy"), cams)
        np.save(os.path.join(base, f"gt_{image_id}.npy"), label)
    atomic_write_text(os.path.join(base, "train.txt"), "\n".join(IDS) + "\n")
    return {"base": base, "root": root, "cam": os.path.join(base, "cam"), "list": os.path.join(base, "train.txt"),
            "ir": os.path.join(base, "ir_label")}


@pytest.fixture(scope="module")
def ir_labels(data) -> str:
    argv = ["--dataset", "synthetic", "--voc12_root", data["root"], "--infer_list", data["list"],
            "--cam_dir", data["cam"], "--out_ir_label", data["ir"]]
    assert make_ir_labels.run(make_ir_labels.parse_args(argv)) == len(IDS)
    assert make_ir_labels.run(make_ir_labels.parse_args(argv)) == 0   # all done: skipped
    with pytest.raises(DataError, match="other settings"):  # labels of another variant are not mixed in
        make_ir_labels.run(make_ir_labels.parse_args(argv + ["--variant", "sipe"]))
    return data["ir"]


def _train_argv(data, save_dir: str, session: str, *extra: str) -> list[str]:
    return ["--dataset", "synthetic", "--voc12_root", data["root"], "--train_list", data["list"],
            "--mean_list", data["list"], "--ir_label_dir", data["ir"], "--save_dir", save_dir,
            "--session_name", session, *TINY, *extra]


def test_ir_labels_are_confident_inside_objects(data, ir_labels):
    for image_id in IDS:
        with Image.open(os.path.join(ir_labels, f"{image_id}.png")) as picture:
            assert picture.mode == "P" and picture.size == (WIDTH, HEIGHT)
        label = read_label_png(os.path.join(ir_labels, f"{image_id}.png"))
        gt = np.load(os.path.join(data["base"], f"gt_{image_id}.npy"))
        assert set(np.unique(label)) <= {0, 1, 2, 255}
        known = label != 255
        assert known.mean() > 0.5 and (label[known] == gt[known]).mean() > 0.95


@pytest.fixture(scope="module")
def trained(data, ir_labels, tmp_path_factory) -> dict[str, str]:
    save_dir = str(tmp_path_factory.mktemp("irn_run"))
    train_irn.run(train_irn.parse_args(_train_argv(data, save_dir, "irn", "--batch_size", "2",
                                                   "--max_epoches", "4")))
    return {"save_dir": save_dir, "weights": os.path.join(save_dir, "irn.pth")}


def test_training_records_and_mean_shift(trained):
    rows = log_rows(trained["save_dir"], "irn")
    assert len(rows) == 8 and set(rows[0]) >= {"step", "lr", "loss", "pos_aff", "neg_aff", "dp_fg", "dp_bg"}
    for row in rows:
        terms = [float(row[name]) for name in ("pos_aff", "neg_aff", "dp_fg", "dp_bg")]
        assert float(row["loss"]) == pytest.approx((terms[0] + terms[1]) / 2 + (terms[2] + terms[3]) / 2, rel=1e-4)
    losses = [float(row["loss"]) for row in rows]
    assert np.mean(losses[-2:]) < np.mean(losses[:2])
    assert float(rows[0]["lr"]) == pytest.approx(0.1) and float(rows[1]["lr"]) == pytest.approx(0.1 * (7 / 8) ** 0.9)
    final = read_checkpoint(trained["weights"])
    assert final["step"] == 8 and final["args"]["momentum"] == 1e-4
    mean = final["model"]["mean_shift.running_mean"]
    assert torch.count_nonzero(mean) == 2 and torch.equal(mean, final["model"]["fc_dp7.4.running_mean"])


def test_resume_continues_bit_exactly(data, ir_labels, tmp_path, monkeypatch):
    # Batch 2: 2 steps per epoch, so the crash after step 1 is mid-epoch and the resume skips a batch.
    schedule = ("--batch_size", "2", "--max_epoches", "1", "--save_every", "1")
    assert_resume_is_bit_exact(
        lambda argv: train_irn.run(train_irn.parse_args(argv)),
        _train_argv(data, str(tmp_path), "straight", *schedule), _train_argv(data, str(tmp_path), "run", *schedule),
        str(tmp_path), "run", crash_after=1, monkeypatch=monkeypatch,
        records=lambda session: log_rows(str(tmp_path), session))


def test_masks_written_and_skipped(data, trained, tmp_path):
    out = str(tmp_path / "masks")
    argv = ["--dataset", "synthetic", "--voc12_root", data["root"], "--weights", trained["weights"],
            "--infer_list", data["list"], "--cam_dir", data["cam"], "--out_dir", out, "--num_workers", "0",
            "--crop_size", "96", "--shard", "1/2"]
    assert make_seg_labels.run(make_seg_labels.parse_args(argv)) == 2
    assert sorted(os.listdir(out)) == ["img0.png", "img2.png", "make_seg_labels.log", "make_seg_labels_config.json",
                                       "make_seg_labels_settings.json"]
    argv[-1] = "2/2"
    assert make_seg_labels.run(make_seg_labels.parse_args(argv)) == 2
    assert make_seg_labels.run(make_seg_labels.parse_args(argv)) == 0
    with pytest.raises(DataError, match="other settings"):  # the settings record refuses a mix
        make_seg_labels.run(make_seg_labels.parse_args(argv + ["--beta", "8"]))
    for image_id in IDS:
        label = read_label_png(os.path.join(out, f"{image_id}.png"))
        assert label.shape == (HEIGHT, WIDTH) and set(np.unique(label)) <= {0, 1, 2}


def test_bad_input_exits_2(data, ir_labels, tmp_path, capsys):
    atomic_write_text(str(tmp_path / "list.txt"), "img0\nghost\n")
    argv = _train_argv(data, str(tmp_path), "bad", "--train_list", str(tmp_path / "list.txt"))
    assert main_exit_code(train_irn.main, argv) == 2
    assert "ghost" in capsys.readouterr().err
    save_npy(str(tmp_path / "cam" / "img0.npy"), {0: np.zeros((HEIGHT, WIDTH - 1), np.float32)})
    argv = ["--dataset", "synthetic", "--voc12_root", data["root"], "--infer_list", data["list"],
            "--cam_dir", str(tmp_path / "cam"), "--out_ir_label", str(tmp_path / "ir")]
    assert main_exit_code(make_ir_labels.main, argv) == 2
    assert "CAM dicts" in capsys.readouterr().err   # img1..img3 missing, before any work
    for image_id in IDS[1:]:
        save_npy(str(tmp_path / "cam" / f"{image_id}.npy"), {0: np.zeros((HEIGHT, WIDTH), np.float32)})
    with pytest.raises(DataError, match="do not match"):
        make_ir_labels.run(make_ir_labels.parse_args(argv))
    with pytest.raises(SystemExit):
        train_irn.parse_args(_train_argv(data, str(tmp_path), "small", "--crop_size", "72"))


def test_two_process_torchrun_keeps_identical_weights(data, ir_labels, tmp_path):
    """DDP training and the displacement-mean pass split over 2 ranks (one batch each)."""
    ranks = train_on_two_ranks("train_irn", _train_argv(data, str(tmp_path / "ddp"), "ddp", "--batch_size", "2",
                                                        "--max_epoches", "1"), tmp_path)
    assert_ranks_agree_with_checkpoint(ranks, tmp_path / "ddp" / "ddp.pth", steps=2)
    assert torch.count_nonzero(ranks[0]["mean_shift.running_mean"]) == 2
