"""train_seed.py / infer_seed.py with SIPE and AE-SIPE on a tiny synthetic set: the checkpoint records
method, backbone and width; inference needs no method flag and refuses a contradicting one; outputs
in the project's format and the reference's IS_CAM layout; a released ``{'net': ...}`` file and a
torchvision-layout ImageNet file load."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

import infer_seed
import train_seed
from network.sipe import SIPENet
from network.weights import start_from_weights
from tests.helpers_resume import log_rows
from tool.checkpoint import read_checkpoint
from tool.fileio import DataError, load_score_dict, read_id_list
from voc12.prepare import prepare_voc
from voc12.synthetic import generate_dataset
from workflow.datasets import get_dataset_info

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 48
NUM_CLASSES = 3
TINY = ["--width_mult", "0.0625", "--num_workers", "0", "--crop_size", str(SIZE),
        "--resize_long", str(SIZE - 8), str(SIZE + 8), "--batch_size", "3", "--max_epoches", "1"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("sipe_data") / "syn")
    generate_dataset(path, num_train=6, num_val=2, image_size=SIZE, num_classes=NUM_CLASSES, seed=3)
    prepare_voc(get_dataset_info("synthetic", path), workers=1)
    return path


@pytest.fixture(scope="module", params=["sipe", "ae_sipe"])
def trained(request, root, tmp_path_factory) -> dict[str, str]:
    save_dir = str(tmp_path_factory.mktemp(request.param))
    train_seed.run(train_seed.parse_args(
        ["--method", request.param, "--dataset", "synthetic", "--voc12_root", root,
         "--train_list", os.path.join(root, "train.txt"), "--save_dir", save_dir, "--session_name", "m", *TINY]))
    return {"method": request.param, "save_dir": save_dir, "weights": os.path.join(save_dir, "m.pth")}


def _infer_argv(root: str, weights: str, out: str, *extra: str) -> list[str]:
    return ["--dataset", "synthetic", "--voc12_root", root, "--weights", weights,
            "--infer_list", os.path.join(root, "train.txt"), "--num_workers", "0", "--scales", "1.0", "0.5",
            "--out_cam", os.path.join(out, "cam"), "--out_cam_pred", os.path.join(out, "seed"), *extra]


def test_training_records_the_method_and_the_reference_optimiser(trained):
    rows = log_rows(trained["save_dir"], "m")
    assert [int(row["step"]) for row in rows] == [1, 2]
    for row in rows:
        assert float(row["loss"]) == pytest.approx(float(row["cls"]) + float(row["gsc"]), rel=1e-4)
    final = read_checkpoint(trained["weights"])
    assert final["args"]["method"] == trained["method"] and final["args"]["backbone"] == "resnet50"
    assert final["args"]["momentum"] == 1e-4 and final["args"]["lr"] == 0.1 and final["args"]["wt_dec"] == 1e-4
    assert {"resnet50.conv1.weight", "stage0.0.weight", "newly_added.0.weight"} <= set(final["model"])
    groups = final["optimizer"]["param_groups"]
    assert sorted({g["initial_lr"] for g in groups}) == pytest.approx([0.1, 1.0])
    assert {g["momentum"] for g in groups} == {1e-4} and {g["weight_decay"] for g in groups} == {1e-4}


def test_inference_reads_the_method_and_writes_both_layouts(root, trained, tmp_path):
    out = str(tmp_path)
    infer_seed.main(_infer_argv(root, trained["weights"], out, "--out_is_cam", os.path.join(out, "is_cam"),
                                "--out_cam_bg", os.path.join(out, "cam_bg")))
    labels = get_dataset_info("synthetic", root).load_cls_labels()
    for image_id in read_id_list(os.path.join(root, "train.txt")):
        present = [int(c) for c in np.flatnonzero(labels[image_id])]
        width, height = Image.open(os.path.join(root, "JPEGImages", f"{image_id}.jpg")).size
        cam_dict = load_score_dict(os.path.join(out, "cam", f"{image_id}.npy"), NUM_CLASSES)
        assert sorted(cam_dict) == present
        reference = np.load(os.path.join(out, "is_cam", f"{image_id}.npy"), allow_pickle=True).item()
        assert sorted(reference) == ["IS_CAM", "keys"]
        assert reference["keys"].tolist() == [0] + [c + 1 for c in present]
        assert reference["IS_CAM"].shape == (len(present) + 1, height, width)
        for index, c in enumerate(present):
            np.testing.assert_array_equal(cam_dict[c], reference["IS_CAM"][index + 1])
        # IRN's sipe / ae_sipe layout: one-based, key 0 the method's own background.
        own_background = load_score_dict(os.path.join(out, "cam_bg", f"{image_id}.npy"), NUM_CLASSES, one_based=True)
        assert sorted(own_background) == reference["keys"].tolist()
        for index, key in enumerate(reference["keys"]):
            np.testing.assert_array_equal(own_background[int(key)], reference["IS_CAM"][index])
        seed = np.asarray(Image.open(os.path.join(out, "seed", f"{image_id}.png")))
        expected = reference["keys"][np.argmax(reference["IS_CAM"], axis=0)]
        np.testing.assert_array_equal(seed, expected)


def test_a_contradicting_method_flag_is_refused(root, trained, tmp_path):
    with pytest.raises(DataError, match=f"trained with --method {trained['method']}, but --method avc"):
        infer_seed.main(_infer_argv(root, trained["weights"], str(tmp_path), "--method", "avc"))


def test_released_checkpoint_and_torchvision_imagenet_file_load(root, tmp_path, capsys):
    # A released SIPE file: {'net': state_dict} with every alias key and no recorded method.
    torch.manual_seed(0)
    model = SIPENet(num_classes=NUM_CLASSES, width_mult=0.0625)
    released = str(tmp_path / "final.pth")
    torch.save({"net": model.state_dict()}, released)
    with pytest.raises(DataError, match="does not match AVCNet"):   # without --method: avc, which it is not
        infer_seed.main(_infer_argv(root, released, str(tmp_path / "a"), "--width_mult", "0.0625"))
    infer_seed.main(_infer_argv(root, released, str(tmp_path / "b"), "--width_mult", "0.0625", "--method", "sipe"))
    written = [name for name in os.listdir(tmp_path / "b" / "cam") if name.endswith(".npy")]
    assert len(written) == len(read_id_list(os.path.join(root, "train.txt")))

    # An ImageNet file in torchvision's layout (fc.* included) initialises the backbone under every alias.
    imagenet = {k: torch.randn_like(v) if v.is_floating_point() else v
                for k, v in model.resnet50.state_dict().items()}
    imagenet["fc.weight"], imagenet["fc.bias"] = torch.zeros(1000, 128), torch.zeros(1000)
    path = str(tmp_path / "resnet50-19c8e357.pth")
    torch.save(imagenet, path)
    fresh = SIPENet(num_classes=NUM_CLASSES, width_mult=0.0625)
    start_from_weights(fresh, path)
    assert "file keys not used: fc.weight, fc.bias" in capsys.readouterr().out
    state = fresh.state_dict()
    for key in ("conv1.weight", "bn1.running_var", "layer2.1.conv2.weight"):
        assert torch.equal(state[f"resnet50.{key}"], imagenet[key])
    assert torch.equal(state["stage0.1.weight"], imagenet["bn1.weight"])
    assert torch.equal(state["backbone.2.0.1.conv2.weight"], imagenet["layer2.1.conv2.weight"])
    assert fresh.stage0[1] is fresh.resnet50.bn1 and not fresh.resnet50.conv1.weight.requires_grad
