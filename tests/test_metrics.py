"""tool/metrics.py: hand counts, SEAM's quirks, the reference vectors, the one-pass curve."""
import numpy as np
import pytest

from tool.metrics import ConfusionMatrix, CurveConfusion, iou_from_confusion, scores_from_counts
from tests.reference_data import load_reference



def reference_counts(pred: np.ndarray, gt: np.ndarray, num_classes: int):
    """SEAM's do_python_eval counting loop, written out independently of the bincount code."""
    cal = gt < 255
    mask = (pred == gt) * cal
    tp = np.array([np.sum((gt == i) * mask) for i in range(num_classes)], dtype=np.int64)
    p = np.array([np.sum((pred == i) * cal) for i in range(num_classes)], dtype=np.int64)
    t = np.array([np.sum((gt == i) * cal) for i in range(num_classes)], dtype=np.int64)
    return tp, p, t


def hand_example():
    # 2x3 image, 3 classes: one void gt pixel, one prediction outside the class range (255).
    gt = np.array([[0, 1, 1], [2, 255, 1]], dtype=np.uint8)
    pred = np.array([[0, 1, 2], [2, 0, 255]], dtype=np.uint8)
    return pred, gt


def test_hand_counted_2x3_image():
    pred, gt = hand_example()
    matrix = ConfusionMatrix(3)
    matrix.update(pred, gt)
    scores = matrix.scores()
    # Valid pixels: (g0,p0) (g1,p1) (g1,p2) (g2,p2) (g1,p255); the void pixel predicted 0 is ignored.
    assert scores["true_positives"].tolist() == [1, 1, 1]
    assert scores["predicted"].tolist() == [1, 1, 2]
    assert scores["target"].tolist() == [1, 3, 1]          # the 255 prediction is a FN of class 1
    assert matrix.iou() == pytest.approx([1.0, 1 / 3, 1 / 2], rel=1e-9)
    assert matrix.mean_iou() == pytest.approx(11 / 18, rel=1e-9)
    assert matrix.fp_ratio() == pytest.approx([0.0, 0.0, 1 / 2], abs=1e-9)
    assert matrix.fn_ratio() == pytest.approx([0.0, 2 / 3, 0.0], abs=1e-9)
    np.testing.assert_array_equal(matrix.matrix, [[1, 0, 0], [0, 1, 1], [0, 0, 1]])


def test_seam_epsilon_is_reproduced():
    matrix = ConfusionMatrix(2)
    matrix.update(np.array([1, 1, 0]), np.array([1, 0, 0]))
    # IoU of class 1 = 1 / (1 + 2 - 1 + 1e-10): not exactly 0.5.
    assert matrix.iou()[1] == 1 / (2 + 1e-10)
    assert matrix.iou()[1] != 0.5


def test_absent_class_zero_and_ignore():
    pred, gt = hand_example()
    matrix = ConfusionMatrix(4)   # class 3 occurs in neither prediction nor gt
    matrix.update(pred, gt)
    assert matrix.iou("zero")[3] == 0.0
    assert matrix.mean_iou("zero") == pytest.approx((1 + 1 / 3 + 1 / 2) / 4, rel=1e-9)
    assert np.isnan(matrix.iou("ignore")[3])
    assert matrix.mean_iou("ignore") == pytest.approx(11 / 18, rel=1e-9)
    results = matrix.results(["bg", "a", "b", "c"], absent="ignore")
    assert results["present"] == [True, True, True, False]
    with pytest.raises(ValueError):
        matrix.mean_iou("skip")


def test_gt_outside_range_counts_prediction_as_false_positive():
    matrix = ConfusionMatrix(3)
    matrix.update(np.array([[1, 1]]), np.array([[7, 1]]))
    scores = matrix.scores()
    assert scores["predicted"].tolist() == [0, 2, 0]
    assert scores["target"].tolist() == [0, 1, 0]
    assert scores["true_positives"].tolist() == [0, 1, 0]


def test_matches_reference_loop_on_random_labels():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 6, size=(17, 23)).astype(np.uint8)
    gt[rng.random(gt.shape) < 0.1] = 255
    pred = rng.integers(0, 7, size=gt.shape).astype(np.uint8)   # 6 is outside the class range
    pred[rng.random(gt.shape) < 0.05] = 255
    matrix = ConfusionMatrix(6)
    matrix.update(pred, gt)
    scores = matrix.scores()
    tp, p, t = reference_counts(pred, gt, 6)
    np.testing.assert_array_equal(scores["true_positives"], tp)
    np.testing.assert_array_equal(scores["predicted"], p)
    np.testing.assert_array_equal(scores["target"], t)


def test_merge_equals_one_matrix_and_checks_classes():
    rng = np.random.default_rng(1)
    gts = [rng.integers(0, 4, size=(5, 7)) for _ in range(3)]
    preds = [rng.integers(0, 4, size=(5, 7)) for _ in range(3)]
    whole = ConfusionMatrix(4)
    parts = [ConfusionMatrix(4) for _ in range(3)]
    for pred, gt, part in zip(preds, gts, parts):
        whole.update(pred, gt)
        part.update(pred, gt)
    merged = ConfusionMatrix(4).merge(parts[0]).merge(parts[1]).merge(parts[2])
    np.testing.assert_array_equal(merged.counts, whole.counts)
    assert merged.counts.dtype == np.int64
    with pytest.raises(ValueError):
        merged.merge(ConfusionMatrix(5))
    with pytest.raises(ValueError):
        merged.update(np.zeros((2, 2)), np.zeros((2, 3)))


def test_torch_update_and_single_rank_all_reduce(tmp_path):
    import torch
    import torch.distributed as dist

    pred, gt = hand_example()
    numpy_matrix = ConfusionMatrix(3)
    numpy_matrix.update(pred, gt)
    torch_matrix = ConfusionMatrix(3)
    torch_matrix.update(torch.from_numpy(pred), torch.from_numpy(gt))
    np.testing.assert_array_equal(torch_matrix.counts, numpy_matrix.counts)

    torch_matrix.all_reduce()   # no process group: unchanged
    np.testing.assert_array_equal(torch_matrix.counts, numpy_matrix.counts)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch_matrix.all_reduce()
    finally:
        dist.destroy_process_group()
    np.testing.assert_array_equal(torch_matrix.counts, numpy_matrix.counts)


def test_iou_from_confusion_square_matrix():
    iou = iou_from_confusion(np.array([[3, 1], [0, 2]]))
    assert iou == pytest.approx([3 / 4, 2 / 3], rel=1e-9)
    stacked = iou_from_confusion(np.array([[[3, 1], [0, 2]], [[0, 0], [0, 5]]]))
    assert stacked.shape == (2, 2)
    assert stacked[1].tolist() == [0.0, 5 / (5 + 1e-10)]


def test_reference_vectors_png_and_curve():
    ref = load_reference("eval.npz")
    matrix = ConfusionMatrix(21)
    curve = CurveConfusion(21, ref["thresholds"])
    for index in range(len(ref["names"])):
        matrix.update(ref[f"pred_{index}"], ref[f"gt_{index}"])
        cams = dict(zip(ref[f"cam_keys_{index}"].tolist(), ref[f"cam_values_{index}"]))
        curve.update(cams, ref[f"gt_{index}"])
    png = matrix.results()
    np.testing.assert_array_equal(png["true_positives"], ref["png_TP"])
    np.testing.assert_array_equal(png["predicted"], ref["png_P"])
    np.testing.assert_array_equal(png["target"], ref["png_T"])
    np.testing.assert_array_equal(png["iou_percent"], ref["png_iou_percent"])   # exact, not approx
    assert png["miou_percent"] == float(ref["png_miou_percent"])
    scores = curve.scores()
    np.testing.assert_array_equal(scores["true_positives"], ref["npy_TP"])
    np.testing.assert_array_equal(scores["predicted"], ref["npy_P"])
    np.testing.assert_array_equal(scores["target"], ref["npy_T"])
    results = curve.results()
    np.testing.assert_array_equal(results["miou_percent"], ref["npy_miou_percent"])
    np.testing.assert_array_equal(scores["iou"] * 100, ref["npy_iou_percent"])
    assert results["best_threshold"] == 0.36
    assert results["best_miou"] * 100 == pytest.approx(37.14763859296162, abs=1e-12)


def per_threshold_loop(cam_list, gt_list, thresholds, num_classes):
    """The straightforward way: one argmax over the stacked tensor per threshold (SEAM)."""
    counts = []
    for threshold in thresholds:
        tp = np.zeros(num_classes, np.int64)
        p = np.zeros(num_classes, np.int64)
        t = np.zeros(num_classes, np.int64)
        for cams, gt in zip(cam_list, gt_list):
            tensor = np.zeros((num_classes,) + gt.shape, np.float32)
            for key, value in cams.items():
                tensor[key + 1] = value
            tensor[0] = threshold
            pred = np.argmax(tensor, axis=0).astype(np.uint8)
            image_counts = reference_counts(pred, gt, num_classes)
            tp, p, t = tp + image_counts[0], p + image_counts[1], t + image_counts[2]
        counts.append((tp, p, t))
    return counts


def random_cams_with_ties(rng, num_classes, shape):
    """CAMs on a 0.01 grid (ties with each other and with the thresholds), some all-zero pixels."""
    keys = rng.choice(num_classes - 1, size=rng.integers(1, 4), replace=False)
    cams = {}
    for key in keys:
        grid = rng.integers(0, 70, size=shape)
        grid[rng.random(shape) < 0.3] = 0
        cams[int(key)] = (grid / 100.0).astype(np.float32)   # float32(k/100) equals float32 of a threshold
    first = int(keys[0])
    if len(keys) > 1:   # force exact ties between two classes on a block of pixels
        cams[int(keys[1])][:2] = cams[first][:2]
    return cams


@pytest.mark.parametrize("thresholds", [
    [index / 100.0 for index in range(60)],
    [0.3, 0.05, 0.3, 0.0, 0.59, 0.41, 0.12],          # unsorted, with a duplicate
])
def test_one_pass_curve_equals_per_threshold_loop(thresholds):
    rng = np.random.default_rng(42)
    num_classes = 6
    gt_list, cam_list = [], []
    for _ in range(4):
        shape = (int(rng.integers(5, 12)), int(rng.integers(5, 12)))
        gt = rng.integers(0, num_classes, size=shape).astype(np.uint8)
        gt[rng.random(shape) < 0.15] = 255
        gt_list.append(gt)
        cam_list.append(random_cams_with_ties(rng, num_classes, shape))
    cam_list.append({})   # an empty dict predicts background everywhere
    gt_list.append(rng.integers(0, num_classes, size=(4, 5)).astype(np.uint8))
    curve = CurveConfusion(num_classes, thresholds)
    for cams, gt in zip(cam_list, gt_list):
        curve.update(cams, gt)
    scores = curve.scores()
    expected = per_threshold_loop(cam_list, gt_list, thresholds, num_classes)
    for index, (tp, p, t) in enumerate(expected):
        np.testing.assert_array_equal(scores["true_positives"][index], tp)
        np.testing.assert_array_equal(scores["predicted"][index], p)
        np.testing.assert_array_equal(scores["target"][index], t)
        single = curve.matrix(index)
        assert single.mean_iou() == float(scores["miou"][index])


def test_curve_rejects_bad_keys_and_merges():
    curve = CurveConfusion(3, [0.1, 0.2])
    gt = np.zeros((2, 2), np.uint8)
    with pytest.raises(ValueError, match="key 2"):
        curve.update({2: np.ones((2, 2), np.float32)}, gt)
    with pytest.raises(ValueError, match="shape"):
        curve.update({0: np.ones((3, 2), np.float32)}, gt)
    curve.update({0: np.full((2, 2), 0.15, np.float32)}, gt)
    other = CurveConfusion(3, [0.1, 0.2]).merge(curve)
    np.testing.assert_array_equal(other.counts, curve.counts)
    # 0.15 > 0.1: class 1 predicted on 4 background pixels; 0.15 <= 0.2: all background.
    assert other.counts[0, 0, 1] == 4 and other.counts[1, 0, 0] == 4
    with pytest.raises(ValueError):
        other.merge(CurveConfusion(3, [0.1, 0.3]))


def test_scores_keep_leading_dimensions():
    counts = np.zeros((3, 4, 4), np.int64)
    counts[:, 0, 0] = [1, 2, 3]
    scores = scores_from_counts(counts, "ignore")
    assert scores["iou"].shape == (3, 3)
    assert scores["miou"].tolist() == [1 / (1 + 1e-10), 2 / (2 + 1e-10), 3 / (3 + 1e-10)]
