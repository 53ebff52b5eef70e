"""run_pipeline.py --method msa / msa_sal: the stages and commands of the plan, and a tiny real run
of the msa path up to the seed evaluation."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import run_pipeline
from network.methods import MSA_METHODS, SEED_METHOD_NAMES
from tool.fileio import load_score_dict, read_label_png
from workflow.datasets import get_dataset_info
from workflow.pipeline import PROFILES, Context, Paths, build_stages, profile_for_root, result_notes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AFTER_SEEDS = ["eval_seed", "refine_mask", "eval_crf", "train_aff", "infer_aff", "eval_rw", "train_deeplab",
               "test_deeplab", "eval_deeplab", "test_deeplab_samples"]


def plan(tmp_path, method: str, profile_name: str = "synthetic", **context) -> dict[str, list[str]]:
    """Stage name -> command of the run (commands that need earlier results are left out)."""
    root = str(tmp_path / "data")
    ctx = Context(profile_name, profile_for_root(profile_name, root),
                  Paths.under(str(tmp_path / "work"), root, str(tmp_path / "results")), method=method, **context)
    commands = {}
    for stage in build_stages(ctx):
        try:
            commands[stage.name] = stage.command(ctx)
        except Exception:  # noqa: BLE001 - a command that reads an earlier stage's result (the seed curve)
            commands[stage.name] = []
    return commands


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_the_method_lists_agree():
    assert run_pipeline.SEED_METHODS == SEED_METHOD_NAMES  # run_pipeline keeps a torch-free copy
    assert set(run_pipeline.RESNET50_METHODS) >= set(MSA_METHODS)


def test_msa_plan_trains_superpixels_then_the_classifier_and_infers_through_them(tmp_path):
    commands = plan(tmp_path, "msa")
    names = list(commands)
    assert names[:7] == ["generate", "prepare", "train_scn", "eval_spixel", "train_msa", "infer_seed", "eval_seed"]
    assert names[6:16] == AFTER_SEEDS and "eval_seed_png" not in names and "saliency_standin" not in names
    checkpoints = str(tmp_path / "work" / "checkpoints")
    spixel = os.path.join(checkpoints, "spixel.pth")
    scn, msa, infer = commands["train_scn"], commands["train_msa"], commands["infer_seed"]
    small = PROFILES["synthetic"]
    assert scn[0] == "train_scn.py" and "--weights" not in scn
    assert flag(scn, "--width_mult") == str(small["train_scn"]["width_mult"]) == "0.25"
    assert flag(scn, "--max_epoches") == str(small["train_scn"]["max_epoches"])
    assert flag(commands["eval_spixel"], "--weights") == spixel
    assert flag(commands["eval_spixel"], "--infer_list") == str(tmp_path / "data" / "val.txt")
    assert msa[0] == "train_msa.py" and flag(msa, "--spixel_weights") == spixel and "--variant" not in msa
    assert flag(msa, "--session_name") == "msa" and flag(msa, "--width_mult") == "0.125"
    assert flag(msa, "--momentum") == "0.9" and "--weights" not in msa  # from scratch on the synthetic data
    assert flag(infer, "--weights") == os.path.join(checkpoints, "msa.pth")
    assert flag(infer, "--spixel_weights") == spixel and "--out_cam_bg" not in infer
    assert flag(infer, "--ap_steps") == str(small["infer_msa"]["ap_steps"])
    # AffinityNet and DeepLab are ResNet38 networks: an MSA ResNet-50 cannot start them.
    assert "--weights" not in commands["train_aff"] and "--weights" not in commands["train_deeplab"]
    assert result_notes(Context("synthetic", small, Paths.under("w", "d", "r"), method="msa")) == []


def test_msa_sal_plan_makes_labelled_standins_or_reads_the_given_saliency(tmp_path):
    commands = plan(tmp_path, "msa_sal")
    names = list(commands)
    assert names[2:6] == ["train_scn", "eval_spixel", "saliency_standin", "train_msa"]
    standins = str(tmp_path / "work" / "saliency_standin")
    assert commands["saliency_standin"][:2] == ["-m", "voc12.saliency"]
    assert flag(commands["saliency_standin"], "--out") == standins
    msa = commands["train_msa"]
    assert flag(msa, "--variant") == "saliency" and flag(msa, "--sal_dir") == standins
    assert flag(msa, "--session_name") == "msa_sal"
    notes = result_notes(Context("synthetic", PROFILES["synthetic"], Paths.under("w", "d", "r"), method="msa_sal"))
    assert len(notes) == 1 and "stand-ins" in notes[0] and "pixel" in notes[0]

    given = plan(tmp_path, "msa_sal", sal_dir="/poolnet")
    assert "saliency_standin" not in given and flag(given["train_msa"], "--sal_dir") == "/poolnet"


def test_voc12_profile_keeps_the_reference_settings(tmp_path):
    commands = plan(tmp_path, "msa", "voc12", imagenet_weights="/ilsvrc.params",
                    seed_imagenet_weights="/resnet50.pth")
    scn, msa, infer = commands["train_scn"], commands["train_msa"], commands["infer_seed"]
    assert "--weights" not in scn and flag(scn, "--lr") == "5e-05" and flag(scn, "--max_epoches") == "50"
    assert flag(msa, "--weights") == "/resnet50.pth" and flag(msa, "--momentum") == "4e-05"
    assert flag(msa, "--crop_size") == "480" and flag(msa, "--max_epoches") == "12"
    assert flag(infer, "--ap_steps") == "8" and flag(infer, "--ap_threshold") == "0.6"


def test_voc12_msa_sal_needs_saliency_maps(capsys):
    voc12 = ["--voc12_root", os.curdir, "--weights", "w", "--seed_weights", "s"]
    with pytest.raises(SystemExit) as exit_info:
        run_pipeline.parse_args([*voc12, "--method", "msa_sal"])
    assert exit_info.value.code == 2 and "--sal_dir" in capsys.readouterr().err
    # --method all runs msa everywhere, msa_sal where it has saliency maps.
    assert run_pipeline.methods_for_all(run_pipeline.parse_args([*voc12, "--method", "all"])) == \
        tuple(m for m in SEED_METHOD_NAMES if m != "msa_sal")
    assert run_pipeline.methods_for_all(run_pipeline.parse_args([*voc12, "--method", "all", "--sal_dir", "s"])) == \
        run_pipeline.methods_for_all(run_pipeline.parse_args(["--method", "all"])) == SEED_METHOD_NAMES


def test_comparison_names_msa_and_carries_its_notes(tmp_path):
    for method, miou, notes in (("avc", 26.8, []), ("msa", 24.3, []), ("msa_sal", 30.0, ["stand-ins"])):
        (tmp_path / method).mkdir()
        (tmp_path / method / "summary.json").write_text(json.dumps(
            {"notes": notes, "rows": [{"row": "Seed", "miou": miou, "bg_threshold": 0.5}]}))
    text = run_pipeline.write_comparison(str(tmp_path), ("avc", "msa", "msa_sal"))
    assert "| | avc | msa | msa_sal |" in text and "| Seed | 26.8 (bg 0.50) | 24.3 (bg 0.50) | 30.0 (bg 0.50) |" in text
    assert text.rstrip().endswith("- msa_sal: stand-ins")


def test_seed_epochs_shortens_the_msa_classifier(tmp_path):
    completed = subprocess.run([sys.executable, "run_pipeline.py", "--method", "msa", "--dry_run", "--seed_epochs",
                                "3", "--work_dir", str(tmp_path / "w"), "--results_dir", str(tmp_path / "r")],
                               cwd=REPO, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    line = next(line for line in completed.stdout.splitlines() if line.startswith("[train_msa]"))
    assert "--max_epoches 3" in line


def test_tiny_msa_run_up_to_the_seed_evaluation(tmp_path):
    """The real stage scripts on the tiny profile: superpixels, classifier, seeds, their evaluation."""
    work, results = tmp_path / "work", tmp_path / "results"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run([sys.executable, "run_pipeline.py", "--profile", "tiny", "--method", "msa",
                                "--until", "eval_seed", "--work_dir", str(work), "--results_dir", str(results)],
                               cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    for stage in ("train_scn", "eval_spixel", "train_msa", "infer_seed", "eval_seed"):
        assert json.loads((work / "stages" / f"{stage}.json").read_text())["seconds"] > 0
    summary = json.loads((results / "summary.json").read_text())
    assert summary["method"] == "msa" and "# Results (msa seeds" in (results / "summary.md").read_text()
    spixel = json.loads((work / "eval" / "spixel.json").read_text())
    assert 0.0 < spixel["spixel_fcn"]["boundary_recall"] <= 1.0
    assert summary["notes"][0].startswith("Superpixel FCN on val (boundary recall / precision / ASA")
    assert f"\n**{summary['notes'][0]}**\n" in (results / "summary.md").read_text()
    seed = next(row for row in summary["rows"] if row["row"] == "Seed")
    assert 0.0 < seed["miou"] <= 100.0
    # Every CAM dict holds exactly the image's classes, at its size, in [0, 1], and is not flat.
    info = get_dataset_info("synthetic", str(work / "data"))
    labels = info.load_cls_labels()
    spread = []
    for image_id in info.read_list("train"):
        cams = load_score_dict(str(work / "seed" / "cam" / f"{image_id}.npy"), info.num_classes)
        assert sorted(cams) == np.nonzero(labels[image_id])[0].tolist()
        for cam in cams.values():
            assert cam.shape == read_label_png(info.gt_path(image_id)).shape
            assert 0.0 <= cam.min() and cam.max() <= 1.0
            spread.append(float(cam.max() - cam.min()))
    assert min(spread) > 0.5
