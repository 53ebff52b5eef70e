"""Checked reads and atomic writes of tool/fileio.py and the contract of tool/contract.py."""
import os

import numpy as np
import pytest
from PIL import Image

from tool.contract import VOC_PALETTE, crf_dir, image_ids_in
from tool.fileio import (DataError, atomic_path, load_score_dict, read_id_list, read_label_png,
                         read_rgb_image, require_files, save_npy, save_palette_png)


def test_voc_palette_known_entries():
    palette = VOC_PALETTE.reshape(-1, 3)
    assert palette[0].tolist() == [0, 0, 0]
    assert palette[1].tolist() == [128, 0, 0]        # aeroplane
    assert palette[15].tolist() == [192, 128, 128]   # person
    assert palette[255].tolist() == [224, 224, 192]  # void


def test_crf_dir_matches_seam_naming():
    assert crf_dir("out/crf", 4) == "out/crf_4.0"
    assert crf_dir("out/crf", 24.0) == "out/crf_24.0"


def test_palette_png_round_trip(tmp_path):
    label = np.array([[0, 1, 255], [20, 3, 0]], dtype=np.uint8)
    path = str(tmp_path / "a.png")
    save_palette_png(path, label)
    with Image.open(path) as image:
        assert image.mode == "P"
    np.testing.assert_array_equal(read_label_png(path), label)
    assert image_ids_in(str(tmp_path), ".png") == {"a"}


def test_read_label_png_wrong_size_names_file(tmp_path):
    path = str(tmp_path / "a.png")
    save_palette_png(path, np.zeros((4, 5), np.uint8))
    with pytest.raises(DataError, match=r"a\.png.*4x5.*6x5"):
        read_label_png(path, expected_hw=(6, 5))


def test_corrupt_files_name_the_file(tmp_path):
    jpg = tmp_path / "bad.jpg"
    jpg.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(DataError, match="bad.jpg"):
        read_rgb_image(str(jpg))
    png = tmp_path / "bad.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="bad.png"):
        read_label_png(str(png))
    npy = tmp_path / "bad.npy"
    npy.write_bytes(b"nope")
    with pytest.raises(DataError, match="bad.npy"):
        load_score_dict(str(npy), 20)


def test_score_dict_key_range(tmp_path):
    path = str(tmp_path / "cam.npy")
    save_npy(path, {3: np.ones((2, 2), np.float32), 20: np.zeros((2, 2), np.float32)})
    with pytest.raises(DataError, match="key 20 is outside the class range 0..19"):
        load_score_dict(path, 20)
    # The same keys are valid in a CRF dict (1-based, 0 = background).
    assert sorted(load_score_dict(path, 20, one_based=True)) == [3, 20]


def test_require_files_lists_first_ten_and_count(tmp_path):
    paths = [str(tmp_path / f"img_{index:02d}.jpg") for index in range(13)]
    with pytest.raises(DataError) as error:
        require_files(paths, "images", source="train.txt")
    message = str(error.value)
    assert message.startswith("13 images named in train.txt do not exist")
    assert "img_09.jpg" in message and "img_10.jpg" not in message
    assert "and 3 more" in message


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.npy"
    with pytest.raises(RuntimeError):
        with atomic_path(str(target)) as tmp:
            open(tmp, "wb").write(b"partial")
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []


def test_read_id_list(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("2007_000032\n/JPEGImages/2007_000039.jpg 1\n\n")
    assert read_id_list(str(path)) == ["2007_000032", "2007_000039"]
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        read_id_list(str(tmp_path / "empty.txt"))
