"""The profiles of run_pipeline.py: 'small' runs on the user's VOC-layout root, nothing generated."""
import os

import pytest

import run_pipeline
from workflow.pipeline import PROFILES, Context, Paths, build_stages, profile_for_root


def stage_names(profile_name: str, root: str, tmp_path) -> list[str]:
    profile = profile_for_root(profile_name, root)
    ctx = Context(profile_name, profile, Paths.under(str(tmp_path / "work"), root, str(tmp_path / "results")))
    return [stage.name for stage in build_stages(ctx)]


def test_small_profile_reads_the_class_names_of_the_root_or_the_voc_classes(tmp_path):
    with_names = tmp_path / "mine"
    with_names.mkdir()
    (with_names / "class_names.txt").write_text("background\ncat\n")
    assert profile_for_root("small", str(with_names))["dataset"] == "synthetic"
    assert profile_for_root("small", str(tmp_path))["dataset"] == "voc12"
    assert PROFILES["small"]["dataset"] is None  # settling it does not change the table


def test_small_profile_is_the_synthetic_configuration_without_generation(tmp_path):
    names = stage_names("small", str(tmp_path), tmp_path)
    assert "generate" not in names and names[0] == "prepare"
    assert stage_names("synthetic", str(tmp_path), tmp_path) == ["generate", *names]
    for key in ("train_avc", "train_aff", "train_deeplab", "infer_aff", "width_mult"):
        assert PROFILES["small"][key] == PROFILES["synthetic"][key]
    assert names[-3:] == ["train_deeplab_gt", "test_deeplab_gt", "eval_deeplab_gt"]
    assert "train_deeplab_gt" not in stage_names("voc12", str(tmp_path), tmp_path)


def test_small_profile_needs_a_root(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_pipeline.parse_args(["--profile", "small", "--dry_run"])
    assert exit_info.value.code == 2
    assert "--voc12_root" in capsys.readouterr().err
    args = run_pipeline.parse_args(["--profile", "small", "--voc12_root", os.curdir, "--dry_run"])
    assert args.work_dir == os.path.join("runs", "small")
