"""refine_mask.py end to end on two tiny images: PNGs, resume, errors, pool vs in-process."""
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import refine_mask
from tool.cam import alpha_for_threshold
from tool.cli import main_exit_code
from tool.contract import VOC_PALETTE, crf_dir
from tool.crf import crf_label, crf_with_alpha
from tool.fileio import read_label_png, read_rgb_image, save_npy, save_rgb_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = ["img_a", "img_b"]
KEYS = {"img_a": [14], "img_b": [2, 11]}


def _blob(height, width, top, left, size):
    yy, xx = np.mgrid[:height, :width]
    distance = np.hypot(yy - (top + size / 2), xx - (left + size / 2))
    return np.clip(1.0 - distance / size, 0.0, 1.0).astype(np.float32)


@pytest.fixture()
def dataset(tmp_path):
    """A VOC-layout root with two images (bright squares on grey) and their CAM dicts."""
    root, cam_dir = tmp_path / "voc", tmp_path / "cam"
    rng = np.random.default_rng(0)
    for index, image_id in enumerate(IDS):
        height, width = 24 + 4 * index, 32
        image = np.full((height, width, 3), 90, np.uint8) + rng.integers(0, 10, (height, width, 3), dtype=np.uint8)
        cams = {}
        for number, key in enumerate(KEYS[image_id]):
            top, left = 4, 4 + 14 * number
            image[top:top + 10, left:left + 10] = (220, 60 + 80 * number, 40)
            cams[key] = _blob(height, width, top, left, 10)
        save_rgb_image(str(root / "JPEGImages" / f"{image_id}.jpg"), image)
        save_npy(str(cam_dir / f"{image_id}.npy"), cams)
    list_path = tmp_path / "list.txt"
    list_path.write_text("\n".join(IDS) + "\n")
    return {"root": str(root), "cam_dir": str(cam_dir), "list": str(list_path), "out": str(tmp_path / "out")}


def _argv(data, *extra):
    return ["--voc12_root", data["root"], "--cam_dir", data["cam_dir"], "--out_dir", data["out"],
            "--list", data["list"], "--num_workers", "1", *extra]


def test_writes_palette_pngs_equal_to_crf_label(dataset):
    refine_mask.main(_argv(dataset))
    alpha = alpha_for_threshold(0.26)
    for image_id in IDS:
        path = os.path.join(dataset["out"], f"{image_id}.png")
        with Image.open(path) as png:
            assert png.mode == "P"
            assert np.array_equal(np.asarray(png.getpalette(), np.uint8), VOC_PALETTE[:len(png.getpalette())])
        label = read_label_png(path)
        image = read_rgb_image(os.path.join(dataset["root"], "JPEGImages", f"{image_id}.jpg"))
        assert label.dtype == np.uint8 and label.shape == image.shape[:2]
        assert set(np.unique(label)) == {0} | {key + 1 for key in KEYS[image_id]}
        cam_dict = np.load(os.path.join(dataset["cam_dir"], f"{image_id}.npy"), allow_pickle=True).item()
        np.testing.assert_array_equal(label, crf_label(image, cam_dict, alpha))
    # The object squares get their class, the corner stays background.
    label_b = read_label_png(os.path.join(dataset["out"], "img_b.png"))
    assert label_b[9, 9] == 3 and label_b[9, 23] == 12 and label_b[-1, -1] == 0


def test_second_run_skips_existing(dataset):
    refine_mask.main(_argv(dataset))
    paths = [os.path.join(dataset["out"], f"{image_id}.png") for image_id in IDS]
    for path in paths:
        os.utime(path, ns=(1, 1))
    refine_mask.main(_argv(dataset))  # nothing to do: nothing rewritten, nothing new
    assert [os.stat(path).st_mtime_ns for path in paths] == [1, 1]
    assert sorted(os.listdir(dataset["out"])) == ["img_a.png", "img_b.png", "refine_mask_settings.json"]
    os.remove(paths[1])
    refine_mask.main(_argv(dataset))  # only the missing one is redone
    assert os.stat(paths[0]).st_mtime_ns == 1 and os.stat(paths[1]).st_mtime_ns > 1


def test_missing_cam_dict_is_listed(dataset, capsys):
    os.remove(os.path.join(dataset["cam_dir"], "img_b.npy"))
    assert main_exit_code(refine_mask.main, _argv(dataset)) == 2
    message = capsys.readouterr().err
    assert "1 CAM dicts" in message and "img_b.npy" in message and "img_a" not in message
    assert not os.path.exists(dataset["out"]) or os.listdir(dataset["out"]) == ["refine_mask_settings.json"]


def test_cam_size_mismatch_names_files(dataset, capsys):
    save_npy(os.path.join(dataset["cam_dir"], "img_a.npy"), {14: np.zeros((5, 5), np.float32)})
    assert main_exit_code(refine_mask.main, _argv(dataset)) == 2
    assert re.search(r"img_a\.npy.*5x5.*24x32", capsys.readouterr().err)


def test_alpha_resolution():
    parser = refine_mask.build_parser()
    base = ["--voc12_root", "r", "--cam_dir", "c", "--out_dir", "o"]
    settings = refine_mask.resolve_settings(parser.parse_args(base), 20)
    assert settings.bg_alpha == pytest.approx(alpha_for_threshold(0.26))
    settings = refine_mask.resolve_settings(parser.parse_args(base + ["--bg_alpha", "24", "--crf_iters", "3"]), 20)
    assert settings.bg_alpha == 24 and settings.crf.iterations == 3
    assert parser.parse_args(base + ["--infer_list", "x.txt"]).list == "x.txt"


def test_subprocess_with_pool_matches_in_process(dataset):
    refine_mask.main(_argv(dataset))
    expected = {image_id: read_label_png(os.path.join(dataset["out"], f"{image_id}.png")) for image_id in IDS}
    dataset["out"] = dataset["out"] + "_pool"
    argv = _argv(dataset)
    argv[argv.index("--num_workers") + 1] = "2"
    result = subprocess.run([sys.executable, "refine_mask.py", *argv], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "configuration" in result.stderr or "configuration" in result.stdout
    for image_id in IDS:
        np.testing.assert_array_equal(read_label_png(os.path.join(dataset["out"], f"{image_id}.png")),
                                      expected[image_id])


def test_out_crf_writes_the_crf_dicts_beside_the_masks(dataset, tmp_path):
    """--out_crf / --crf_alphas: AffinityNet's la/ha dicts from the same CRF code as infer_seed.py."""
    prefix = str(tmp_path / "dicts" / "crf")
    refine_mask.main(_argv(dataset, "--out_crf", prefix, "--crf_alphas", "1.2", "7.1"))
    for image_id in IDS:
        image = read_rgb_image(os.path.join(dataset["root"], "JPEGImages", f"{image_id}.jpg"))
        cam_dict = np.load(os.path.join(dataset["cam_dir"], f"{image_id}.npy"), allow_pickle=True).item()
        for alpha in (1.2, 7.1):
            written = np.load(os.path.join(crf_dir(prefix, alpha), f"{image_id}.npy"), allow_pickle=True).item()
            expected = crf_with_alpha(image, cam_dict, alpha)
            assert sorted(written) == sorted(expected) == [0] + [key + 1 for key in KEYS[image_id]]
            for key in expected:
                np.testing.assert_allclose(written[key], expected[key], rtol=1e-6)
    # A dict folder removed by hand makes its images pending again, masks kept.
    shutil.rmtree(crf_dir(prefix, 7.1))
    refine_mask.main(_argv(dataset, "--out_crf", prefix, "--crf_alphas", "1.2", "7.1"))
    assert all(os.path.isfile(os.path.join(crf_dir(prefix, 7.1), f"{image_id}.npy")) for image_id in IDS)


def test_out_crf_needs_its_alphas(dataset, tmp_path, capsys):
    assert main_exit_code(refine_mask.main, _argv(dataset, "--out_crf", str(tmp_path / "crf"))) == 2
    assert "--out_crf and --crf_alphas go together" in capsys.readouterr().err
