"""run_pipeline.py --segmenter: the stage commands of either network and the table's row label."""
from __future__ import annotations

import json

import run_pipeline
from workflow.pipeline import PROFILES, Context, Paths, build_stages
from workflow.report import collect_results


def _context(tmp_path, segmenter: str, title: str, weights: str | None = None) -> Context:
    return Context("synthetic", PROFILES["synthetic"], Paths.under(str(tmp_path), str(tmp_path / "data"),
                                                                   str(tmp_path / "results")),
                   segmenter=segmenter, segmenter_title=title, segmenter_weights=weights)


def _command(ctx: Context, name: str) -> list[str]:
    return next(stage for stage in build_stages(ctx) if stage.name == name).command(ctx)


def test_deeplabv2_stages_use_its_arch_recipe_session_and_weights(tmp_path):
    ctx = _context(tmp_path, "deeplabv2_resnet101", "DeepLabV2-ResNet101")
    train = _command(ctx, "train_deeplab")
    assert train[train.index("--arch") + 1] == "deeplabv2_resnet101"
    assert train[train.index("--session_name") + 1] == "deeplabv2"
    assert train[train.index("--iter_size") + 1] == "2"
    assert "--weights" not in train  # the AVC (ResNet38) backbone cannot start a ResNet-101
    test = _command(ctx, "test_deeplab")
    assert test[test.index("--weights") + 1].endswith("checkpoints/deeplabv2.pth")

    coco = _context(tmp_path, "deeplabv2_resnet101", "DeepLabV2-ResNet101", "/w/deeplabv1_resnet101-coco.pth")
    train = _command(coco, "train_deeplab")
    assert train[train.index("--weights") + 1] == "/w/deeplabv1_resnet101-coco.pth"

    v1 = _command(_context(tmp_path, "deeplabv1_resnet38", "DeepLabV1-ResNet38"), "train_deeplab")
    assert v1[v1.index("--arch") + 1] == "deeplabv1_resnet38" and v1[v1.index("--session_name") + 1] == "deeplab"
    assert v1[v1.index("--weights") + 1].endswith("avc.pth") and "--iter_size" not in v1


def test_results_row_names_the_network_and_its_recorded_init(tmp_path):
    ctx = _context(tmp_path, "deeplabv2_resnet101", "DeepLabV2-ResNet101")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "deeplabv2_config.json").write_text(
        json.dumps({"init_description": "COCO segmentation (deeplabv1_resnet101-coco.pth, pixel labels)"}))
    label = run_pipeline.segmenter_row(ctx)
    # The synthetic profile trains DeepLab on the CRF masks, not the walk's (--refine affinitynet): said.
    assert label == ("DeepLabV2-ResNet101 on the CRF masks (init: COCO segmentation (deeplabv1_resnet101-coco.pth, "
                     "pixel labels))")
    rows = collect_results(str(tmp_path / "eval"), str(tmp_path / "none.json"), [], "synthetic", {},
                           segmenter_row=label)["rows"]
    assert rows[-1]["row"] == label and rows[0]["row"] == "Seed"
