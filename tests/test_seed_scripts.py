"""train_avc.py / infer_seed.py on a tiny synthetic set: records of every loss term, the SEAM
ablation, bit-exact resume, a 2-process torchrun run, seed outputs in SEAM's formats, skip-existing,
sharding and strict weight loading."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

import infer_seed
import train_avc
from network.avc import AVCNet
from tests.helpers_resume import assert_resume_is_bit_exact, log_rows
from tests.helpers_torchrun import assert_ranks_agree_with_checkpoint, train_on_two_ranks
from tool.checkpoint import read_checkpoint
from tool.contract import HIGH_ALPHA, LOW_ALPHA, crf_dir
from tool.fileio import DataError, load_score_dict, read_id_list
from voc12.prepare import prepare_voc
from voc12.synthetic import generate_dataset
from workflow.datasets import get_dataset_info

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 48
NUM_CLASSES = 3
TINY = ["--width_mult", "0.0625", "--num_workers", "0", "--crop_size", str(SIZE),
        "--resize_long", str(SIZE), str(SIZE + 8), "--no-dropout"]
SEAM_TERMS = ("cls", "min_pool", "er", "ecr")
AVC_TERMS = ("avc_cross", "avc_sem")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("seed_data") / "syn")
    generate_dataset(path, num_train=6, num_val=2, image_size=SIZE, num_classes=NUM_CLASSES, seed=3)
    prepare_voc(get_dataset_info("synthetic", path), workers=1)
    return path


def _train_argv(root: str, save_dir: str, session: str, *extra: str) -> list[str]:
    return ["--dataset", "synthetic", "--voc12_root", root, "--train_list", os.path.join(root, "train.txt"),
            "--save_dir", save_dir, "--session_name", session, *TINY, *extra]


@pytest.fixture(scope="module")
def trained(root, tmp_path_factory) -> dict[str, str]:
    save_dir = str(tmp_path_factory.mktemp("avc_run"))
    train_avc.run(train_avc.parse_args(_train_argv(root, save_dir, "avc", "--batch_size", "3",
                                                   "--max_epoches", "2", "--momentum", "0.9")))
    return {"save_dir": save_dir, "weights": os.path.join(save_dir, "avc.pth")}


def test_training_logs_every_term_and_saves_a_loadable_checkpoint(trained):
    rows = log_rows(trained["save_dir"], "avc")
    assert [int(row["step"]) for row in rows] == [1, 2, 3, 4]
    for row in rows:  # default weights: the total is the plain sum of the six terms
        terms = [float(row[name]) for name in SEAM_TERMS + AVC_TERMS]
        assert all(np.isfinite(terms)) and float(row["loss"]) == pytest.approx(sum(terms), rel=1e-4)
    final = read_checkpoint(trained["weights"])
    assert final["step"] == 4 and final["args"]["avc_weight"] == 1.0
    assert {"fc8.weight", "f8_3.weight", "f8_4.weight", "f9.weight"} <= set(final["model"])
    assert os.path.isfile(os.path.join(trained["save_dir"], "avc_config.json"))


def test_avc_weight_zero_logs_but_does_not_train_the_avc_terms(root, tmp_path):
    argv = _train_argv(root, str(tmp_path), "seam", "--batch_size", "3", "--max_epoches", "1", "--avc_weight", "0")
    train_avc.run(train_avc.parse_args(argv))
    for row in log_rows(str(tmp_path), "seam"):
        seam_total = sum(float(row[name]) for name in SEAM_TERMS)
        assert float(row["loss"]) == pytest.approx(seam_total, rel=1e-5)
        assert float(row["avc_cross"]) > 0 and float(row["avc_sem"]) > 0   # measured, left out of the total


def test_resume_continues_bit_exactly(root, tmp_path, monkeypatch):
    # Batch 2: 3 steps per epoch; the crash after step 2 is mid-epoch, so the resume skips a batch.
    schedule = ("--batch_size", "2", "--max_epoches", "2", "--save_every", "1", "--momentum", "0.9")
    assert_resume_is_bit_exact(
        lambda argv: train_avc.run(train_avc.parse_args(argv)),
        _train_argv(root, str(tmp_path), "straight", *schedule), _train_argv(root, str(tmp_path), "run", *schedule),
        str(tmp_path), "run", crash_after=2, monkeypatch=monkeypatch,
        records=lambda session: log_rows(str(tmp_path), session))


def test_two_process_torchrun_keeps_identical_weights(root, tmp_path):
    # From scratch, so the BatchNorm running statistics train too and must agree as well.
    argv = _train_argv(root, str(tmp_path / "ddp"), "ddp", "--batch_size", "4", "--max_epoches", "2")
    ranks = train_on_two_ranks("train_avc", argv, tmp_path)
    # 6 images, global batch 4, the partial batch dropped: one step an epoch.
    assert_ranks_agree_with_checkpoint(ranks, tmp_path / "ddp" / "ddp.pth", steps=2)


def _infer_argv(root: str, weights: str, out: str, *extra: str) -> list[str]:
    return ["--dataset", "synthetic", "--voc12_root", root, "--weights", weights,
            "--infer_list", os.path.join(root, "train.txt"), "--num_workers", "0", "--scales", "1.0", "0.5",
            "--out_cam", os.path.join(out, "cam"), "--out_cam_pred", os.path.join(out, "seed"),
            "--out_crf", os.path.join(out, "crf"), *extra]


def test_seed_outputs_in_seam_formats_and_skip_existing(root, trained, tmp_path):
    out = str(tmp_path)
    infer_seed.main(_infer_argv(root, trained["weights"], out, "--out_vis", os.path.join(out, "vis")))
    info = get_dataset_info("synthetic", root)
    labels = info.load_cls_labels()
    for image_id in read_id_list(os.path.join(root, "train.txt")):
        present = [int(c) for c in np.flatnonzero(labels[image_id])]
        width, height = Image.open(os.path.join(root, "JPEGImages", f"{image_id}.jpg")).size
        cam_dict = load_score_dict(os.path.join(out, "cam", f"{image_id}.npy"), NUM_CLASSES)
        assert sorted(cam_dict) == present                       # 0-based foreground classes
        for cam in cam_dict.values():
            assert cam.dtype == np.float32 and cam.shape == (height, width)
            assert cam.min() >= 0 and cam.max() <= 1
        with Image.open(os.path.join(out, "seed", f"{image_id}.png")) as seed_png:
            assert seed_png.mode == "P" and seed_png.size == (width, height)
            assert set(np.unique(np.asarray(seed_png))) <= {0, *(c + 1 for c in present)}
        for alpha in (LOW_ALPHA, HIGH_ALPHA):                    # CRF dicts: 0 = bg, c + 1 = class c
            crf = load_score_dict(os.path.join(crf_dir(os.path.join(out, "crf"), alpha), f"{image_id}.npy"),
                                  NUM_CLASSES, one_based=True)
            assert sorted(crf) == [0, *(c + 1 for c in present)]
            stacked = np.stack([crf[key] for key in sorted(crf)])
            np.testing.assert_allclose(stacked.sum(axis=0), 1.0, atol=1e-3)   # CRF marginals
        assert os.path.isfile(os.path.join(out, "vis", f"{image_id}.jpg"))
    seed_path = os.path.join(out, "seed", f"{read_id_list(os.path.join(root, 'train.txt'))[0]}.png")
    before = os.stat(seed_path).st_mtime_ns
    infer_seed.main(_infer_argv(root, trained["weights"], out, "--out_vis", os.path.join(out, "vis")))
    assert os.stat(seed_path).st_mtime_ns == before            # everything was done: nothing rewritten


def test_shards_partition_the_list(root, trained, tmp_path):
    ids = read_id_list(os.path.join(root, "train.txt"))
    done = []
    for shard in ("1/2", "2/2"):
        part = tmp_path / shard.replace("/", "of")
        infer_seed.main(_infer_argv(root, trained["weights"], str(part), "--shard", shard))
        done.append({name[:-4] for name in os.listdir(part / "cam") if name.endswith(".npy")})
    assert done[0].isdisjoint(done[1]) and done[0] | done[1] == set(ids)


def test_weights_of_another_model_are_rejected_with_the_keys(root, trained, tmp_path):
    wrong = str(tmp_path / "wrong.pth")
    model = AVCNet(num_classes=NUM_CLASSES + 2, width_mult=0.0625)          # a 5-class classifier
    torch.save({"model": model.state_dict(), "args": {"width_mult": 0.0625}}, wrong)
    with pytest.raises(DataError, match=r"wrong\.pth does not match AVCNet; first shape conflict: fc8\.weight: "
                                        r"file \(6, 256, 1, 1\) vs model \(4, 256, 1, 1\)"):
        infer_seed.main(_infer_argv(root, wrong, str(tmp_path / "out")))
