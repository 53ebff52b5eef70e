"""The synthetic VOC-layout generator: determinism, layout, label properties, class design."""
import os
from collections import Counter

import numpy as np
import pytest

from tool.contract import IGNORE_LABEL
from tool.fileio import DataError, read_id_list, read_label_png, read_rgb_image
from voc12 import layout
from voc12.synthetic import (MAX_CLASSES, class_definitions, class_names, generate_dataset, main)

SMALL = dict(num_train=6, num_val=3, image_size=64, num_classes=5)


def _all_files(root):
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, root)] = handle.read()
    return found


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic") / "root")
    generate_dataset(root, seed=3, **SMALL)
    return root


def test_same_seed_same_bytes_other_seed_differs(small_root, tmp_path):
    generate_dataset(str(tmp_path / "again"), seed=3, **SMALL)
    generate_dataset(str(tmp_path / "other"), seed=4, **SMALL)
    first, again, other = _all_files(small_root), _all_files(str(tmp_path / "again")), _all_files(str(tmp_path / "other"))
    assert first == again
    assert first.keys() == other.keys()
    jpegs = [name for name in first if name.endswith(".jpg")]
    assert all(first[name] != other[name] for name in jpegs)


def test_writes_the_voc_layout(small_root):
    train = read_id_list(layout.split_list_path(small_root, "train"))
    val = read_id_list(layout.split_list_path(small_root, "val"))
    assert len(train) == 6 and len(val) == 3 and not set(train) & set(val)
    names = layout.read_class_names(small_root)
    assert names == class_names(5) and len(names) == 6
    for image_id in train + val:
        image = read_rgb_image(layout.image_path(small_root, image_id))
        assert max(image.shape[:2]) == 64
        for folder in (layout.LABEL_DIR, layout.AUG_LABEL_DIR):
            label = read_label_png(os.path.join(small_root, folder, image_id + ".png"), image.shape[:2])
            assert label.dtype == np.uint8
    assert layout.gt_path(small_root, "x").endswith(os.path.join(layout.AUG_LABEL_DIR, "x.png"))


def test_labels_have_1_to_3_classes_and_255_bands_between_objects(small_root, tmp_path):
    generate_dataset(str(tmp_path / "many"), num_train=30, num_val=1, image_size=64, num_classes=6, seed=0)
    class_counts = Counter()
    for image_id in read_id_list(layout.split_list_path(str(tmp_path / "many"), "train")):
        label = read_label_png(layout.gt_path(str(tmp_path / "many"), image_id))
        values = set(np.unique(label).tolist())
        classes = values - {0, IGNORE_LABEL}
        assert IGNORE_LABEL in values and 0 in values
        assert 1 <= len(classes) <= 3 and max(classes) <= 6
        class_counts.update(classes)
        # The band separates every object: no two different non-ignored values touch.
        for a, b in ((label[1:], label[:-1]), (label[:, 1:], label[:, :-1])):
            touching = (a != b) & (a != IGNORE_LABEL) & (b != IGNORE_LABEL)
            assert not touching.any()
        # The band is thin: most of every class is not ignored.
        for value in classes:
            assert (label == value).sum() >= 20
        assert (label == IGNORE_LABEL).mean() < 0.2
    assert len(class_counts) == 6   # every class appears somewhere in 30 images


@pytest.mark.parametrize("num_classes", range(2, MAX_CLASSES + 1))
def test_class_design_needs_a_combination_of_attributes(num_classes):
    classes = class_definitions(num_classes)
    triples = [(cls.shape, cls.texture, cls.colour) for cls in classes]
    assert len(set(triples)) == num_classes
    assert len({cls.name for cls in classes}) == num_classes
    if num_classes >= 4:
        for attribute in range(3):
            counts = Counter(triple[attribute] for triple in triples)
            assert min(counts.values()) >= 2, (attribute, counts)
    assert class_definitions(num_classes) == classes   # depends on the count only


def test_rerun_removes_stale_files_and_refuses_foreign_folder(tmp_path):
    root = str(tmp_path / "root")
    generate_dataset(root, num_train=4, num_val=2, image_size=48, num_classes=3, seed=0)
    generate_dataset(root, num_train=2, num_val=1, image_size=48, num_classes=3, seed=0)
    assert sorted(os.listdir(os.path.join(root, layout.AUG_LABEL_DIR))) == \
        ["train_00000.png", "train_00001.png", "val_00000.png"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="refusing"):
        generate_dataset(str(foreign), num_train=1, num_val=1, image_size=48, num_classes=3)


def test_cli_rejects_bad_class_count_and_writes_with_prepare(tmp_path):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "bad"), "--num_classes", "21"])
    root = str(tmp_path / "cli")
    assert main(["--out", root, "--num_train", "3", "--num_val", "2", "--image_size", "48", "--prepare"]) == 0
    assert os.path.isfile(os.path.join(root, "cls_labels.npy"))
    assert len(read_id_list(os.path.join(root, "train_aug.txt"))) == 3


# ---------------------------------------------------------------------------- the parts style
def _hsv_of(pixels: np.ndarray) -> np.ndarray:
    import cv2
    hsv = cv2.cvtColor(pixels.reshape(-1, 1, 3).astype(np.uint8), cv2.COLOR_RGB2HSV_FULL).reshape(-1, 3)
    return hsv.astype(np.float32) / 255.0


def test_parts_style_badge_colour_names_the_class_body_does_not(tmp_path):
    """A class is found from its badge's colour alone (a nearest-colour rule over the class
    definitions is right on most objects) while the body pixels of every class look alike."""
    from voc12.synthetic import BADGE_HUES, BADGE_TONES, badge_class_definitions
    root = str(tmp_path / "parts")
    generate_dataset(root, num_train=24, num_val=1, image_size=96, num_classes=6, seed=0, style="parts")
    assert layout.read_class_names(root) == class_names(6, "parts")
    assert _all_files(root) == _all_files(_regenerated(tmp_path))  # deterministic
    classes = badge_class_definitions(6)
    right = total = 0
    body_saturation: dict[int, list[float]] = {}
    for image_id in read_id_list(layout.split_list_path(root, "train")):
        image = read_rgb_image(layout.image_path(root, image_id))
        label = read_label_png(os.path.join(root, layout.LABEL_DIR, image_id + ".png"), image.shape[:2])
        for value in set(np.unique(label)) - {0, IGNORE_LABEL}:
            hsv = _hsv_of(image[label == value])
            saturated = hsv[:, 1] > 0.5  # the badge: the body is a grey checker
            body_saturation.setdefault(int(value), []).append(float(np.median(hsv[~saturated, 1])))
            if saturated.sum() < 5:
                continue  # the badge hidden by another object
            hue, tone = np.median(hsv[saturated, 0]), np.median(hsv[saturated, 2])
            distance = [min(abs(hue - BADGE_HUES[c.colour]), 1 - abs(hue - BADGE_HUES[c.colour]))
                        + abs(tone - np.mean(BADGE_TONES[c.tone])) for c in classes]
            right += int(np.argmin(distance) + 1 == value)
            total += 1
    assert total >= 20 and right / total > 0.9
    # the object is more than its badge: most of its pixels are the grey-scale body
    medians = [np.median(values) for values in body_saturation.values()]
    assert len(medians) >= 4 and max(medians) < 0.2


def _regenerated(tmp_path):
    again = str(tmp_path / "again")
    generate_dataset(again, num_train=24, num_val=1, image_size=96, num_classes=6, seed=0, style="parts")
    return again


def test_parts_style_limits():
    from voc12.synthetic import MAX_PARTS_CLASSES, badge_class_definitions
    names = [cls.name for cls in badge_class_definitions(MAX_PARTS_CLASSES)]
    assert len(set(names)) == MAX_PARTS_CLASSES == 12
    with pytest.raises(ValueError, match="parts style"):
        badge_class_definitions(MAX_PARTS_CLASSES + 1)
    with pytest.raises(ValueError, match="unknown style"):
        class_names(6, "sketch")
