"""train_deeplab.py / test_deeplab.py on a 4-image synthetic set: learning, bit-exact resume,
multi-scale fusion, the VOC submission layout, skip-existing and a 2-process torchrun run."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import test_deeplab
import train_deeplab
from tests.helpers_resume import assert_resume_is_bit_exact, log_rows
from tests.helpers_torchrun import assert_ranks_agree_with_checkpoint, train_on_two_ranks
from tool.checkpoint import read_checkpoint
from tool.fileio import DataError, atomic_write_text, read_label_png, save_palette_png, save_rgb_image
from workflow.datasets import get_dataset_info

SIZE = 32
TRAIN_IDS = [f"img{i}" for i in range(4)]
# Background is blue-ish, class 1 red, class 2 green: learnable from colour in a few steps.
COLOURS = {0: (40, 60, 200), 1: (210, 40, 40), 2: (40, 200, 60)}
TINY = ["--width_mult", "0.0625", "--num_workers", "0", "--crop_size", str(SIZE)]


pytestmark = pytest.mark.usefixtures("one_thread")


def _write_sample(root: str, image_id: str, rng: np.random.Generator, with_gt: bool = True) -> np.ndarray:
    label = np.zeros((SIZE, SIZE), np.uint8)
    for class_id in (1, 2):
        top, left = rng.integers(0, SIZE - 12, size=2)
        height, width = rng.integers(8, 13, size=2)
        label[top:top + height, left:left + width] = class_id
    palette = np.asarray([COLOURS[c] for c in range(3)], np.float64)
    image = np.clip(palette[label] + rng.normal(0, 12, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    save_rgb_image(os.path.join(root, "JPEGImages", f"{image_id}.jpg"), image)
    if with_gt:
        save_palette_png(os.path.join(root, "SegmentationClass", f"{image_id}.png"), label)
    return label


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[str, str]:
    """A synthetic VOC-layout root: 4 labelled images, pseudo masks, and 1 image without gt."""
    base = tmp_path_factory.mktemp("deeplab_data")
    root, pseudo_dir = str(base / "root"), str(base / "pseudo")
    atomic_write_text(os.path.join(root, "class_names.txt"), "background\nred\ngreen\n")
    rng = np.random.default_rng(0)
    for image_id in TRAIN_IDS:
        label = _write_sample(root, image_id, rng)
        pseudo = label.copy()
        pseudo[:2] = 255  # unsure pixels, as a pseudo mask has them: ignored by the loss
        save_palette_png(os.path.join(pseudo_dir, f"{image_id}.png"), pseudo)
    _write_sample(root, "test0", rng, with_gt=False)
    paths = {"root": root, "pseudo": pseudo_dir, "train": str(base / "train.txt"),
             "val": str(base / "val.txt"), "test": str(base / "test.txt")}
    atomic_write_text(paths["train"], "\n".join(TRAIN_IDS) + "\n")
    atomic_write_text(paths["val"], "\n".join(TRAIN_IDS[:2]) + "\n")
    atomic_write_text(paths["test"], "test0\n")
    return paths


def _train_argv(data: dict[str, str], save_dir: str, session: str, *extra: str) -> list[str]:
    return ["--dataset", "synthetic", "--voc12_root", data["root"], "--train_list", data["train"],
            "--pseudo_dir", data["pseudo"], "--save_dir", save_dir, "--session_name", session,
            "--batch_size", "2", *TINY, *extra]


def _losses(save_dir: str, session: str) -> list[float]:
    return [float(row["loss"]) for row in log_rows(save_dir, session)]


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory) -> dict[str, str]:
    """One short from-scratch run with validation, shared by the tests that need a checkpoint."""
    save_dir = str(tmp_path_factory.mktemp("deeplab_run"))
    argv = _train_argv(dataset, save_dir, "fit", "--max_iters", "24", "--lr", "0.01", "--bn_momentum", "0.1",
                       "--val_list", dataset["val"], "--val_every", "12")
    train_deeplab.run(train_deeplab.parse_args(argv))
    return {"save_dir": save_dir, "weights": os.path.join(save_dir, "fit.pth")}


def test_training_lowers_the_loss_and_writes_its_records(trained):
    losses = _losses(trained["save_dir"], "fit")
    assert len(losses) == 24 and all(np.isfinite(losses))
    # It learns: the loss falls, and below that of a uniform guess over the 3 labels (log 3).
    assert np.mean(losses[-6:]) < 0.75 * np.mean(losses[:6])
    assert np.mean(losses[-6:]) < np.log(3)
    final = read_checkpoint(trained["weights"])
    assert final["step"] == 24
    assert final["args"]["pseudo_dir"].endswith("pseudo")
    with open(os.path.join(trained["save_dir"], "fit_config.json")) as handle:
        assert json.load(handle)["max_iters"] == 24
    with open(os.path.join(trained["save_dir"], "fit_val.csv"), newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["step"]) for row in rows] == [12, 24]
    assert all(0.0 <= float(row["miou"]) <= 1.0 for row in rows)


def test_resume_continues_bit_exactly(dataset, tmp_path, monkeypatch):
    # 2 steps per epoch: the crash after step 3 is mid-epoch, so the resume must skip batches.
    schedule = ("--max_iters", "5", "--save_every", "1", "--lr", "0.01")
    assert_resume_is_bit_exact(
        lambda argv: train_deeplab.run(train_deeplab.parse_args(argv)),
        _train_argv(dataset, str(tmp_path), "straight", *schedule), _train_argv(dataset, str(tmp_path), "run", *schedule),
        str(tmp_path), "run", crash_after=3, monkeypatch=monkeypatch,
        records=lambda session: _losses(str(tmp_path), session))


class _ToyNet(torch.nn.Module):
    """Stride-2 conv: not flip-symmetric, and its output needs upsampling."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, stride=2, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.linspace(-1, 1, 81).reshape(3, 3, 3, 3))
            self.conv.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_multiscale_flip_fusion_equals_hand_computed_average(dataset):
    info = get_dataset_info("synthetic", dataset["root"])
    scales = (0.5, 0.75, 1.0, 1.5)
    item = test_deeplab.DeepLabTestDataset(info, ["img0"], scales, flip=True)[0]
    model = _ToyNet().eval()
    probs = test_deeplab.predict_probabilities(model, item["views"], (SIZE, SIZE))

    normalized = (item["image"].astype(np.float32) / 255 - np.array([0.485, 0.456, 0.406], np.float32)) \
        / np.array([0.229, 0.224, 0.225], np.float32)
    total = torch.zeros(3, SIZE, SIZE)
    with torch.no_grad():
        for scale in scales:
            scaled = torch.from_numpy(np.ascontiguousarray(test_deeplab.scaled_view(normalized, scale)))
            scaled = scaled.permute(2, 0, 1)[None]
            assert scaled.shape[-1] == round(SIZE * scale)
            for flipped in (False, True):
                view = scaled.flip(-1) if flipped else scaled
                logits = F.interpolate(model(view), size=(SIZE, SIZE), mode="bilinear", align_corners=True)
                total += (logits.flip(-1) if flipped else logits)[0]
    expected = torch.softmax(total / (2 * len(scales)), dim=0).numpy()
    assert probs.shape == (3, SIZE, SIZE)
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
    label = test_deeplab.label_from_probabilities(item["image"], probs, crf=False)
    np.testing.assert_array_equal(label, expected.argmax(0))


def test_submission_layout_evaluation_and_skip_existing(dataset, trained, tmp_path):
    out_dir = str(tmp_path / "pred")
    common = ["--dataset", "synthetic", "--voc12_root", dataset["root"], "--weights", trained["weights"],
              "--out_dir", out_dir, "--width_mult", "0.0625", "--num_workers", "0", "--scales", "0.75", "1.0"]
    results = test_deeplab.run(test_deeplab.parse_args(common + ["--infer_list", dataset["train"], "--submission"]))
    assert results is not None and results["num_images"] == 4 and 0.0 <= results["miou"] <= 1.0
    server_dir = os.path.join(out_dir, "results", "VOC2012", "Segmentation", "comp6_test_cls")
    assert sorted(os.listdir(server_dir)) == [f"{image_id}.png" for image_id in TRAIN_IDS]
    for image_id in TRAIN_IDS:
        with Image.open(os.path.join(server_dir, f"{image_id}.png")) as picture:
            assert picture.mode == "P" and picture.size == (SIZE, SIZE)
        main_png = read_label_png(os.path.join(out_dir, f"{image_id}.png"))
        np.testing.assert_array_equal(main_png, read_label_png(os.path.join(server_dir, f"{image_id}.png")))
        assert main_png.max() <= 2

    stamps = {name: os.stat(os.path.join(out_dir, name)).st_mtime_ns for name in os.listdir(out_dir)
              if name.endswith(".png")}
    test_deeplab.run(test_deeplab.parse_args(common + ["--infer_list", dataset["train"], "--submission"]))
    assert stamps == {name: os.stat(os.path.join(out_dir, name)).st_mtime_ns for name in stamps}

    # An image without ground truth (a test-set image) is segmented but not evaluated; other
    # settings (--no-crf) go to another folder (issue 14: never mixed with the CRF outputs).
    with pytest.raises(DataError, match="made with other settings .*--crf true then, false now"):
        test_deeplab.run(test_deeplab.parse_args(common + ["--infer_list", dataset["test"], "--no-crf"]))
    test_dir = str(tmp_path / "pred_test")
    assert test_deeplab.run(test_deeplab.parse_args(
        common + ["--infer_list", dataset["test"], "--no-crf", "--out_dir", test_dir])) is None
    assert read_label_png(os.path.join(test_dir, "test0.png")).shape == (SIZE, SIZE)


def test_two_process_torchrun_keeps_identical_weights(dataset, tmp_path):
    # From scratch, so BatchNorm running statistics train too and must also agree.
    argv = _train_argv(dataset, str(tmp_path / "ddp"), "ddp", "--max_iters", "2", "--batch_size", "4",
                       "--bn_momentum", "0.1")
    ranks = train_on_two_ranks("train_deeplab", argv, tmp_path)
    assert_ranks_agree_with_checkpoint(ranks, tmp_path / "ddp" / "ddp.pth", steps=2)


def test_deeplabv2_trains_with_accumulation_and_tests_from_its_checkpoint(dataset, tmp_path):
    """--arch deeplabv2: the MSC loss terms are logged, the init and convention recorded, and
    test_deeplab.py reads the architecture back from the checkpoint (both CRF images)."""
    save_dir = str(tmp_path / "ck")
    argv = _train_argv(dataset, save_dir, "v2", "--arch", "deeplabv2", "--iter_size", "2", "--max_iters", "3",
                       "--lr", "0.002")
    train_deeplab.run(train_deeplab.parse_args(argv))
    rows = log_rows(save_dir, "v2")
    assert len(rows) == 3 and {"ce_s1", "ce_s050", "ce_s075", "ce_max"} <= set(rows[0])
    for row in rows:
        terms = [float(row[name]) for name in ("ce_s1", "ce_s050", "ce_s075", "ce_max")]
        assert float(row["loss"]) == pytest.approx(sum(terms), rel=1e-4)
    saved = read_checkpoint(os.path.join(save_dir, "v2.pth"))["args"]
    assert (saved["arch"], saved["init"], saved["input_convention"]) == ("deeplabv2_resnet101", "scratch", "torchvision")
    assert saved["iter_size"] == 2 and saved["lr_update_every"] == 10 and saved["wt_dec"] == 5e-4
    for crf_image in ("image", "reference"):
        out_dir = str(tmp_path / crf_image)
        test_deeplab.run(test_deeplab.parse_args([
            "--dataset", "synthetic", "--voc12_root", dataset["root"], "--weights", os.path.join(save_dir, "v2.pth"),
            "--out_dir", out_dir, "--num_workers", "0", "--infer_list", dataset["val"], "--crf_image", crf_image]))
        assert read_label_png(os.path.join(out_dir, "img0.png")).shape == (SIZE, SIZE)
    with pytest.raises(SystemExit):
        train_deeplab.parse_args(argv + ["--batch_size", "3"])  # not a multiple of --iter_size 2
