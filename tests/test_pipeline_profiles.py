"""The profiles of run_pipeline.py: 'small' runs on the user's VOC-layout root, nothing generated."""
import json
import os

import pytest

import run_pipeline
from tool.contract import crf_dir
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


def _commands(profile_name: str, tmp_path, threshold: float) -> dict[str, list[str]]:
    """Each stage's command, with a seed curve whose best threshold is ``threshold``."""
    profile = profile_for_root(profile_name, str(tmp_path))
    ctx = Context(profile_name, profile, Paths.under(str(tmp_path / "work"), str(tmp_path), str(tmp_path / "results")))
    os.makedirs(ctx.paths.seed_curve, exist_ok=True)
    with open(os.path.join(ctx.paths.seed_curve, "curve.json"), "w", encoding="utf-8") as handle:
        json.dump({"best_threshold": threshold}, handle)
    wanted = ("infer_seed", "refine_mask", "train_aff", "infer_aff")
    return {stage.name: stage.command(ctx) for stage in build_stages(ctx) if stage.name in wanted}


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_small_profile_affinity_labels_follow_the_seed_threshold(tmp_path):
    """la = the seed's own alpha, ha = 6 x it (VOC's 24 / 4), written by refine_mask; the walk
    starts from the la dicts (the seeds' CRF marginals). The GPU profiles keep infer_seed's 4 / 24."""
    commands = _commands("small", tmp_path, 0.47)   # alpha ln 0.47 / ln 0.53 = 1.189
    refine = commands["refine_mask"]
    prefix = _flag(refine, "--out_crf")
    assert refine[refine.index("--crf_alphas") + 1:][:2] == ["1.2", "7.1"]
    assert "--out_crf" not in commands["infer_seed"]
    assert _flag(commands["train_aff"], "--la_crf_dir") == crf_dir(prefix, 1.2)
    assert _flag(commands["train_aff"], "--ha_crf_dir") == crf_dir(prefix, 7.1)
    walk = commands["infer_aff"]
    assert _flag(walk, "--cam_dir") == crf_dir(prefix, 1.2) and "--walk_from=crf" in walk
    assert not any(flag.startswith("--alpha") for flag in walk)
    voc = _commands("voc12", tmp_path / "voc", 0.26)
    assert "--out_crf" not in voc["refine_mask"] and "--out_crf" in voc["infer_seed"]
    assert _flag(voc["train_aff"], "--la_crf_dir").endswith("crf_4.0")
    assert _flag(voc["train_aff"], "--ha_crf_dir").endswith("crf_24.0")
    assert "--walk_from=crf" not in voc["infer_aff"]
