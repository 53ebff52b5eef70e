"""End to end: every stage script, run by run_pipeline.py on a tiny synthetic dataset.

Runs the real CLIs as separate processes (the 'tiny' profile: a few images, one epoch, a few
iterations), then checks the results table, the resume (a second run redoes nothing) and the
results page in a real headless browser.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tool.fileio import read_label_png
from tool.metrics import ConfusionMatrix
from workflow.datasets import get_dataset_info

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("generate", "prepare", "train_avc", "infer_seed", "eval_seed", "refine_mask", "eval_crf", "train_aff",
          "infer_aff", "eval_rw", "train_deeplab", "test_deeplab", "eval_deeplab", "test_deeplab_samples",
          "train_deeplab_gt", "test_deeplab_gt", "eval_deeplab_gt")


def run_pipeline(*flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "run_pipeline.py", "--profile", "tiny", *flags], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("pipeline")
    results_dir = work_dir / "results"
    completed = run_pipeline("--work_dir", str(work_dir), "--results_dir", str(results_dir))
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return work_dir, results_dir, completed.stdout


def test_every_stage_ran_and_printed_its_command(tiny_run):
    work_dir, _, stdout = tiny_run
    for stage in STAGES:
        marker = json.loads((work_dir / "stages" / f"{stage}.json").read_text())
        assert marker["seconds"] > 0
        assert f"==> [{stage}]" in stdout
    assert "$ OMP_NUM_THREADS=1 python train_avc.py --dataset synthetic" in stdout


def all_background_miou(data_root: str, split: str) -> float:
    """The mIoU (%) of predicting background everywhere, on the ground truth of the split's list."""
    info = get_dataset_info("synthetic", data_root)
    matrix = ConfusionMatrix(info.num_labels)
    for image_id in info.read_list(split):
        gt = read_label_png(info.gt_path(image_id))
        matrix.update(np.zeros_like(gt), gt)
    return 100.0 * matrix.mean_iou()


# Every row but DeepLab on the pseudo masks beats predicting background everywhere (measured: seed
# 21.5, +CRF 23.4, walk 25.4 against 19.9 on train; DeepLab on the ground truth 57.4 against 19.3
# on val). The one-epoch classifier's CRF masks miss two thirds of the background (background IoU
# 28 %; the walk's 30 %), so DeepLab trained on them, or on the walk's, predicts one class nearly
# everywhere (3.1), and 10 classifier epochs instead of 1 made the seeds worse (17.8, DeepLab on
# the ground truth back at 19.3); that row is checked against the table only.
BELOW_BASELINE_IN_TINY = ("DeepLabV1-ResNet38 on the CRF masks (init: backbone of avc.pth)",)


def test_results_table_rows_and_the_all_background_baseline(tiny_run):
    work_dir, results_dir, stdout = tiny_run
    summary = json.loads((results_dir / "summary.json").read_text())
    rows = {row["row"]: row for row in summary["rows"]}
    deeplab = "DeepLabV1-ResNet38 on the CRF masks (init: backbone of avc.pth)"  # network, masks, init
    assert list(rows) == ["Seed", "+CRF", "Mask (random walk)", deeplab, "DeepLab on ground truth",
                          "DeepLab pseudo / ground truth"]
    baselines = {split: all_background_miou(str(work_dir / "data"), split) for split in ("train", "val")}
    for name, row in rows.items():
        if "ratio_percent" in row:
            ratio = 100.0 * rows[deeplab]["miou"] / rows["DeepLab on ground truth"]["miou"]
            assert row["ratio_percent"] == pytest.approx(ratio)
            continue
        assert 0.0 <= row["miou"] <= 100.0
        if name not in BELOW_BASELINE_IN_TINY:
            baseline = baselines[row["split"]]
            assert row["miou"] > baseline, f"{name}: {row['miou']:.1f} vs all-background {baseline:.1f}"
    assert 0.0 <= rows["Seed"]["bg_threshold"] <= 0.59
    markdown = (results_dir / "summary.md").read_text()
    assert markdown in stdout  # the printed table is the written one
    assert {stage["stage"] for stage in summary["stages"]} == set(STAGES)


def test_second_run_resumes_without_redoing_anything(tiny_run):
    work_dir, results_dir, _ = tiny_run
    completed = run_pipeline("--work_dir", str(work_dir), "--results_dir", str(results_dir))
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "==> [" not in completed.stdout
    assert completed.stdout.count("done earlier") == len(STAGES)


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise AssertionError("no Chromium on PATH: .ci/run installs the Debian package 'chromium'")


def browser_flags(tmp_path) -> list[str]:
    return ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", "--allow-file-access-from-files"]


def test_results_page_renders_in_a_real_browser(tiny_run, tmp_path):
    _, results_dir, _ = tiny_run
    page = results_dir / "index.html"
    url = page.as_uri()
    dom = subprocess.run([chromium(), *browser_flags(tmp_path), "--virtual-time-budget=5000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120).stdout
    # The page's own script counts the images that did not load after the load event.
    assert 'data-broken="0"' in dom, dom[:2000]
    images = int(dom.split('data-images="')[1].split('"')[0])
    assert images >= 1 + 3 * 7  # the curve plus 3 samples x 7 columns
    screenshot = tmp_path / "page.png"
    subprocess.run([chromium(), *browser_flags(tmp_path), "--window-size=1280,900",
                    f"--screenshot={screenshot}", url], capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(screenshot).convert("L"), dtype=np.float32)
    assert pixels.std() > 10  # not blank


# Last: it leaves the later stages out of date, so no results page after it.
def test_only_reruns_one_stage_from_scratch(tiny_run):
    work_dir, results_dir, _ = tiny_run
    rw_masks = work_dir / "masks" / "rw"
    masks = sorted(rw_masks.glob("*.png"))
    assert masks
    (rw_masks / "stale.png").write_bytes(b"left over")      # removed by the forced rerun
    before = {path.name: path.stat().st_mtime_ns for path in masks}
    completed = run_pipeline("--work_dir", str(work_dir), "--results_dir", str(results_dir), "--only", "infer_aff")
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.count("==> [") == 1 and "==> [infer_aff]" in completed.stdout
    assert f"removing {rw_masks}/" in completed.stdout
    assert not (rw_masks / "stale.png").exists()
    after = {path.name: path.stat().st_mtime_ns for path in rw_masks.glob("*.png")}
    assert after.keys() == before.keys()
    assert all(after[name] > before[name] for name in before)  # every mask written again
    # The later stages were made from the old masks: no summary reports their numbers (issue 14).
    assert "no summary: eval_rw, train_deeplab" in completed.stdout
    assert not (results_dir / "summary.md").exists() and not (results_dir / "summary.json").exists()
