"""train_scn.py -> train_msa.py (image and saliency variants) -> infer_seed.py --method msa on a tiny
synthetic set: the schedules as the reference runs them, checkpoints in the reference's key layout,
CAM dicts in SEAM's format, and the labelled saliency stand-ins."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import eval_spixel
import infer_seed
import train_msa
import train_scn
from network.msa import MSANet
from network.spixel import SpixelNet
from tests.helpers_resume import log_rows
from tool.checkpoint import read_checkpoint
from tool.fileio import DataError, load_score_dict, read_id_list
from voc12.msa_data import MSAClassificationDataset, SpixelDataset
from voc12.prepare import prepare_voc
from voc12.saliency import STANDIN_NOTE, read_saliency_png, write_standins
from voc12.synthetic import generate_dataset
from workflow.datasets import get_dataset_info

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 48
NUM_CLASSES = 3
TINY = ["--num_workers", "0", "--crop_size", str(SIZE), "--resize_long", str(SIZE), str(SIZE + 8),
        "--batch_size", "3", "--max_epoches", "1"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("msa_data") / "syn")
    generate_dataset(path, num_train=6, num_val=2, image_size=SIZE, num_classes=NUM_CLASSES, seed=5)
    prepare_voc(get_dataset_info("synthetic", path), workers=1)
    write_standins(path, read_id_list(os.path.join(path, "train_aug.txt")), os.path.join(path, "sal"))
    return path


def _argv(root: str, save_dir: str, session: str, *extra: str) -> list[str]:
    return ["--dataset", "synthetic", "--voc12_root", root, "--save_dir", save_dir, "--session_name", session,
            *TINY, *extra]


@pytest.fixture(scope="module")
def trained(root, tmp_path_factory) -> dict[str, str]:
    save_dir = str(tmp_path_factory.mktemp("msa_run"))
    train_scn.run(train_scn.parse_args(_argv(root, save_dir, "scn", "--width_mult", "0.5")))
    spixel = os.path.join(save_dir, "scn.pth")
    for variant in ("image", "saliency"):
        train_msa.run(train_msa.parse_args(_argv(root, save_dir, f"msa_{variant}", "--width_mult", "0.0625",
                                                 "--spixel_weights", spixel, "--variant", variant,
                                                 "--sal_dir", os.path.join(root, "sal"))))
    return {"save_dir": save_dir, "spixel": spixel}


def test_saliency_standins_are_labelled_and_readable(root):
    with open(os.path.join(root, "sal", "README.txt"), encoding="utf-8") as handle:
        assert handle.read().strip() == STANDIN_NOTE
    image_id = read_id_list(os.path.join(root, "train_aug.txt"))[0]
    saliency = read_saliency_png(os.path.join(root, "sal", f"{image_id}.png"))
    assert saliency.dtype == np.uint8 and saliency.max() > 100
    with pytest.raises(DataError, match="saliency"):
        read_saliency_png(os.path.join(root, "sal", "missing.png"))


def test_datasets_pad_as_the_reference(root):
    info = get_dataset_info("synthetic", root)
    ids = read_id_list(os.path.join(root, "train_aug.txt"))
    _, image, lab = SpixelDataset(info, ids, crop_size=64, resize_long=None)[0]
    assert image.shape == (3, 64, 64) and lab.shape == (64, 64, 3) and lab.dtype == torch.uint8
    padded = (image == 0).all(dim=0)
    assert padded.any() and (lab[padded] == torch.tensor([0, 128, 128], dtype=torch.uint8)).all()  # LAB black
    dataset = MSAClassificationDataset(info, ids, info.load_cls_labels(), crop_size=64, resize_long=None,
                                       sal_dir=os.path.join(root, "sal"))
    _, image, label, saliency = dataset[0]
    assert saliency.shape == (1, 64, 64) and label.shape == (NUM_CLASSES,)
    assert (saliency[0][(image == 0).all(dim=0)] == 0).all()   # the map's max > 100: padded with 0
    with pytest.raises(DataError, match="saliency"):
        MSAClassificationDataset(info, ids, info.load_cls_labels(), sal_dir=os.path.join(root, "nowhere"))


def test_schedules_and_checkpoints(trained):
    scn_rows = log_rows(trained["save_dir"], "scn")
    assert [float(row["lr"]) for row in scn_rows] == [5e-5, 5e-5]          # Adam, constant
    state = read_checkpoint(trained["spixel"])
    SpixelNet(0.5).load_state_dict(state["model"], strict=True)              # reference names, no module.
    assert not any(key.startswith("module.") for key in state["model"])
    for variant, power in (("image", 0.5), ("saliency", 0.9)):
        rows = log_rows(trained["save_dir"], f"msa_{variant}")
        assert [float(row["lr"]) for row in rows] == pytest.approx([0.1, 0.1 * 0.5 ** power], rel=1e-4)
        for row in rows:
            assert float(row["loss"]) == pytest.approx(float(row["cls"]) + 0.3 * float(row["ipc"]), rel=1e-4)
        checkpoint = read_checkpoint(os.path.join(trained["save_dir"], f"msa_{variant}.pth"))
        assert checkpoint["args"]["method"] == ("msa" if variant == "image" else "msa_sal")
        model = MSANet(NUM_CLASSES, 0.0625)
        model.load_state_dict(checkpoint["model"], strict=True)                  # model.* and stage aliases
        assert "stage5.0.2.conv3.weight" in checkpoint["model"]
        group = checkpoint["optimizer"]["param_groups"][0]
        assert group["nesterov"] and group["momentum"] == 4e-5


@pytest.mark.parametrize("method", ["msa", "msa_sal"])
def test_infer_seed_writes_msa_cam_dicts(root, trained, tmp_path, method):
    variant = "image" if method == "msa" else "saliency"
    out = str(tmp_path)
    infer_seed.main(["--method", method, "--weights", os.path.join(trained["save_dir"], f"msa_{variant}.pth"),
                     "--spixel_weights", trained["spixel"], "--dataset", "synthetic", "--voc12_root", root,
                     "--infer_list", os.path.join(root, "train.txt"), "--scales", "1.0",
                     "--out_cam", os.path.join(out, "cam"), "--out_cam_pred", os.path.join(out, "seed"),
                     "--num_workers", "0"])
    labels = get_dataset_info("synthetic", root).load_cls_labels()
    for image_id in read_id_list(os.path.join(root, "train.txt")):
        cam_dict = load_score_dict(os.path.join(out, "cam", f"{image_id}.npy"), NUM_CLASSES)
        assert sorted(cam_dict) == [int(c) for c in np.flatnonzero(labels[image_id])]
        for cam in cam_dict.values():
            assert cam.dtype == np.float32 and cam.min() >= 0 and cam.max() <= 1
        assert os.path.isfile(os.path.join(out, "seed", f"{image_id}.png"))


def test_eval_spixel_scores_the_fcn_and_the_grid(root, trained, tmp_path):
    out = str(tmp_path / "spixel.json")
    result = eval_spixel.main(["--weights", trained["spixel"], "--dataset", "synthetic", "--voc12_root", root,
                               "--out", out])
    assert os.path.isfile(out) and result["images"] == 6
    for name in ("spixel_fcn", "regular_grid"):
        assert set(result[name]) == {"boundary_recall", "boundary_precision", "asa"}
        assert all(0 <= value <= 1 for value in result[name].values())
