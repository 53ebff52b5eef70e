"""One bincount confusion matrix, shared by evaluation, testing and validation.

Counting rule (SEAM's ``evaluation.py`` ``do_python_eval``, reproduced exactly):

* ground-truth pixels equal to 255 (void) are ignored entirely;
* a prediction outside ``0..num_classes-1`` (e.g. 255) belongs to no class's P, but it still
  counts in T of its gt class, i.e. it is a false negative;
* a gt value outside the class range that is not 255 belongs to no class's T, but the
  prediction there still counts in P (a false positive).

To keep both out-of-range cases exact, the counts are an ``(n+1) x (n+1)`` int64 matrix
(rows = gt, columns = prediction); the extra last row/column collects the out-of-range values.

Scores use SEAM's definitions, including its epsilon::

    IoU = TP / (T + P - TP + 1e-10)      FP = (P - TP) / (T + P - TP + 1e-10)
                                          FN = (T - TP) / (T + P - TP + 1e-10)

A class absent from both prediction and gt (T = P = 0) has IoU 0. With ``absent='zero'``
(the reference, the default) it still enters the mean over all classes, which pulls the mIoU
down on subsets where some classes never occur. ``absent='ignore'`` (the fix) reports such
classes as NaN and averages only over classes present in the gt or the prediction.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from tool.contract import IGNORE_LABEL

# SEAM adds this to every denominator; it shifts every IoU slightly (reproduced on purpose).
IOU_EPSILON = 1e-10
ABSENT_MODES = ("zero", "ignore")
# How a class absent from both prediction and ground truth is counted: one sentence, used by --help.
ABSENT_HELP = ("A class absent from both prediction and ground truth has IoU 0: with 'zero' "
               "(the reference behaviour of SEAM, default) it is still averaged into the mIoU over "
               "all classes; with 'ignore' it is left out of the mean (reported as nan).")


def check_absent(absent: str) -> None:
    """Refuse an ``absent`` mode outside ``ABSENT_MODES``."""
    if absent not in ABSENT_MODES:
        raise ValueError(f"absent must be one of {ABSENT_MODES}, got {absent!r}")


def class_counts(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(TP, P, T) per class from ``(..., n+1, n+1)`` counts; each has shape ``(..., n)``."""
    num_classes = counts.shape[-1] - 1
    inner = counts[..., :num_classes, :num_classes]
    true_positives = np.diagonal(inner, axis1=-2, axis2=-1).copy()
    predicted = counts[..., :, :num_classes].sum(axis=-2)   # includes the out-of-range gt row
    target = counts[..., :num_classes, :].sum(axis=-1)      # includes the out-of-range pred column
    return true_positives, predicted, target


def scores_from_counts(counts: np.ndarray, absent: str = "zero") -> dict[str, np.ndarray]:
    """Per-class IoU, FP and FN ratios and the mIoU from ``(..., n+1, n+1)`` counts.

    Leading dimensions (e.g. one matrix per threshold) are kept. Returns float64 arrays
    ``iou``, ``fp_ratio``, ``fn_ratio`` of shape ``(..., n)``, ``miou`` of shape ``(...)``,
    the int64 ``true_positives``, ``predicted``, ``target`` and the bool ``present``.
    """
    check_absent(absent)
    true_positives, predicted, target = class_counts(counts)
    # Integer union first, then + epsilon in float64: the same operations as SEAM's Python ints.
    union = (target + predicted - true_positives) + IOU_EPSILON
    iou = true_positives / union
    fp_ratio = (predicted - true_positives) / union
    fn_ratio = (target - true_positives) / union
    present = (target + predicted) > 0
    if absent == "zero":
        miou = np.mean(iou, axis=-1)
    else:
        iou = np.where(present, iou, np.nan)
        fp_ratio = np.where(present, fp_ratio, np.nan)
        fn_ratio = np.where(present, fn_ratio, np.nan)
        num_present = present.sum(axis=-1)
        total = np.where(present, iou, 0.0).sum(axis=-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            miou = np.where(num_present > 0, total / np.maximum(num_present, 1), np.nan)
    return {"iou": iou, "miou": miou, "fp_ratio": fp_ratio, "fn_ratio": fn_ratio,
            "true_positives": true_positives, "predicted": predicted, "target": target,
            "present": present}


def iou_from_confusion(matrix: np.ndarray, absent: str = "zero") -> np.ndarray:
    """Per-class IoU (SEAM's epsilon) from a square ``(..., n, n)`` gt-by-prediction matrix."""
    matrix = np.asarray(matrix, dtype=np.int64)
    padded = np.zeros(matrix.shape[:-2] + (matrix.shape[-2] + 1, matrix.shape[-1] + 1), np.int64)
    padded[..., :-1, :-1] = matrix
    return scores_from_counts(padded, absent)["iou"]


def _results_dict(scores: Mapping[str, np.ndarray], class_names: Sequence[str], absent: str) -> dict[str, Any]:
    """Plain-Python results (JSON-ready apart from NaN) for one matrix."""
    iou = scores["iou"]
    miou = float(scores["miou"])
    return {
        "class_names": list(class_names),
        "absent": absent,
        "iou": iou.tolist(),
        "miou": miou,
        # SEAM's loglist: {category: IoU * 100, 'mIoU': mIoU * 100}.
        "iou_percent": (iou * 100).tolist(),
        "miou_percent": miou * 100,
        "fp_ratio": scores["fp_ratio"].tolist(),
        "fn_ratio": scores["fn_ratio"].tolist(),
        "true_positives": scores["true_positives"].tolist(),
        "predicted": scores["predicted"].tolist(),
        "target": scores["target"].tolist(),
        "present": scores["present"].tolist(),
    }


def default_class_names(num_classes: int) -> list[str]:
    return ["background"] + [f"class_{index}" for index in range(1, num_classes)]


class ConfusionMatrix:
    """Pixel confusion counts over ``num_classes`` classes (background included).

    ``counts`` is an int64 ``(n+1, n+1)`` matrix, rows = gt, columns = prediction; the last
    row/column hold gt/prediction values outside the class range (see the module docstring).
    """

    def __init__(self, num_classes: int, counts: np.ndarray | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        size = self.num_classes + 1
        if counts is None:
            self.counts = np.zeros((size, size), dtype=np.int64)
        else:
            counts = np.asarray(counts)
            if counts.shape != (size, size):
                raise ValueError(f"counts must have shape {(size, size)}, got {counts.shape}")
            self.counts = counts.astype(np.int64, copy=True)

    # ------------------------------------------------------------------ accumulation
    def update(self, pred: Any, gt: Any) -> None:
        """Add one prediction/gt pair (numpy arrays or torch tensors of equal shape).

        Torch tensors are counted on their own device (e.g. validation on the GPU).
        """
        if tuple(pred.shape) != tuple(gt.shape):
            raise ValueError(f"prediction shape {tuple(pred.shape)} differs from gt shape {tuple(gt.shape)}")
        if type(pred).__module__.startswith("torch") or type(gt).__module__.startswith("torch"):
            self._update_torch(pred, gt)
            return
        n = self.num_classes
        gt = np.asarray(gt).reshape(-1)
        pred = np.asarray(pred).reshape(-1)
        valid = gt != IGNORE_LABEL
        gt_valid = gt[valid].astype(np.int64)
        pred_valid = pred[valid].astype(np.int64)
        rows = np.where((gt_valid >= 0) & (gt_valid < n), gt_valid, n)
        cols = np.where((pred_valid >= 0) & (pred_valid < n), pred_valid, n)
        self.counts += np.bincount(rows * (n + 1) + cols, minlength=(n + 1) ** 2).reshape(n + 1, n + 1)

    def _update_torch(self, pred: Any, gt: Any) -> None:
        import torch  # lazy: metrics must import without torch work

        n = self.num_classes
        gt = torch.as_tensor(gt).reshape(-1)
        pred = torch.as_tensor(pred, device=gt.device).reshape(-1)
        valid = gt != IGNORE_LABEL
        gt_valid = gt[valid].long()
        pred_valid = pred[valid].long()
        rows = torch.where((gt_valid >= 0) & (gt_valid < n), gt_valid, n)
        cols = torch.where((pred_valid >= 0) & (pred_valid < n), pred_valid, n)
        hist = torch.bincount(rows * (n + 1) + cols, minlength=(n + 1) ** 2)
        self.counts += hist.cpu().numpy().astype(np.int64).reshape(n + 1, n + 1)

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add another matrix's counts (e.g. from a worker process); returns self."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes} classes into {self.num_classes}")
        self.counts += other.counts
        return self

    def all_reduce(self) -> None:
        """Sum the counts over all ranks of an initialised torch.distributed group (no-op otherwise)."""
        from tool.distributed import all_reduce_confusion  # imported late: evaluation runs without torch

        self.counts = all_reduce_confusion(self.counts)

    def reset(self) -> None:
        self.counts[...] = 0

    # ------------------------------------------------------------------ results
    @property
    def matrix(self) -> np.ndarray:
        """The square ``n x n`` gt-by-prediction part (without out-of-range values)."""
        return self.counts[: self.num_classes, : self.num_classes]

    def scores(self, absent: str = "zero") -> dict[str, np.ndarray]:
        return scores_from_counts(self.counts, absent)

    def iou(self, absent: str = "zero") -> np.ndarray:
        return self.scores(absent)["iou"]

    def mean_iou(self, absent: str = "zero") -> float:
        return float(self.scores(absent)["miou"])

    def fp_ratio(self, absent: str = "zero") -> np.ndarray:
        return self.scores(absent)["fp_ratio"]

    def fn_ratio(self, absent: str = "zero") -> np.ndarray:
        return self.scores(absent)["fn_ratio"]

    def results(self, class_names: Sequence[str] | None = None, absent: str = "zero") -> dict[str, Any]:
        """Everything as plain Python: per-class lists aligned with ``class_names``, mIoU, counts."""
        names = default_class_names(self.num_classes) if class_names is None else list(class_names)
        if len(names) != self.num_classes:
            raise ValueError(f"{len(names)} class names for {self.num_classes} classes")
        return _results_dict(self.scores(absent), names, absent)


class CurveConfusion:
    """One confusion matrix per background threshold, filled from CAM dicts in one pass.

    At threshold t, a pixel is predicted as its best foreground class iff its maximal CAM
    score is > float32(t), else background: SEAM's ``argmax([t, CAM_0, ..., CAM_{n-2}])`` with
    ties won by the lowest channel (background first, then the lowest class index).
    Per image, the maximal score, its class and the number of thresholds below it are computed
    once; a single bincount over (threshold bin, gt, class) and cumulative sums over the
    thresholds give every matrix: O(pixels + thresholds x classes^2), not O(pixels x thresholds).
    """

    def __init__(self, num_classes: int, thresholds: Sequence[float]) -> None:
        if num_classes < 2:
            raise ValueError(f"a CAM curve needs background plus >= 1 class, got num_classes={num_classes}")
        self.num_classes = int(num_classes)
        self.thresholds = np.asarray(thresholds, dtype=np.float64).reshape(-1)
        if self.thresholds.size == 0:
            raise ValueError("at least one threshold is needed")
        # SEAM writes the threshold into a float32 tensor: compare in float32.
        thresholds32 = self.thresholds.astype(np.float32)
        self._order = np.argsort(thresholds32, kind="stable")
        self._sorted32 = thresholds32[self._order]
        size = self.num_classes + 1
        self.counts = np.zeros((self.thresholds.size, size, size), dtype=np.int64)

    def update(self, score_dict: Mapping[int, np.ndarray], gt: np.ndarray) -> None:
        """Add one image: ``score_dict`` = {0-based fg class: HxW scores}, ``gt`` HxW labels.

        An empty dict predicts background everywhere.
        """
        n = self.num_classes
        num_fg = n - 1
        gt = np.asarray(gt)
        keys = sorted(int(key) for key in score_dict)
        for key in keys:
            if not 0 <= key < num_fg:
                raise ValueError(f"CAM key {key} is outside the class range 0..{num_fg - 1}")
            if np.shape(score_dict[key]) != gt.shape:
                raise ValueError(f"CAM of key {key} has shape {np.shape(score_dict[key])}, gt has {gt.shape}")
        gt_flat = gt.reshape(-1)
        valid = gt_flat != IGNORE_LABEL
        gt_valid = gt_flat[valid].astype(np.int64)
        rows = np.where((gt_valid >= 0) & (gt_valid < n), gt_valid, n)
        num_thresholds = self._sorted32.size
        if keys:
            stacked = np.stack([np.asarray(score_dict[key], dtype=np.float32).reshape(-1)[valid]
                                for key in keys])
            best_score = stacked.max(axis=0)
            # argmax returns the first maximum: keys are sorted, so the lowest class wins ties.
            best_column = np.asarray(keys, dtype=np.int64)[stacked.argmax(axis=0)]   # fg class - 1
            # Foreground at sorted threshold k  <=>  best > t_k  <=>  k < #(thresholds < best).
            num_below = np.searchsorted(self._sorted32, best_score, side="left").astype(np.int64)
        else:
            best_column = np.zeros(rows.size, dtype=np.int64)
            num_below = np.zeros(rows.size, dtype=np.int64)
        bins_per_level = (n + 1) * num_fg
        flat_index = num_below * bins_per_level + rows * num_fg + best_column
        hist = np.bincount(flat_index, minlength=(num_thresholds + 1) * bins_per_level)
        hist = hist.reshape(num_thresholds + 1, n + 1, num_fg)
        # Sorted threshold k: pixels with num_below > k are fg, the others background.
        foreground = np.cumsum(hist[::-1], axis=0)[::-1][1:]                 # sum over m > k
        background = np.cumsum(hist.sum(axis=2), axis=0)[:num_thresholds]    # sum over m <= k
        per_sorted = np.zeros_like(self.counts)
        per_sorted[:, :, 1:n] = foreground
        per_sorted[:, :, 0] = background
        self.counts[self._order] += per_sorted

    def merge(self, other: "CurveConfusion") -> "CurveConfusion":
        if other.num_classes != self.num_classes or not np.array_equal(
                other.thresholds.astype(np.float32), self.thresholds.astype(np.float32)):
            raise ValueError("cannot merge curves with different classes or thresholds")
        self.counts += other.counts
        return self

    def matrix(self, index: int) -> ConfusionMatrix:
        """The confusion matrix of threshold number ``index``."""
        return ConfusionMatrix(self.num_classes, self.counts[index])

    def scores(self, absent: str = "zero") -> dict[str, np.ndarray]:
        """As :func:`scores_from_counts`, with a leading threshold dimension."""
        return scores_from_counts(self.counts, absent)

    def mean_iou(self, absent: str = "zero") -> np.ndarray:
        return self.scores(absent)["miou"]

    def results(self, class_names: Sequence[str] | None = None, absent: str = "zero") -> dict[str, Any]:
        """Per-threshold results (as :meth:`ConfusionMatrix.results`), the mIoU curve and the best threshold."""
        names = default_class_names(self.num_classes) if class_names is None else list(class_names)
        if len(names) != self.num_classes:
            raise ValueError(f"{len(names)} class names for {self.num_classes} classes")
        scores = self.scores(absent)
        per_threshold = [_results_dict({key: value[index] for key, value in scores.items()}, names, absent)
                         for index in range(self.thresholds.size)]
        miou = np.asarray([entry["miou"] for entry in per_threshold])
        best = int(np.nanargmax(miou)) if np.isfinite(miou).any() else 0
        return {
            "class_names": names,
            "absent": absent,
            "thresholds": self.thresholds.tolist(),
            "miou": miou.tolist(),
            "miou_percent": [value * 100 for value in miou.tolist()],
            "best_index": best,
            "best_threshold": float(self.thresholds[best]),
            "best_miou": float(miou[best]),
            "per_threshold": per_threshold,
        }
