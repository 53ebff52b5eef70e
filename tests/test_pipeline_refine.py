"""run_pipeline's --refine: the stages each refinement runs, DeepLab's pseudo masks, the table rows."""
import json
import os

import pytest

from tool.fileio import DataError
from workflow.pipeline import PROFILES, Context, Paths, build_stages
from workflow.report import collect_results


def _context(tmp_path, refine: str, **extra) -> Context:
    return Context("synthetic", PROFILES["synthetic"], Paths.under(str(tmp_path), str(tmp_path / "data"),
                                                                    str(tmp_path / "results")), refine=refine, **extra)


def _deeplab_pseudo_dir(ctx: Context) -> str:
    command = next(stage for stage in build_stages(ctx) if stage.name == "train_deeplab").command(ctx)
    return command[command.index("--pseudo_dir") + 1]


def test_irn_refinement_stages(tmp_path):
    ctx = _context(tmp_path, "irn")
    stages = {stage.name: stage for stage in build_stages(ctx)}
    assert "train_aff" not in stages and "infer_aff" not in stages
    names = list(stages)
    assert names[names.index("eval_crf") + 1:names.index("train_deeplab")] == \
        ["make_ir_labels", "train_irn", "make_seg_labels", "eval_irn"]
    train = stages["train_irn"].command(ctx)
    assert "--weights" not in train          # AVC's ResNet38 cannot start IRN's ResNet-50
    assert train[train.index("--momentum") + 1] == "0.0001"
    masks = stages["make_seg_labels"].command(ctx)
    assert masks[masks.index("--variant") + 1] == "irn" and "--logt=4" in masks
    assert _deeplab_pseudo_dir(ctx) == ctx.paths.irn_masks
    with_weights = _context(tmp_path, "irn", irn_weights="/w/resnet50.pth", irn_variant="sipe")
    stages = {stage.name: stage for stage in build_stages(with_weights)}
    train = stages["train_irn"].command(with_weights)
    assert train[train.index("--weights") + 1] == "/w/resnet50.pth"
    assert "sipe" in stages["make_ir_labels"].command(with_weights)


def test_crf_and_affinitynet_refinements(tmp_path):
    crf = _context(tmp_path, "crf")
    names = [stage.name for stage in build_stages(crf)]
    assert not {"train_aff", "train_irn"} & set(names)
    assert _deeplab_pseudo_dir(crf) == crf.paths.crf_masks
    aff = _context(tmp_path, "affinitynet")
    assert "train_aff" in [stage.name for stage in build_stages(aff)]
    # The small profiles train DeepLab on the CRF masks (profile deeplab_masks; the walk's row stays).
    assert aff.deeplab_masks == "crf" and _deeplab_pseudo_dir(aff) == aff.paths.crf_masks
    published = Context("voc12", PROFILES["voc12"], aff.paths, refine="affinitynet")
    assert published.deeplab_masks == "affinitynet" and _deeplab_pseudo_dir(published) == aff.paths.rw_masks
    with pytest.raises(DataError, match="unknown refinement"):
        build_stages(_context(tmp_path, "psa"))


def test_results_table_has_the_irn_row_when_measured(tmp_path):
    for name, miou in (("crf", 44.0), ("irn", 47.5)):
        with open(tmp_path / f"{name}.json", "w") as handle:
            json.dump({"miou_percent": miou}, handle)
    summary = collect_results(str(tmp_path), os.path.join(str(tmp_path), "none.json"), [], "synthetic", {})
    rows = {row["row"]: row["miou"] for row in summary["rows"]}
    assert list(rows) == ["Seed", "+CRF", "Mask (IRN)", "DeepLabV1"]    # no random walk was run
    assert rows["Mask (IRN)"] == 47.5
