"""evaluation.py: the real file code path against SEAM's reference vectors, the CLI, bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import evaluation
from tests.reference_data import load_reference
from tool.cli import main_exit_code
from tool.fileio import DataError, save_npy, save_palette_png

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOC_NAMES = ["background"] + [f"class_{index}" for index in range(1, 21)]


@pytest.fixture(scope="module")
def reference():
    return load_reference("eval.npz")


@pytest.fixture()
def folders(tmp_path, reference):
    """The reference inputs as files: gt PNGs, prediction PNGs, CAM dicts and an id list."""
    gt_dir, png_dir, npy_dir = tmp_path / "gt", tmp_path / "pred_png", tmp_path / "pred_npy"
    names = [str(name) for name in reference["names"]]
    for index, name in enumerate(names):
        save_palette_png(str(gt_dir / f"{name}.png"), reference[f"gt_{index}"])
        save_palette_png(str(png_dir / f"{name}.png"), reference[f"pred_{index}"])
        cams = dict(zip(reference[f"cam_keys_{index}"].tolist(), reference[f"cam_values_{index}"]))
        save_npy(str(npy_dir / f"{name}.npy"), cams)
    list_path = tmp_path / "list.txt"
    list_path.write_text("\n".join(names) + "\n")
    return {"gt": str(gt_dir), "png": str(png_dir), "npy": str(npy_dir), "list": str(list_path),
            "ids": names, "tmp": tmp_path}


def test_png_mode_matches_reference(folders, reference):
    results = evaluation.evaluate(folders["png"], folders["gt"], folders["ids"], VOC_NAMES, progress=False)
    assert results["true_positives"] == reference["png_TP"].tolist()
    assert results["predicted"] == reference["png_P"].tolist()
    assert results["target"] == reference["png_T"].tolist()
    np.testing.assert_array_equal(results["iou_percent"], reference["png_iou_percent"])
    assert results["miou_percent"] == float(reference["png_miou_percent"])
    assert results["num_images"] == 6 and results["threshold"] is None


def test_npy_curve_matches_reference(folders, reference):
    curve = evaluation.evaluate_curve(folders["npy"], folders["gt"], folders["ids"], VOC_NAMES, progress=False)
    np.testing.assert_array_equal(curve["thresholds"], reference["thresholds"])
    np.testing.assert_array_equal(curve["miou_percent"], reference["npy_miou_percent"])
    for index in range(60):
        entry = curve["per_threshold"][index]
        assert entry["true_positives"] == reference["npy_TP"][index].tolist()
        assert entry["predicted"] == reference["npy_P"][index].tolist()
        assert entry["target"] == reference["npy_T"][index].tolist()
    assert curve["best_threshold"] == 0.36
    assert curve["best_miou"] * 100 == float(reference["npy_miou_percent"][36])


def test_workers_and_single_threshold_agree_with_curve(folders):
    curve = evaluation.evaluate_curve(folders["npy"], folders["gt"], folders["ids"], VOC_NAMES, progress=False)
    parallel = evaluation.evaluate_curve(folders["npy"], folders["gt"], folders["ids"], VOC_NAMES,
                                         num_workers=2, progress=False)
    assert parallel["miou"] == curve["miou"]
    assert parallel["per_threshold"][13]["true_positives"] == curve["per_threshold"][13]["true_positives"]
    single = evaluation.evaluate(folders["npy"], folders["gt"], folders["ids"], VOC_NAMES, input_type="npy",
                                 threshold=0.36, progress=False)
    assert single["miou"] == curve["miou"][36]
    default = evaluation.evaluate(folders["npy"], folders["gt"], folders["ids"], VOC_NAMES, input_type="npy",
                                  num_workers=2, progress=False)
    assert default["threshold"] == 0.26 and default["miou"] == curve["miou"][26]


def test_absent_ignore_averages_present_classes_only(folders, reference):
    results = evaluation.evaluate(folders["png"], folders["gt"], folders["ids"], VOC_NAMES, absent="ignore",
                                  progress=False)
    present = (reference["png_T"] + reference["png_P"]) > 0
    iou = reference["png_TP"] / (reference["png_T"] + reference["png_P"] - reference["png_TP"] + 1e-10)
    assert results["miou"] == pytest.approx(iou[present].mean(), rel=1e-12)
    assert results["miou"] > float(reference["png_miou_percent"]) / 100
    assert np.isnan(results["iou"][2])   # class 2 occurs nowhere
    table_row = [line for line in evaluation.format_table(results).splitlines() if "class_2 " in line][0]
    assert table_row.split()[1:] == ["-", "-", "-"]


def test_cli_png_subprocess_prints_table_and_logs(folders):
    logfile = folders["tmp"] / "evallog.txt"
    command = [sys.executable, "evaluation.py", "--list", folders["list"], "--predict_dir", folders["png"],
               "--gt_dir", folders["gt"], "--type", "png", "--comment", "png run", "--logfile", str(logfile)]
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert "29.212" in completed.stdout and "aeroplane" in completed.stdout
    log = logfile.read_text()
    assert "\tpng run\n" in log and "mIoU:29.21199879177362" in log


def test_cli_curve_writes_plot_json_csv(folders, reference, capsys):
    out_dir = folders["tmp"] / "curve"
    logfile = folders["tmp"] / "log.txt"
    common = ["--list", folders["list"], "--predict_dir", folders["npy"], "--gt_dir", folders["gt"],
              "--type", "npy", "--out_dir", str(out_dir), "--logfile", str(logfile), "--comment", "cam"]
    assert evaluation.main(common + ["--curve", "True"]) == 0
    assert "best background threshold 0.36" in capsys.readouterr().out
    data = json.loads((out_dir / "curve.json").read_text())
    np.testing.assert_array_equal(data["miou_percent"], reference["npy_miou_percent"])
    assert data["best_threshold"] == 0.36
    rows = (out_dir / "curve.csv").read_text().splitlines()
    assert len(rows) == 1 + 60 * 22    # header + (21 classes + mIoU) per threshold
    assert (out_dir / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert evaluation.main(common + ["--curve"]) == 0           # the bare switch works too
    assert logfile.read_text().count("\tcam\n") == 2


def test_cli_curve_false_runs_single_threshold(folders, capsys):
    assert evaluation.main(["--list", folders["list"], "--predict_dir", folders["npy"], "--gt_dir",
                            folders["gt"], "--type", "npy", "--curve", "False", "--t", "0.36"]) == 0
    assert "37.148" in capsys.readouterr().out


def test_missing_files_give_one_error_with_count(folders):
    ids = folders["ids"] + [f"missing_{index:02d}" for index in range(12)]
    with pytest.raises(DataError) as caught:
        evaluation.evaluate(folders["png"], folders["gt"], ids, VOC_NAMES, progress=False)
    message = str(caught.value)
    assert message.startswith("12 prediction files")
    assert "missing_09.png" in message and "missing_10.png" not in message and "and 2 more" in message
    os.remove(os.path.join(folders["gt"], "img_003.png"))
    with pytest.raises(DataError, match=r"(?s)1 ground-truth PNGs do not exist.*img_003\.png"):
        evaluation.evaluate(folders["png"], folders["gt"], folders["ids"], VOC_NAMES, progress=False)


def test_unreadable_png_and_npy_name_the_file(folders):
    with open(os.path.join(folders["png"], "img_002.png"), "wb") as handle:
        handle.write(b"not a png")
    with pytest.raises(DataError, match=r"img_002\.png"):
        evaluation.evaluate(folders["png"], folders["gt"], folders["ids"], VOC_NAMES, progress=False)
    with open(os.path.join(folders["npy"], "img_004.npy"), "wb") as handle:
        handle.write(b"garbage")
    with pytest.raises(DataError, match=r"img_004\.npy"):
        evaluation.evaluate_curve(folders["npy"], folders["gt"], folders["ids"], VOC_NAMES, progress=False)


def test_size_mismatch_names_file_and_sizes(folders):
    save_palette_png(os.path.join(folders["png"], "img_001.png"), np.zeros((10, 12), np.uint8))
    with pytest.raises(DataError, match=r"img_001\.png: prediction size 10x12 .*48x40"):
        evaluation.evaluate(folders["png"], folders["gt"], folders["ids"], VOC_NAMES, progress=False)
    save_npy(os.path.join(folders["npy"], "img_001.npy"), {3: np.zeros((7, 8), np.float32)})
    with pytest.raises(DataError, match=r"img_001\.npy: prediction size 7x8 .*48x40"):
        evaluation.evaluate_curve(folders["npy"], folders["gt"], folders["ids"], VOC_NAMES, progress=False)


def test_cam_key_outside_class_range(folders):
    save_npy(os.path.join(folders["npy"], "img_005.npy"), {20: np.zeros((41, 39), np.float32)})
    with pytest.raises(DataError, match=r"img_005\.npy: key 20 is outside the class range"):
        evaluation.evaluate(folders["npy"], folders["gt"], folders["ids"], VOC_NAMES, input_type="npy",
                            progress=False)


def test_main_exits_with_message_not_traceback(folders, capsys):
    os.remove(os.path.join(folders["png"], "img_000.png"))
    code = main_exit_code(evaluation.main, ["--list", folders["list"], "--predict_dir", folders["png"],
                                            "--gt_dir", folders["gt"]])
    error = capsys.readouterr().err
    assert code == 2 and "img_000.png" in error and "Traceback" not in error
    code = main_exit_code(evaluation.main, ["--list", folders["list"], "--predict_dir", folders["png"],
                                            "--gt_dir", folders["gt"], "--curve"])
    assert code == 2 and "--type npy" in capsys.readouterr().err


def test_out_json_holds_the_printed_numbers(tmp_path):
    label = np.array([[0, 1, 1], [0, 0, 255]], np.uint8)
    prediction = np.array([[0, 1, 0], [0, 0, 1]], np.uint8)
    save_palette_png(str(tmp_path / "gt" / "a.png"), label)
    save_palette_png(str(tmp_path / "pred" / "a.png"), prediction)
    (tmp_path / "list.txt").write_text("a\n")
    out_json = tmp_path / "out" / "result.json"
    assert evaluation.main(["--list", str(tmp_path / "list.txt"), "--predict_dir", str(tmp_path / "pred"),
                 "--gt_dir", str(tmp_path / "gt"), "--out_json", str(out_json), "--comment", "hand"]) == 0
    result = json.loads(out_json.read_text())
    # background: TP 3, P 4, T 3 -> 3/4; class 1: TP 1, P 1, T 2 -> 1/2 (the void pixel is ignored)
    assert result["iou"][:2] == pytest.approx([0.75, 0.5])
    assert result["comment"] == "hand"
