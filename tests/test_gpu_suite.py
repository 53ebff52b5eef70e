"""The GPU suite at tiny sizes on CPU: every stage runs its real code and reports usable numbers."""
from __future__ import annotations

import json
import math

import pytest

from bench import gpu_suite
from bench.gpu_suite import PROJECTIONS, STAGES, run_suite

# Stages whose result is a check, not a throughput.
CHECK_STAGES = {"cam_guard", "ddp_step"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite")
    report = run_suite(["--tiny", "--device", "cpu", "--out", str(out)])
    return out, report


def _positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_every_stage_ran_with_positive_finite_rates(tiny_run):
    out, report = tiny_run
    written = json.loads((out / "gpu_suite.json").read_text())
    assert written["meta"]["complete"] is True
    assert list(written["stages"]) == list(STAGES)
    for name, result in written["stages"].items():
        assert result["status"] == "ok", (name, result.get("error"), result.get("traceback"))
        assert _positive_finite(result["wall_s"]), name
        if name not in CHECK_STAGES:
            assert _positive_finite(result["rate"]), (name, result["rate"])
    for name in ("avc_train", "aff_train", "deeplab_train", "sipe_train", "irn_train", "msa_train"):
        assert _positive_finite(written["stages"][name]["rate_without_trainer"]), name
    # The later methods' stages are in the table and ran (positive finite rates checked above).
    assert {"sipe_train", "sipe_infer", "irn_train", "irn_seg_labels", "msa_train", "deeplabv2_train",
            "deeplabv2_test"} <= set(written["stages"])
    assert report["stages"].keys() == written["stages"].keys()


def test_bf16_guard_compares_two_different_computations(tiny_run):
    guard = tiny_run[1]["stages"]["cam_guard"]
    # bf16 autocast really ran (on CPU the check enables it explicitly): the CAMs differ, but
    # by less than their own magnitude, and most pixels keep their arg-max class.
    assert 0 < guard["raw_cam_max_abs_diff"] < guard["raw_cam_max_abs"]
    assert 0 <= guard["fused_cam_max_abs_diff"] <= 1
    assert 0.5 < guard["argmax_agreement"] <= 1
    assert 0.5 < guard["seed_agreement"] <= 1


def test_random_walk_variants_give_the_same_labels(tiny_run):
    walk = tiny_run[1]["stages"]["random_walk"]
    for key in ("affinity_graph_s_per_image", "sparse_device_s_per_image", "sparse_cpu_s_per_image",
                "dense_device_s_per_image", "dense_cpu_s_per_image"):
        assert _positive_finite(walk[key]), key
    assert walk["sparse_device_vs_cpu_label_agreement"] == 1.0
    assert walk["dense_cpu_label_agreement"] >= 0.99


def test_torchrun_step_on_two_processes(tiny_run):
    ddp = tiny_run[1]["stages"]["ddp_step"]
    assert ddp["processes"] == 2 and ddp["backend"] == "gloo"
    assert ddp["ranks_agree"] is True


def test_projections_and_table(tiny_run):
    out, report = tiny_run
    rows = {row["what"]: row for row in report["projections"]}
    assert set(rows) == set(PROJECTIONS)
    for what, row in rows.items():
        stage = report["stages"][PROJECTIONS[what][0]]
        assert row["minutes_1_gpu"] == pytest.approx(row["images"] / stage["rate"] / 60)
        assert row["minutes_8_gpus"] == pytest.approx(row["minutes_1_gpu"] / 8)
    goals = [row for row in rows.values() if "goal_met" in row]
    assert len(goals) == 2
    table = (out / "gpu_suite.md").read_text()
    for name in STAGES:
        assert f"| {name} |" in table
    assert table.count("Goal: ") == 2


def test_a_failing_stage_is_recorded_and_the_suite_goes_on(tmp_path, monkeypatch):
    def broken(suite):
        raise RuntimeError("planted failure")

    monkeypatch.setitem(STAGES, "broken", broken)
    report = run_suite(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--stages", "broken", "avc_loader"])
    assert report["stages"]["broken"]["status"] == "failed"
    assert "planted failure" in report["stages"]["broken"]["error"]
    assert report["stages"]["avc_loader"]["status"] == "ok"
    assert json.loads((tmp_path / "gpu_suite.json").read_text())["stages"]["broken"]["status"] == "failed"


def test_measure_stops_at_its_budget(tmp_path):
    config = gpu_suite.SuiteConfig(**{**gpu_suite.PROFILES["tiny"], "num_images": 1, "warmup": 2})
    suite = gpu_suite.Suite(config, gpu_suite.torch.device("cpu"), str(tmp_path))
    calls = []
    measured = suite.measure(lambda: calls.append(1) or 3, budget_s=0.0)
    assert len(calls) == 3 and measured["iterations"] == 1 and measured["items"] == 3  # 2 warm-up + 1 timed
