"""Dataset registry, the prepare steps (VOC layout and COCO) and the torch datasets."""
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from coco14.layout import COCO_CATEGORY_IDS, COCO_CLASS_NAMES
from coco14.prepare import prepare_coco
from tool.cli import main_exit_code
from tool.fileio import DataError, read_id_list, read_label_png, save_palette_png, save_rgb_image
from voc12 import layout
from voc12.data import (ClassificationDataset, MultiScaleDataset, SegmentationDataset, check_images,
                        collate_single)
from voc12.prepare import main as prepare_main
from voc12.prepare import prepare_voc
from voc12.synthetic import generate_dataset
from workflow.datasets import DATASET_NAMES, get_dataset_info

NUM_CLASSES = 4


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """A prepared synthetic root (read-only for the tests: copy it before changing it)."""
    root = str(tmp_path_factory.mktemp("data") / "synthetic")
    generate_dataset(root, num_train=8, num_val=4, image_size=48, num_classes=NUM_CLASSES, seed=1)
    prepare_voc(get_dataset_info("synthetic", root))
    return root


def _copy(root, tmp_path):
    target = str(tmp_path / "copy")
    shutil.copytree(root, target)
    return target


# ------------------------------------------------------------------ registry
def test_registry_paths(tmp_path):
    assert DATASET_NAMES == ("voc12", "coco14", "synthetic")
    voc = get_dataset_info("voc12", str(tmp_path))
    assert voc.num_classes == 20 and voc.class_names[0] == "background" and voc.num_labels == 21
    assert voc.image_path("2007_000032") == os.path.join(str(tmp_path), "JPEGImages", "2007_000032.jpg")
    assert voc.gt_path("a") == os.path.join(str(tmp_path), "SegmentationClass", "a.png")
    os.makedirs(tmp_path / "SegmentationClassAug")
    assert get_dataset_info("voc12", str(tmp_path)).gt_path("a").endswith(os.path.join("SegmentationClassAug", "a.png"))
    assert voc.list_path("train_aug") == os.path.join(str(tmp_path), "train_aug.txt")
    assert get_dataset_info("voc12", str(tmp_path), list_dir="/l").cls_labels_path == "/l/cls_labels.npy"
    coco = get_dataset_info("coco14", str(tmp_path))
    assert coco.num_classes == 80
    assert coco.image_path("COCO_val2014_000000000042") == \
        os.path.join(str(tmp_path), "val2014", "COCO_val2014_000000000042.jpg")
    assert coco.gt_path("COCO_val2014_000000000042").endswith(os.path.join("SegmentationClass", "COCO_val2014_000000000042.png"))
    with pytest.raises(DataError, match="not a COCO 2014 image id"):
        coco.image_path("2007_000032")
    with pytest.raises(ValueError):
        get_dataset_info("cityscapes", str(tmp_path))
    with pytest.raises(ValueError):
        voc.list_path("trainval")


def test_missing_lists_and_labels_name_the_prepare_command(tmp_path):
    voc = get_dataset_info("voc12", str(tmp_path))
    with pytest.raises(DataError, match=r"cls_labels\.npy.*python -m voc12\.prepare --voc12_root"):
        voc.load_cls_labels()
    with pytest.raises(DataError, match=r"train\.txt.*voc12\.prepare"):
        voc.read_list("train")
    with pytest.raises(DataError, match="class_names.txt"):
        get_dataset_info("synthetic", str(tmp_path))


def test_coco_category_map_is_contiguous():
    assert len(COCO_CLASS_NAMES) == 81 and len(COCO_CATEGORY_IDS) == 80
    assert sorted(COCO_CATEGORY_IDS.values()) == list(range(1, 81))
    assert COCO_CLASS_NAMES[COCO_CATEGORY_IDS[13]] == "stop sign"
    assert COCO_CLASS_NAMES[COCO_CATEGORY_IDS[90]] == "toothbrush"


# ------------------------------------------------------------------ prepare
def test_prepare_writes_lists_and_cls_labels_from_the_pngs(generated):
    info = get_dataset_info("synthetic", generated)
    assert read_id_list(info.list_path("train")) == read_id_list(layout.split_list_path(generated, "train"))
    assert read_id_list(info.list_path("val")) == read_id_list(layout.split_list_path(generated, "val"))
    labelled = sorted(name[:-4] for name in os.listdir(os.path.join(generated, "SegmentationClassAug")))
    val = set(read_id_list(info.list_path("val")))
    assert read_id_list(info.list_path("train_aug")) == [i for i in labelled if i not in val]
    assert not os.path.exists(info.list_path("test"))
    cls_labels = info.load_cls_labels()
    assert sorted(cls_labels) == labelled
    for image_id, value in cls_labels.items():
        present = set(np.unique(read_label_png(info.gt_path(image_id))).tolist()) - {0, 255}
        assert value.dtype == np.float32 and value.shape == (NUM_CLASSES,)
        assert set((np.flatnonzero(value) + 1).tolist()) == present


def test_prepare_out_dir_and_test_list(generated, tmp_path):
    root = _copy(generated, tmp_path)
    with open(layout.split_list_path(root, "test"), "w") as handle:
        handle.write("val_00000\n")
    out = str(tmp_path / "lists")
    assert prepare_main(["--voc12_root", root, "--dataset", "synthetic", "--out_dir", out, "--workers", "1"]) == 0
    assert read_id_list(os.path.join(out, "test.txt")) == ["val_00000"]
    assert len(get_dataset_info("synthetic", root, list_dir=out).load_cls_labels()) == 12


def test_prepare_missing_images_reports_count_and_first_names(generated, tmp_path, capsys):
    root = _copy(generated, tmp_path)
    with open(layout.split_list_path(root, "train"), "a") as handle:
        handle.writelines(f"ghost_{index:02d}\n" for index in range(12))
    for index in range(12):   # labels exist, images do not
        save_palette_png(os.path.join(root, "SegmentationClassAug", f"ghost_{index:02d}.png"), np.ones((4, 4), np.uint8))
    with pytest.raises(DataError) as error:
        prepare_voc(get_dataset_info("synthetic", root))
    message = str(error.value)
    assert message.startswith("12 images named in") and "train.txt" in message
    assert "ghost_00.jpg" in message and "ghost_09.jpg" in message and "ghost_10.jpg" not in message
    assert "and 2 more" in message
    assert main_exit_code(prepare_main, ["--voc12_root", root, "--dataset", "synthetic"]) == 2
    assert "12 images" in capsys.readouterr().err


def test_prepare_warns_about_labels_without_foreground(generated, tmp_path, caplog):
    root = _copy(generated, tmp_path)
    label_path = os.path.join(root, "SegmentationClassAug", "train_00002.png")
    label = read_label_png(label_path)
    save_palette_png(label_path, np.where(label == 255, 255, 0).astype(np.uint8))
    info = get_dataset_info("synthetic", root)
    with caplog.at_level(logging.WARNING):
        lists = prepare_voc(info)
    assert "train_00002" in caplog.text and "no foreground" in caplog.text
    assert "train_00002" not in lists["train"] and "train_00002" not in lists["train_aug"]
    assert read_id_list(os.path.join(root, "no_foreground.txt")) == ["train_00002"]
    assert not info.load_cls_labels()["train_00002"].any()


def test_prepare_rejects_label_values_beyond_the_classes(generated, tmp_path):
    root = _copy(generated, tmp_path)
    label_path = os.path.join(root, "SegmentationClassAug", "val_00001.png")
    save_palette_png(label_path, np.full(read_label_png(label_path).shape, 9, np.uint8))
    with pytest.raises(DataError, match=r"val_00001\.png.*\[9\]"):
        prepare_voc(get_dataset_info("synthetic", root))


def test_coco_prepare_on_a_tiny_root(tmp_path):
    root = str(tmp_path)
    samples = {"COCO_train2014_000000000009": [0, 1, 80, 255], "COCO_train2014_000000000025": [0, 24],
               "COCO_val2014_000000000042": [17, 255]}
    for image_id, values in samples.items():
        save_rgb_image(os.path.join(root, image_id.split("_")[1], image_id + ".jpg"), np.zeros((2, 2, 3), np.uint8))
        save_palette_png(os.path.join(root, "SegmentationClass", image_id + ".png"),
                         np.asarray(values, np.uint8).reshape(2, 2) if len(values) == 4 else
                         np.asarray(values * 2, np.uint8).reshape(2, 2))
    save_palette_png(os.path.join(root, "SegmentationClass", "COCO_val2014_000000000073.png"), np.ones((2, 2), np.uint8))
    save_rgb_image(os.path.join(root, "val2014", "COCO_val2014_000000000074.jpg"), np.zeros((2, 2, 3), np.uint8))
    info = get_dataset_info("coco14", root)
    lists = prepare_coco(info)
    assert lists == {"train": ["COCO_train2014_000000000009", "COCO_train2014_000000000025"],
                     "val": ["COCO_val2014_000000000042"]}
    assert read_id_list(info.list_path("val")) == ["COCO_val2014_000000000042"]
    cls_labels = info.load_cls_labels()
    assert sorted(cls_labels) == sorted(samples)
    assert np.flatnonzero(cls_labels["COCO_train2014_000000000009"]).tolist() == [0, 79]
    assert np.flatnonzero(cls_labels["COCO_train2014_000000000025"]).tolist() == [23]
    assert np.flatnonzero(cls_labels["COCO_val2014_000000000042"]).tolist() == [16]


# ------------------------------------------------------------------ torch datasets
def test_classification_dataset_is_deterministic_per_epoch(generated):
    info = get_dataset_info("synthetic", generated)
    ids = info.read_list("train")
    dataset = ClassificationDataset(info, ids, info.load_cls_labels(), crop_size=40, resize_long=(40, 60), seed=5)
    image_id, image, label = dataset[1]
    assert image_id == ids[1] and image.shape == (3, 40, 40) and image.dtype == torch.float32
    assert label.shape == (NUM_CLASSES,) and label.sum() >= 1
    torch.testing.assert_close(dataset[1][1], image)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[1][1], image)
    loaded = [batch[1] for batch in DataLoader(dataset, batch_size=2, num_workers=2)]
    torch.testing.assert_close(torch.cat(loaded), torch.stack([dataset[i][1] for i in range(len(dataset))]))
    plain = ClassificationDataset(info, ids, info.load_cls_labels(), crop_size=40, augment=False)
    assert plain[0][1].shape == (3, 40, 40)


def test_datasets_reject_empty_class_labels_and_missing_images(generated):
    info = get_dataset_info("synthetic", generated)
    ids = info.read_list("train")
    cls_labels = info.load_cls_labels()
    cls_labels[ids[3]] = np.zeros(NUM_CLASSES, np.float32)
    with pytest.raises(DataError, match=rf"{ids[3]}\.jpg: empty class label"):
        ClassificationDataset(info, ids, cls_labels)
    with pytest.raises(DataError, match=rf"{ids[3]}\.jpg: empty class label"):
        MultiScaleDataset(info, ids, cls_labels)
    with pytest.raises(DataError, match="2 images named in my_list.txt"):
        check_images(info, ids + ["nope_1", "nope_2"], source="my_list.txt")
    with pytest.raises(DataError, match="no class label for 1 images"):
        ClassificationDataset(info, ids + ["val_00000"], {i: cls_labels[i] for i in ids if i != ids[3]} | {ids[3]: np.ones(NUM_CLASSES)})


def test_corrupt_jpeg_raises_data_error(generated, tmp_path):
    root = _copy(generated, tmp_path)
    info = get_dataset_info("synthetic", root)
    with open(info.image_path("train_00000"), "wb") as handle:
        handle.write(b"\xff\xd8 not a jpeg")
    labels = info.load_cls_labels()
    assert MultiScaleDataset(info, ["train_00001"], labels, scales=(1.0,))[0]["image"].shape[2] == 3
    # Found when the dataset is made (every listed image decodes), before any compute.
    with pytest.raises(DataError, match=r"train_00000\.jpg: cannot decode"):
        MultiScaleDataset(info, ["train_00000", "train_00001"], labels, scales=(1.0,))


def test_multiscale_views_and_collate(generated):
    info = get_dataset_info("synthetic", generated)
    ids = info.read_list("val")
    dataset = MultiScaleDataset(info, ids, info.load_cls_labels(), scales=(0.5, 1.0, 1.5))
    item = next(iter(DataLoader(dataset, batch_size=1, collate_fn=collate_single)))
    height, width = item["image"].shape[:2]
    assert item["id"] == ids[0] and item["image"].dtype == np.uint8
    for scale, views in zip((0.5, 1.0, 1.5), item["views"]):
        assert views.shape == (2, 3, round(height * scale), round(width * scale))
        torch.testing.assert_close(views[1], views[0].flip(-1))
    assert item["label"].shape == (NUM_CLASSES,)
    with pytest.raises(ValueError):
        collate_single([item, item])


def test_segmentation_dataset_crops_with_255_and_checks_labels(generated, tmp_path):
    info = get_dataset_info("synthetic", generated)
    ids = info.read_list("train")
    dataset = SegmentationDataset(info, ids, crop_size=80, scale_range=(0.9, 1.1), seed=2)
    image_id, image, label = dataset[0]
    assert image.shape == (3, 80, 80) and label.shape == (80, 80) and label.dtype == torch.int64
    # A ~48 px image in an 80 px crop: whole padded rows and columns, label 255, image 0 (the mean).
    padded_rows, padded_cols = (label == 255).all(dim=1), (label == 255).all(dim=0)
    assert padded_rows.sum() >= 20 and padded_cols.sum() >= 20
    assert torch.all(image[:, padded_rows] == 0) and torch.all(image[:, :, padded_cols] == 0)
    assert torch.any(image != 0)
    whole = SegmentationDataset(info, ids, augment=False)
    _, image, label = whole[0]
    assert image.shape[1:] == label.shape == read_label_png(info.gt_path(ids[0])).shape

    pseudo = tmp_path / "pseudo"
    for image_id in ids:
        save_palette_png(str(pseudo / f"{image_id}.png"), np.zeros((48, 48), np.uint8))
    save_palette_png(str(pseudo / f"{ids[0]}.png"), np.zeros((10, 12), np.uint8))
    dataset = SegmentationDataset(info, ids, label_dir=str(pseudo))
    with pytest.raises(DataError, match=rf"{ids[0]}\.png: label size 10x12 does not match image .*{ids[0]}\.jpg size"):
        dataset[0]
    os.remove(pseudo / f"{ids[1]}.png")
    os.remove(pseudo / f"{ids[2]}.png")
    with pytest.raises(DataError, match=r"2 label maps named in"):
        SegmentationDataset(info, ids, label_dir=str(pseudo))
