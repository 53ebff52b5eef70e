"""tool.parallel: images in flight keep the list order, a worker's DataError is the one-line
DataError of the parent, and the in-flight and batched paths write what the sequential one does."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

import infer_seed
import test_deeplab
from network.avc import AVCNet
from network.deeplab import DeepLabV1
from tool.cli import main_exit_code
from tool.fileio import DataError, read_id_list
from tool.multiscale import forward_views, forward_views_many
from tool.parallel import WorkPlan, consecutive_groups, plan_workers, run_in_flight
from voc12.prepare import prepare_voc
from voc12.synthetic import generate_dataset
from workflow.datasets import get_dataset_info

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 40


def _slow_square(value: int) -> tuple[int, int]:
    time.sleep(0.02 * (3 - value % 4))  # later items finish first
    return value * value, os.getpid()


def test_in_flight_keeps_the_order_and_uses_the_workers():
    results = list(run_in_flight(_slow_square, range(8), WorkPlan(workers=2, threads_per_worker=1)))
    assert [square for square, _ in results] == [value * value for value in range(8)]
    assert len({pid for _, pid in results}) == 2 and os.getpid() not in {pid for _, pid in results}
    sequential = list(run_in_flight(_slow_square, range(3), WorkPlan(workers=1, threads_per_worker=1)))
    assert {pid for _, pid in sequential} == {os.getpid()}


def _fails_on_three(value: int) -> int:
    if value == 3:
        raise DataError(f"image{value}.jpg: not a JPEG")
    return value


def test_a_worker_data_error_is_the_one_line_data_error(capsys):
    def main(argv):
        for _ in run_in_flight(_fails_on_three, range(40), WorkPlan(workers=2, threads_per_worker=1)):
            pass
    assert main_exit_code(main, []) == 2
    assert capsys.readouterr().err == "error: image3.jpg: not a JPEG\n"


def test_plan_follows_the_cores_and_the_list():
    assert plan_workers(2) == WorkPlan(2, 1)
    assert plan_workers(16) == WorkPlan(8, 2)              # memory: at most 8 models' activations
    assert plan_workers(4, num_items=1) == WorkPlan(1, 4)  # one image: all cores on its forward
    assert plan_workers().threads <= len(os.sched_getaffinity(0))
    with pytest.raises(ValueError):
        plan_workers(0)


def test_consecutive_groups():
    groups = list(consecutive_groups("aabbbbc", key=str, size=3))
    assert groups == [["a", "a"], ["b", "b", "b"], ["b"], ["c"]]


def test_batched_views_of_several_images_equal_one_image_at_a_time():
    torch.manual_seed(0)
    model = DeepLabV1(num_classes=3, width_mult=0.0625).eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((32, 40), (32, 40), (24, 40))]
    views = [test_deeplab.multiscale_views(image, (0.5, 1.0), flip=True) for image in images]
    many = forward_views_many(model, views, [image.shape[:2] for image in images], align_corners=True)
    for image, image_views, maps in zip(images, views, many):
        one = forward_views(model, image_views, image.shape[:2], align_corners=True)
        torch.testing.assert_close(maps, one, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def seeds_setup(tmp_path_factory) -> dict[str, str]:
    root = str(tmp_path_factory.mktemp("parallel") / "syn")
    generate_dataset(root, num_train=5, num_val=1, image_size=SIZE, num_classes=3, seed=5)
    prepare_voc(get_dataset_info("synthetic", root), workers=1)
    torch.manual_seed(0)
    weights = os.path.join(root, "avc.pth")
    torch.save({"model": AVCNet(num_classes=3, width_mult=0.0625).state_dict(), "args": {"width_mult": 0.0625}},
               weights)
    return {"root": root, "weights": weights}


def _seed_outputs(setup: dict[str, str], out: str, *extra: str) -> dict[str, object]:
    root = setup["root"]
    infer_seed.main(["--dataset", "synthetic", "--voc12_root", root, "--weights", setup["weights"],
                     "--infer_list", os.path.join(root, "train.txt"), "--num_workers", "0", "--scales", "1.0", "0.5",
                     "--out_cam", os.path.join(out, "cam"), "--out_crf", os.path.join(out, "crf"), *extra])
    outputs = {}
    for folder, _, names in os.walk(out):
        for name in names:
            if name.endswith(".npy"):
                outputs[os.path.relpath(os.path.join(folder, name), out)] = np.load(os.path.join(folder, name),
                                                                                    allow_pickle=True).item()
    return outputs


def test_in_flight_and_batched_seed_inference_write_the_sequential_outputs(seeds_setup, tmp_path):
    sequential = _seed_outputs(seeds_setup, str(tmp_path / "one"), "--threads", "1")
    in_flight = _seed_outputs(seeds_setup, str(tmp_path / "two"), "--threads", "2")
    batched = _seed_outputs(seeds_setup, str(tmp_path / "batched"), "--threads", "2", "--batch_images", "3")
    ids = read_id_list(os.path.join(seeds_setup["root"], "train.txt"))
    assert len(sequential) == 3 * len(ids)                  # CAM dict + 2 CRF dicts per image
    for name, reference in sequential.items():
        assert sorted(in_flight[name]) == sorted(reference) == sorted(batched[name])
        for key in reference:
            np.testing.assert_array_equal(in_flight[name][key], reference[key])   # same 1-thread forward
            np.testing.assert_allclose(batched[name][key], reference[key], atol=1e-5)
