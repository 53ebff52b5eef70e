"""train_aff.py / infer_aff.py on a 4-image synthetic set: learning, bit-exact resume, a 2-process
torchrun run, random-walk PNGs, skip-existing, missing inputs and strict weight loading."""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import infer_aff
import train_aff
from network.avc import AVCNet
from tests.helpers_resume import assert_resume_is_bit_exact, log_rows
from tests.helpers_torchrun import assert_ranks_agree_with_checkpoint, train_on_two_ranks
from tests.reference_data import load_reference, reference_cam_dict, reference_graph
from tool.checkpoint import read_checkpoint
from tool.fileio import DataError, atomic_write_text, read_label_png, save_npy, save_rgb_image
from tool.random_walk import AffinityGraph, padded_size, rw_scores_from_crf_dict

HEIGHT, WIDTH = 56, 60          # width not a multiple of 8: infer_aff pads to 56 x 64 (7 x 8 grid)
CROP = 56                       # 7 x 7 label grid: SEAM's rule gives radius 3
IDS = [f"img{i}" for i in range(4)]
COLOURS = {0: (40, 60, 200), 1: (210, 40, 40), 2: (40, 200, 60)}
BAND = 4                        # unsure band around each object (la says bg, ha says the class)
TINY = ["--width_mult", "0.0625", "--num_workers", "0", "--crop_size", str(CROP)]


pytestmark = pytest.mark.usefixtures("one_thread")


def _one_hot_dict(label: np.ndarray, keys: list[int]) -> dict[int, np.ndarray]:
    """A CRF-like dict: 0.9 on the label's class, 0.1 shared by the others."""
    return {key: np.where(label == key, 0.9, 0.1 / (len(keys) - 1)).astype(np.float32) for key in keys}


def _write_sample(base: str, image_id: str, rng: np.random.Generator) -> list[int]:
    """Image, la/ha CRF dicts (1-based) and a CAM dict (0-based) of two rectangles; returns CAM keys."""
    label = np.zeros((HEIGHT, WIDTH), np.uint8)
    grown = np.zeros_like(label)
    for class_id in (1, 2):
        top, left = rng.integers(BAND, HEIGHT - 24, size=1)[0], rng.integers(BAND, WIDTH - 24, size=1)[0]
        height, width = rng.integers(14, 20, size=2)
        label[top:top + height, left:left + width] = class_id
        grown[top - BAND:top + height + BAND, left - BAND:left + width + BAND] = class_id
    grown[label > 0] = label[label > 0]
    palette = np.asarray([COLOURS[c] for c in range(3)], np.float64)
    image = np.clip(palette[label] + rng.normal(0, 12, (HEIGHT, WIDTH, 3)), 0, 255).astype(np.uint8)
    save_rgb_image(os.path.join(base, "root", "JPEGImages", f"{image_id}.jpg"), image)
    keys = [0, 1, 2]
    save_npy(os.path.join(base, "crf_4.0", f"{image_id}.npy"), _one_hot_dict(label, keys))
    save_npy(os.path.join(base, "crf_24.0", f"{image_id}.npy"), _one_hot_dict(grown, keys))
    cams = {class_id - 1: np.clip((label == class_id) * 0.8 + rng.uniform(0, 0.2, label.shape), 0, 1)
            .astype(np.float32) for class_id in (1, 2)}
    save_npy(os.path.join(base, "cam", f"{image_id}.npy"), cams)
    return sorted(cams)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    base = str(tmp_path_factory.mktemp("aff_data"))
    atomic_write_text(os.path.join(base, "root", "class_names.txt"), "background\nred\ngreen\n")
    rng = np.random.default_rng(0)
    for image_id in IDS:
        _write_sample(base, image_id, rng)
    paths = {"base": base, "root": os.path.join(base, "root"), "la": os.path.join(base, "crf_4.0"),
             "ha": os.path.join(base, "crf_24.0"), "cam": os.path.join(base, "cam"),
             "list": os.path.join(base, "train.txt")}
    atomic_write_text(paths["list"], "\n".join(IDS) + "\n")
    return paths


def _train_argv(data: dict[str, str], save_dir: str, session: str, *extra: str) -> list[str]:
    return ["--dataset", "synthetic", "--voc12_root", data["root"], "--train_list", data["list"],
            "--la_crf_dir", data["la"], "--ha_crf_dir", data["ha"], "--save_dir", save_dir,
            "--session_name", session, *TINY, *extra]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> dict[str, str]:
    """One short from-scratch run, shared by the tests that need AffinityNet weights."""
    save_dir = str(tmp_path_factory.mktemp("aff_run"))
    argv = _train_argv(data, save_dir, "aff", "--batch_size", "2", "--max_epoches", "6")  # PSA: lr 0.1, no momentum
    train_aff.run(train_aff.parse_args(argv))
    return {"save_dir": save_dir, "weights": os.path.join(save_dir, "aff.pth")}


def test_training_lowers_the_loss_and_writes_its_records(trained):
    rows = log_rows(trained["save_dir"], "aff")
    assert len(rows) == 12 and set(rows[0]) >= {"step", "lr", "loss", "bg", "fg", "neg"}
    losses = [float(row["loss"]) for row in rows]
    for row in rows:  # the total is bg/4 + fg/4 + neg/2 of the logged terms
        terms = {name: float(row[name]) for name in ("bg", "fg", "neg")}
        assert float(row["loss"]) == pytest.approx(terms["bg"] / 4 + terms["fg"] / 4 + terms["neg"] / 2, rel=1e-4)
        assert all(np.isfinite(list(terms.values())))
    assert np.mean(losses[-3:]) < 0.92 * np.mean(losses[:3])
    final = read_checkpoint(trained["weights"])
    assert final["step"] == 12 and final["args"]["width_mult"] == 0.0625
    assert set(final["model"]) >= {"f8_3.weight", "f8_4.weight", "f8_5.weight", "f9.weight"}
    with open(os.path.join(trained["save_dir"], "aff_config.json")) as handle:
        assert json.load(handle)["la_crf_dir"].endswith("crf_4.0")


def test_resume_continues_bit_exactly(data, tmp_path, monkeypatch):
    # Batch 1: 4 steps per epoch, so the crash after step 2 is mid-epoch and the resume skips batches.
    schedule = ("--batch_size", "1", "--max_epoches", "1", "--save_every", "1", "--lr", "0.01")
    assert_resume_is_bit_exact(
        lambda argv: train_aff.run(train_aff.parse_args(argv)),
        _train_argv(data, str(tmp_path), "straight", *schedule), _train_argv(data, str(tmp_path), "run", *schedule),
        str(tmp_path), "run", crash_after=2, monkeypatch=monkeypatch,
        records=lambda session: log_rows(str(tmp_path), session))


def test_missing_crf_dicts_are_listed_in_one_error(data, tmp_path):
    atomic_write_text(str(tmp_path / "list.txt"), "img0\nghost1\nghost2\n")
    argv = _train_argv(data, str(tmp_path), "bad", "--train_list", str(tmp_path / "list.txt"))
    with pytest.raises(DataError) as error:
        train_aff.run(train_aff.parse_args(argv))
    message = str(error.value)
    assert message.startswith("4 low/high-alpha CRF dicts")
    assert "crf_4.0/ghost1.npy" in message and "crf_24.0/ghost2.npy" in message


def test_starts_from_a_classifier_checkpoint(data, tmp_path):
    """--weights with an AVC checkpoint: its backbone initialises AffinityNet (then frozen)."""
    avc = AVCNet(num_classes=2, width_mult=0.0625)
    with torch.no_grad():
        avc.b4.conv_branch2a.weight.fill_(0.01)
    weights = str(tmp_path / "avc.pth")
    torch.save({"model": avc.state_dict(), "args": {"width_mult": 0.0625}}, weights)
    argv = _train_argv(data, str(tmp_path), "from_avc", "--batch_size", "4", "--max_epoches", "1",
                       "--weights", weights)
    model = train_aff.run(train_aff.parse_args(argv))
    assert torch.equal(model.b2.conv_branch2a.weight, avc.b2.conv_branch2a.weight)  # frozen: unchanged
    assert not model.b2.conv_branch2a.weight.requires_grad
    assert not torch.equal(model.b4.conv_branch2a.weight, avc.b4.conv_branch2a.weight)  # trained one step
    assert torch.allclose(model.b4.conv_branch2a.weight, avc.b4.conv_branch2a.weight, atol=0.01)


def test_two_process_torchrun_keeps_identical_weights(data, tmp_path):
    # From scratch, so BatchNorm running statistics train too and must also agree.
    ranks = train_on_two_ranks("train_aff", _train_argv(data, str(tmp_path / "ddp"), "ddp", "--batch_size",
                                                               "2", "--max_epoches", "1"), tmp_path)
    assert_ranks_agree_with_checkpoint(ranks, tmp_path / "ddp" / "ddp.pth", steps=2)


def test_rw_label_reproduces_the_reference_script():
    """infer_aff's per-image path (CAM dict -> scores -> walk -> upsample -> crop) on the reference
    affinities of a 90 x 117 image (padded 96 x 120, grid 12 x 15) gives the reference PNG."""
    common, expected = load_reference("rw_common.npz"), load_reference("rw_a6_t8.npz")

    class ReferenceAffinities:
        def affinity_graph(self, x: torch.Tensor) -> AffinityGraph:
            assert tuple(x.shape) == (1, 3, 96, 120)
            return reference_graph()

    item = {"id": "ref", "image": common["image"], "walk_image": common["image"], "input": torch.zeros(3, 96, 120),
            "cam_path": "ref.npy", "cam_dict": reference_cam_dict()}
    args = argparse.Namespace(alpha=float(expected["alpha"]), beta=float(expected["beta"]),
                              logt=int(expected["logt"]), crf=False, precision="fp32", walk_from="cam")
    label = infer_aff.rw_label(ReferenceAffinities(), item, 20, args, torch.device("cpu"))
    clear = expected["label_margin"] > 1e-4  # the README's near-ties
    np.testing.assert_array_equal(label[clear], expected["label"][clear])
    assert label.shape == (90, 117) and np.count_nonzero(label != expected["label"]) <= 1


def _infer_argv(data: dict[str, str], weights: str, out_rw: str, *extra: str) -> list[str]:
    return ["--dataset", "synthetic", "--voc12_root", data["root"], "--weights", weights,
            "--infer_list", data["list"], "--cam_dir", data["cam"], "--out_rw", out_rw,
            "--num_workers", "0", "--device", "cpu", *extra]


def test_input_is_normalised_then_zero_padded_to_a_multiple_of_8(data):
    info = infer_aff.get_dataset_info("synthetic", data["root"])
    item = infer_aff.RandomWalkDataset(info, ["img0"], data["cam"])[0]
    assert item["image"].shape == (HEIGHT, WIDTH, 3)
    assert tuple(item["input"].shape) == (3, 56, 64)
    assert torch.count_nonzero(item["input"][:, :, WIDTH:]) == 0
    assert torch.count_nonzero(item["input"][:, :, :WIDTH]) > 0
    assert sorted(item["cam_dict"]) == [0, 1]


@pytest.mark.parametrize("crf", [False, True])
def test_infer_writes_palette_pngs_and_skips_existing(data, trained, tmp_path, crf):
    out_rw = str(tmp_path / "rw")
    argv = _infer_argv(data, trained["weights"], out_rw, "--logt", "4", *(["--crf"] if crf else []))
    assert infer_aff.run(infer_aff.parse_args(argv)) == len(IDS)
    for image_id in IDS:
        with Image.open(os.path.join(out_rw, f"{image_id}.png")) as picture:
            assert picture.mode == "P" and picture.size == (WIDTH, HEIGHT)
        label = read_label_png(os.path.join(out_rw, f"{image_id}.png"))
        cam_keys = np.load(os.path.join(data["cam"], f"{image_id}.npy"), allow_pickle=True).item().keys()
        assert set(np.unique(label)) <= {0} | {key + 1 for key in cam_keys}
    stamps = {name: os.stat(os.path.join(out_rw, name)).st_mtime_ns for name in os.listdir(out_rw)
              if name.endswith(".png")}
    assert infer_aff.run(infer_aff.parse_args(argv)) == 0
    assert stamps == {name: os.stat(os.path.join(out_rw, name)).st_mtime_ns for name in stamps}


def test_infer_missing_cam_dict_is_listed(data, trained, tmp_path):
    cam_dir = str(tmp_path / "cam")
    for image_id in IDS[1:]:
        os.makedirs(cam_dir, exist_ok=True)
        os.link(os.path.join(data["cam"], f"{image_id}.npy"), os.path.join(cam_dir, f"{image_id}.npy"))
    argv = _infer_argv(data, trained["weights"], str(tmp_path / "rw"), "--cam_dir", cam_dir)
    with pytest.raises(DataError, match=r"(?s)1 CAM dicts .*cam/img0\.npy"):
        infer_aff.run(infer_aff.parse_args(argv))
    assert not os.path.exists(tmp_path / "rw" / "img1.png")


def test_infer_refuses_a_classifier_checkpoint(data, tmp_path):
    weights = str(tmp_path / "avc.pth")
    torch.save({"model": AVCNet(num_classes=2, width_mult=0.0625).state_dict(), "args": {"width_mult": 0.0625}},
               weights)
    with pytest.raises(DataError) as error:
        infer_aff.run(infer_aff.parse_args(_infer_argv(data, weights, str(tmp_path / "rw"))))
    message = str(error.value)
    assert "does not match AffinityNet" in message
    assert "missing keys" in message and "f8_5.weight" in message
    assert "unexpected keys" in message and "fc8.weight" in message


def test_walk_from_crf_propagates_the_crf_marginals(data, trained, tmp_path):
    """--walk_from crf: the walk starts from a CRF dict's marginals (key 0 = background, no alpha),
    pooled 8 x 8 over the zero-padded map, and writes labels of the dict's classes."""
    info = infer_aff.get_dataset_info("synthetic", data["root"])
    crf_dicts = str(tmp_path / "crf_dicts")
    for image_id in IDS:  # the la dicts stand in for refine_mask --out_crf's (same format)
        la = np.load(os.path.join(data["la"], f"{image_id}.npy"), allow_pickle=True).item()
        save_npy(os.path.join(crf_dicts, f"{image_id}.npy"), la)
    dataset = infer_aff.RandomWalkDataset(info, ["img0"], crf_dicts)
    dataset.one_based = True
    item = dataset[0]
    scores = rw_scores_from_crf_dict(item["cam_dict"], info.num_classes, item["image"].shape[:2])
    assert tuple(scores.shape) == (info.num_classes + 1, 7, 8)
    padded = np.zeros((info.num_classes + 1, 56, 64), np.float32)
    for key, value in item["cam_dict"].items():
        padded[key, :, :WIDTH] = value
    np.testing.assert_allclose(scores.numpy(), padded.reshape(-1, 7, 8, 8, 8).mean(axis=(2, 4)), rtol=1e-5, atol=1e-6)
    out_rw = str(tmp_path / "rw")
    argv = _infer_argv(data, trained["weights"], out_rw, "--logt", "2", "--walk_from", "crf")
    argv[argv.index("--cam_dir") + 1] = crf_dicts
    assert infer_aff.run(infer_aff.parse_args(argv)) == len(IDS)
    for image_id in IDS:
        label = read_label_png(os.path.join(out_rw, f"{image_id}.png"))
        keys = np.load(os.path.join(crf_dicts, f"{image_id}.npy"), allow_pickle=True).item().keys()
        assert label.shape == (HEIGHT, WIDTH) and set(np.unique(label)) <= set(keys)


def test_walk_at_a_finer_scale(data, trained, tmp_path):
    """--scale 2: the image and its dicts are resized before AffinityNet (a grid 4 x finer), and
    the labels come back at the image's size, of the dict's classes."""
    info = infer_aff.get_dataset_info("synthetic", data["root"])
    item = infer_aff.RandomWalkDataset(info, ["img0"], data["cam"], scale=2.0)[0]
    assert item["walk_image"].shape == (2 * HEIGHT, 2 * WIDTH, 3) and item["image"].shape == (HEIGHT, WIDTH, 3)
    assert all(scores.shape == (2 * HEIGHT, 2 * WIDTH) for scores in item["cam_dict"].values())
    assert tuple(item["input"].shape[-2:]) == padded_size((2 * HEIGHT, 2 * WIDTH))
    out_rw = str(tmp_path / "rw")
    assert infer_aff.run(infer_aff.parse_args(_infer_argv(data, trained["weights"], out_rw, "--scale", "2",
                                                          "--logt", "3", "--crf"))) == len(IDS)
    for image_id in IDS:
        label = read_label_png(os.path.join(out_rw, f"{image_id}.png"))
        keys = np.load(os.path.join(data["cam"], f"{image_id}.npy"), allow_pickle=True).item().keys()
        assert label.shape == (HEIGHT, WIDTH) and set(np.unique(label)) <= {0} | {key + 1 for key in keys}
