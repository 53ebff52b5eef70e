"""Issue 14: a rerun never reports stale results, a NaN never reaches a checkpoint, every
failure is one line (exit 2), a failed rerun keeps the training history, bad lists and images
are refused before compute, outputs get the umask's mode."""
from __future__ import annotations

import errno
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import evaluation
import infer_seed
import train_avc
from network.avc import AVCNet
from network.weights import load_trained
from tests import helpers_toy_train
from tool.checkpoint import load_checkpoint, non_finite_keys, read_checkpoint, save_checkpoint
from tool.cli import main_exit_code
from tool.distributed import setup_distributed
from tool.fileio import (DataError, atomic_write_text, check_images_decode, read_id_list,
                         save_npy, save_score_dict)
from tool.nan_guard import NonFiniteLossError
from tool.trainer import Trainer
from voc12.data import check_images
from voc12.prepare import prepare_voc
from voc12.synthetic import generate_dataset
from workflow.datasets import get_dataset_info
from workflow.pipeline import PROFILES, Context, Paths, Stage, marker_path, run_stages, stage_done, stale_stages

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTH = 0.0625
NUM_CLASSES = 3


def _one_line_error(capsys, main, argv) -> str:
    """Run ``main`` as an entry point; assert exit 2 and one line on stderr (after any progress
    bar); return that line."""
    capsys.readouterr()
    code = main_exit_code(main, argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.endswith("\n"), err
    line = err.rstrip("\n").replace("\r", "\n").splitlines()[-1]
    assert line.startswith("error: ") and err.count("error: ") == 1, err
    return line


# --------------------------------------------------------------------------- 1. stage markers
def _context(tmp_path, profile_name: str = "tiny") -> Context:
    work = str(tmp_path / "work")
    return Context(profile_name, PROFILES[profile_name], Paths.under(work, os.path.join(work, "data"),
                                                                     str(tmp_path / "results")))


def _toy_stages(tmp_path, fail: dict) -> list[Stage]:
    """Stage a writes a.txt from the profile name; b copies it to b.txt; each run is logged in runs.txt."""
    a_out, b_out, runs = (str(tmp_path / name) for name in ("a.txt", "b.txt", "runs.txt"))

    def script(name: str, body: str) -> str:
        return f"open({runs!r}, 'a').write({name!r} + '\\n'); {body}"

    return [
        Stage("a", lambda c: ["-c", script("a", f"import sys; sys.exit({int(fail.get('a', 0))}) if "
                                                f"{fail.get('a', 0)} else open({a_out!r}, 'w').write({c.profile_name!r})")],
              outputs=(a_out,)),
        Stage("b", lambda c: ["-c", script("b", f"open({b_out!r}, 'w').write(open({a_out!r}).read())")],
              outputs=(b_out,)),
    ]


def _runs(tmp_path) -> list[str]:
    path = tmp_path / "runs.txt"
    runs = path.read_text().split() if path.exists() else []
    path.write_text("")
    return runs


def test_markers_rerun_what_changed_and_never_survive_a_failed_rerun(tmp_path, capsys):
    fail: dict = {}
    ctx = _context(tmp_path)
    stages = _toy_stages(tmp_path, fail)
    assert run_stages(ctx, stages) == 0 and _runs(tmp_path) == ["a", "b"]
    assert stage_done(ctx, stages[0])["profile"] == "tiny"
    assert run_stages(ctx, stages) == 0 and _runs(tmp_path) == []            # all current: nothing reruns
    # A forced rerun that fails: the marker goes before the outputs, so the next plain run redoes it.
    fail["a"] = 1
    assert run_stages(ctx, stages, from_stage="a") == 1 and _runs(tmp_path) == ["a"]
    assert stage_done(ctx, stages[0]) is None and not (tmp_path / "a.txt").exists()
    fail.clear()
    assert run_stages(ctx, stages) == 0 and _runs(tmp_path) == ["a", "b"]
    # Another profile on the same work dir reruns every stage (outputs removed first).
    other = _context(tmp_path, "synthetic")
    assert stale_stages(other, stages) == ["a", "b"]
    assert run_stages(other, stages) == 0 and _runs(tmp_path) == ["a", "b"]
    assert (tmp_path / "b.txt").read_text() == "synthetic"
    # --only a reruns a; b was made from the old a, so it is stale and the next plain run redoes it.
    assert run_stages(other, stages, only="a") == 0 and _runs(tmp_path) == ["a"]
    assert stale_stages(other, stages) == ["b"]
    assert run_stages(other, stages) == 0 and _runs(tmp_path) == ["b"]
    assert stale_stages(other, stages) == []


def test_an_interrupted_stage_resumes_only_with_the_same_configuration(tmp_path):
    ctx = _context(tmp_path)
    stages = _toy_stages(tmp_path, {})
    assert run_stages(ctx, stages) == 0
    # What an interrupt (SIGINT) leaves: the started marker, no done marker, partial outputs.
    os.remove(marker_path(ctx, stages[1]))
    with open(os.path.join(ctx.paths.stages, "b.started.json"), "w") as handle:
        json.dump({"fingerprint": "of another configuration"}, handle)
    (tmp_path / "b.txt").write_text("partial")
    _runs(tmp_path)
    assert run_stages(ctx, stages) == 0 and _runs(tmp_path) == ["b"]
    assert (tmp_path / "b.txt").read_text() == "tiny"
    assert not os.path.exists(os.path.join(ctx.paths.stages, "b.started.json"))


def _beside_stages(tmp_path, fail_b: bool = False, wait: float = 20.0) -> list[Stage]:
    """a; b, which waits (up to ``wait`` s) for c to have started; c, which needs only a and runs beside b."""
    flag, runs = str(tmp_path / "c_started"), str(tmp_path / "runs.txt")
    wait_for_c = (f"import os, sys, time; open({runs!r}, 'a').write('b\\n'); deadline = time.time() + {wait}\n"
                  f"while not os.path.exists({flag!r}) and time.time() < deadline: time.sleep(0.05)\n"
                  f"print('c seen' if os.path.exists({flag!r}) else 'c not seen'); sys.exit({int(fail_b)})")
    return [
        Stage("a", lambda c: ["-c", f"open({runs!r}, 'a').write('a\\n')"]),
        Stage("b", lambda c: ["-c", wait_for_c]),
        Stage("c", lambda c: ["-c", f"open({runs!r}, 'a').write('c\\n'); open({flag!r}, 'w').write('1'); "
                                    f"print('c ran')"], needs=("a",), beside="b"),
    ]


def test_a_stage_beside_another_runs_at_the_same_time_and_resumes_by_its_own_inputs(tmp_path, capfd):
    ctx = _context(tmp_path)  # the tiny profile: one torch thread a stage, 2 cores here
    stages = _beside_stages(tmp_path)
    assert run_stages(ctx, stages) == 0 and sorted(_runs(tmp_path)) == ["a", "b", "c"]
    out = capfd.readouterr().out
    assert "c seen" in out                      # b saw c start while b was running
    assert "==> [c]" in out and "(beside b;" in out
    log = os.path.join(ctx.paths.stages, "c.log")
    assert "\nc ran\n" in open(log).read()    # c's output went to its log, not between b's lines
    assert stage_done(ctx, stages[2])["beside"] == "b"
    assert stale_stages(ctx, stages) == []
    assert run_stages(ctx, stages) == 0 and _runs(tmp_path) == []
    # c's fingerprint covers a only: rerunning b leaves c current; rerunning a makes it stale.
    assert run_stages(ctx, stages, only="b") == 0 and stale_stages(ctx, stages) == []
    assert run_stages(ctx, stages, only="a") == 0 and stale_stages(ctx, stages) == ["b", "c"]
    _runs(tmp_path)
    assert run_stages(ctx, stages) == 0 and sorted(_runs(tmp_path)) == ["b", "c"]
    assert open(log).read().count("\nc ran\n") == 2  # a rerun appends to the log
    # Without a core each (no thread limit in the profile), c waits for its own turn.
    sequential = Context("voc12", PROFILES["voc12"], ctx.paths)
    os.remove(str(tmp_path / "c_started"))
    assert run_stages(sequential, _beside_stages(tmp_path, wait=1.0)) == 0
    assert "c not seen" in capfd.readouterr().out and _runs(tmp_path) == ["a", "b", "c"]


def test_a_failure_beside_a_stage_keeps_the_other_stage_s_result(tmp_path, capfd):
    ctx = _context(tmp_path)
    stages = _beside_stages(tmp_path, fail_b=True)
    assert run_stages(ctx, stages) == 1
    assert stage_done(ctx, stages[1]) is None
    assert stage_done(ctx, stages[2]) is not None   # c finished beside the failed b: kept, not redone
    assert "stage 'b' failed" in capfd.readouterr().err
    _runs(tmp_path)
    assert run_stages(ctx, _beside_stages(tmp_path)) == 0 and _runs(tmp_path) == ["b"]


def test_the_summary_counts_stages_beside_others_once_and_no_pause_between_runs():
    from workflow.report import collect_results, format_summary

    def marker(name: str, start: float, end: float, **extra) -> dict:
        return {"stage": name, "seconds": end - start, "command": name, "started_at": start, "ended_at": end, **extra}
    markers = [marker("a", 0, 10), marker("b", 10, 30), marker("c", 12, 25, beside="b"),
               marker("d", 100, 104),                                  # resumed an hour later
               {"stage": "e", "seconds": 5.0, "command": "e"}]         # a marker of an older version
    summary = collect_results("/nonexistent", "/nonexistent/curve.json", markers, "tiny", {})
    assert summary["total_seconds"] == 52.0 and summary["wall_seconds"] == 39.0
    text = format_summary(summary)
    assert "| c (beside b) | 13.0 |" in text and "| end to end (stages beside others counted once) | 39.0 |" in text

# --------------------------------------------------------------------------- 2. NaN never saved
def _toy_argv(save_dir, *extra: str) -> list[str]:
    return ["--save_dir", str(save_dir), "--max_iters", "6", "--save_every", "1", "--num_samples", "4", *extra]


def test_diverged_training_stops_before_writing_non_finite_weights(root, tmp_path, capsys):
    # The run: at lr 1e6 BatchNorm's running_var overflows a step before the loss does.
    argv = ["--dataset", "synthetic", "--voc12_root", root, "--train_list", os.path.join(root, "train.txt"),
            "--save_dir", str(tmp_path), "--session_name", "avc", "--width_mult", str(WIDTH), "--num_workers", "0",
            "--crop_size", "32", "--resize_long", "32", "40", "--batch_size", "3", "--max_epoches", "6",
            "--lr", "1e6", "--save_every", "1"]
    code = main_exit_code(train_avc.main, argv)
    err = capsys.readouterr().err
    assert code == 3, err
    last = tmp_path / "avc_last.pth"
    state = read_checkpoint(str(last))
    assert not [key for key, value in state["model"].items()
                if value.is_floating_point() and not torch.isfinite(value).all()]
    assert f"{last} (step {state['step']}) is the last good state" in err
    assert f"parameters/buffers are not finite" in err and "avc_last.pth was not written" in err


def test_non_finite_checkpoints_are_never_written_nor_loaded(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    path = str(tmp_path / "poisoned.pth")
    model[1].running_var[0] = float("inf")
    with pytest.raises(NonFiniteLossError, match=r"1 parameters/buffers are not finite, e\.g\. model\.1\.running_var"):
        save_checkpoint(path, model, None, step=5, epoch=0)
    assert not os.path.exists(path)
    torch.save({"model": model.state_dict(), "step": 5, "epoch": 0}, path)   # made by an older version
    with pytest.raises(DataError, match="poisoned.pth: 1 tensors are not finite"):
        load_checkpoint(path, nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    with pytest.raises(DataError, match="poisoned.pth: 1 tensors are not finite"):
        load_trained(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), path)


def test_the_finite_check_sees_every_nan_and_inf_and_no_overflow():
    big = torch.full((8,), 3e38)  # finite entries whose sum overflows to inf: still finite
    nan, inf = torch.ones(5), torch.ones(2, 3)
    nan[3], inf[1, 2] = float("nan"), float("-inf")
    state = {"big": big, "nan": nan, "nested": {"inf": inf, "ok": torch.zeros(3)}, "ints": torch.arange(4)}
    assert non_finite_keys(state) == ["nan", "nested.inf"]


def test_nan_cam_dicts_are_neither_written_nor_scored(tmp_path, capsys):
    cam = {0: np.full((4, 4), np.nan, dtype=np.float32)}
    with pytest.raises(DataError, match="a.npy: scores of key 0 are not finite"):
        save_score_dict(str(tmp_path / "a.npy"), cam)
    assert not (tmp_path / "a.npy").exists()
    save_npy(str(tmp_path / "cam" / "a.npy"), cam)                        # made by an older version
    gt = tmp_path / "gt"
    gt.mkdir()
    Image.fromarray(np.ones((4, 4), np.uint8), mode="L").save(gt / "a.png")
    (tmp_path / "list.txt").write_text("a\n")
    err = _one_line_error(capsys, evaluation.main, ["--list", str(tmp_path / "list.txt"), "--predict_dir",
                                                    str(tmp_path / "cam"), "--gt_dir", str(gt), "--type", "npy",
                                                    "--num_workers", "0"])
    assert "a.npy: scores of key 0 are not finite" in err


# --------------------------------------------------------------------------- 3. settings records
@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("reliability") / "syn")
    generate_dataset(path, num_train=3, num_val=1, image_size=32, num_classes=NUM_CLASSES, seed=5)
    prepare_voc(get_dataset_info("synthetic", path), workers=1)
    return path


def _weights(tmp_path, name: str, seed: int, poison: bool = False) -> str:
    torch.manual_seed(seed)
    model = AVCNet(num_classes=NUM_CLASSES, width_mult=WIDTH)
    state = model.state_dict()
    if poison:
        state["fc8.weight"][0, 0] = float("nan")
    path = str(tmp_path / name)
    torch.save({"model": state, "args": {"width_mult": WIDTH}}, path)
    return path


def _seed_argv(root: str, weights: str, out, *extra: str) -> list[str]:
    return ["--dataset", "synthetic", "--voc12_root", root, "--weights", weights, "--num_workers", "0",
            "--out_cam", str(out), "--scales", "1.0", *extra]


def test_inference_outputs_resume_only_with_their_settings(root, tmp_path, capsys):
    weights = _weights(tmp_path, "a.pth", 0)
    out = tmp_path / "cam"
    assert main_exit_code(infer_seed.main, _seed_argv(root, weights, out)) == 0
    record = json.loads((out / "infer_seed_settings.json").read_text())
    assert record["scales"] == [1.0] and "sha256" in record["weights"] and "num_workers" not in record
    ids = read_id_list(os.path.join(root, "train.txt"))
    first = out / f"{ids[0]}.npy"
    stamps = {image_id: (out / f"{image_id}.npy").stat().st_mtime_ns for image_id in ids}
    config_before = (out / "infer_seed_config.json").read_text()
    # Other weights or scales: one line naming the difference; nothing (the config included) rewritten.
    err = _one_line_error(capsys, infer_seed.main, _seed_argv(root, _weights(tmp_path, "b.pth", 1), out,
                                                               "--scales", "1.0", "0.5"))
    assert "made with other settings" in err and "--scales [1.0] then, [1.0, 0.5] now" in err
    assert "--weights" in err and "--overwrite" in err
    assert (out / "infer_seed_config.json").read_text() == config_before
    # The same settings resume; a zero-byte output is not done and is redone.
    first.write_bytes(b"")
    assert main_exit_code(infer_seed.main, _seed_argv(root, weights, out, "--num_workers", "0")) == 0
    assert first.stat().st_size > 0
    assert all((out / f"{i}.npy").stat().st_mtime_ns == stamps[i] for i in ids[1:])
    # --overwrite redoes every listed image with the new settings.
    assert main_exit_code(infer_seed.main, _seed_argv(root, weights, out, "--scales", "1.0", "0.5",
                                                      "--overwrite")) == 0
    assert json.loads((out / "infer_seed_settings.json").read_text())["scales"] == [1.0, 0.5]
    assert all((out / f"{i}.npy").stat().st_mtime_ns != stamps[i] for i in ids[1:])


def test_poisoned_weights_are_refused_by_inference(root, tmp_path, capsys):
    err = _one_line_error(capsys, infer_seed.main,
                          _seed_argv(root, _weights(tmp_path, "nan.pth", 0, poison=True), tmp_path / "cam"))
    assert "nan.pth: 1 tensors are not finite" in err


# --------------------------------------------------------------------------- 4. one line, exit 2
def test_filesystem_errors_are_one_line_naming_the_path(root, tmp_path, capsys, monkeypatch):
    weights = _weights(tmp_path, "a.pth", 0)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    err = _one_line_error(capsys, infer_seed.main, _seed_argv(root, weights, blocker))
    assert str(blocker) in err and "a file is where a folder is needed" in err
    err = _one_line_error(capsys, evaluation.main, ["--list", os.path.join(root, "train.txt"), "--voc12_root", root,
                                                    "--dataset", "synthetic", "--predict_dir",
                                                    get_dataset_info("synthetic", root).label_folder, "--type", "png",
                                                    "--num_workers", "0", "--out_json", str(blocker / "r.json")])
    assert str(blocker) in err
    # A full disk (ENOSPC at write) and a read-only file system name the output file.
    real_open = open

    def failing_open(path, mode="r", *args, **kwargs):
        if "w" in mode and ".tmp_" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", failing_open)
    err = _one_line_error(capsys, lambda argv: atomic_write_text(str(tmp_path / "out.txt"), "x"), None)
    assert err == f"error: {tmp_path / 'out.txt'}: {os.strerror(errno.ENOSPC)}"
    monkeypatch.setattr("builtins.open", real_open)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "ro"))

    monkeypatch.setattr("os.makedirs", read_only)
    err = _one_line_error(capsys, infer_seed.main, _seed_argv(root, weights, tmp_path / "ro"))
    assert err == f"error: {tmp_path / 'ro'}: {os.strerror(errno.EROFS)}"


class _Corrupt(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        raise DataError(f"image{index}.jpg: cannot decode image (broken data stream)")


def test_data_error_in_a_loader_worker_is_the_same_one_line(capsys):
    def main(argv):
        for _ in torch.utils.data.DataLoader(_Corrupt(), num_workers=1):
            pass

    err = _one_line_error(capsys, main, None)
    assert err == "error: image0.jpg: cannot decode image (broken data stream)"


def test_resume_of_another_width_and_a_random_weights_file(tmp_path, capsys):
    checkpoint = str(tmp_path / "wide.pth")
    save_checkpoint(checkpoint, AVCNet(num_classes=NUM_CLASSES, width_mult=0.125), None, step=1, epoch=0)
    with pytest.raises(DataError) as info:
        load_checkpoint(checkpoint, AVCNet(num_classes=NUM_CLASSES, width_mult=WIDTH))
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    assert "wide.pth does not match AVCNet; first shape conflict:" in message and "another --width_mult?" in message
    garbage = tmp_path / "random.pth"
    garbage.write_bytes(b"\x13" + np.random.default_rng(0).bytes(299))  # neither zip nor pickle
    with pytest.raises(DataError, match="random.pth: neither a torch checkpoint .* nor an MXNet .params file"):
        load_trained(AVCNet(num_classes=NUM_CLASSES, width_mult=WIDTH), str(garbage))


# --------------------------------------------------------------------------- 5. training reruns
def test_a_failed_rerun_keeps_the_training_history(tmp_path, capsys):
    assert main_exit_code(helpers_toy_train.main, _toy_argv(tmp_path, "--max_iters", "2")) == 0
    log = (tmp_path / "toy_log.csv").read_text()
    config = (tmp_path / "toy_config.json").read_text()
    assert len(log.splitlines()) == 3
    err = _one_line_error(capsys, helpers_toy_train.main, _toy_argv(tmp_path, "--max_iters", "2"))
    assert "already holds a run named 'toy'" in err and "--resume auto" in err and "--overwrite" in err
    # --overwrite that fails before its first checkpoint: log and config of the earlier run survive.
    assert main_exit_code(helpers_toy_train.main, _toy_argv(tmp_path, "--max_iters", "3", "--save_every", "0",
                                                            "--overwrite", "--nan_at_step", "2")) == 3
    assert (tmp_path / "toy_log.csv").read_text() == log
    assert (tmp_path / "toy_config.1.json").read_text() == config        # kept beside the new config
    # --overwrite that reaches a checkpoint replaces the log.
    assert main_exit_code(helpers_toy_train.main, _toy_argv(tmp_path, "--max_iters", "3", "--overwrite")) == 0
    assert [line.split(",")[0] for line in (tmp_path / "toy_log.csv").read_text().splitlines()] == \
        ["step", "1", "2", "3"]
    capsys.readouterr()


def test_a_second_log_of_the_run_is_kept_until_the_first_new_checkpoint(tmp_path):
    # train_deeplab's <session>_val.csv under --overwrite: the earlier rows stay until a checkpoint.
    val_path = tmp_path / "t_val.csv"
    val_path.write_text("step,miou\n1,0.5\n")
    model = nn.Sequential(nn.Conv2d(3, 2, 1))
    model.new_layers = ("0",)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = Trainer(model, optimizer, None, setup_distributed(use_cuda=False), max_step=2, steps_per_epoch=2,
                      loss_names=("a",), save_dir=str(tmp_path), session_name="t", start_over=True)
    trainer.resume(None)
    val_log = trainer.open_log(str(val_path), ("step", "miou"))
    loss = model(torch.randn(1, 3, 4, 4)).pow(2).mean()
    trainer.step(loss, {"a": loss})
    val_log.log({"step": 1, "miou": "0.25"})
    assert val_path.read_text() == "step,miou\n1,0.5\n"                   # not yet replaced
    trainer.save_last()
    assert val_path.read_text().splitlines() == ["step,miou", "1,0.25"]


# --------------------------------------------------------------------------- 6. lists, labels, images, modes
def test_duplicate_ids_are_rejected_naming_the_first(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("a 1\nb 0\n\nc\nb 1\na\n")
    with pytest.raises(DataError, match=r"list.txt: id 'b' is listed twice \(lines 2 and 5\)"):
        read_id_list(str(path))


def test_prepare_rejects_a_label_of_another_size(tmp_path):
    root = str(tmp_path / "syn")
    generate_dataset(root, num_train=2, num_val=1, image_size=32, num_classes=NUM_CLASSES, seed=1)
    info = get_dataset_info("synthetic", root)
    image_id = read_id_list(os.path.join(root, "ImageSets", "Segmentation", "train.txt"))[0]
    label = Image.open(info.gt_path(image_id))
    label.resize((label.width + 1, label.height)).save(info.gt_path(image_id))
    with pytest.raises(DataError, match=f"{image_id}.png: label size .* does not match image size"):
        prepare_voc(info, workers=1)


def test_every_listed_image_is_checked_to_decode_once(root, tmp_path, monkeypatch):
    info = get_dataset_info("synthetic", root)
    ids = read_id_list(os.path.join(root, "train.txt"))
    check_images(info, ids, None)                                         # all decode: cached
    monkeypatch.setattr("tool.fileio._decoded_size", lambda path: pytest.fail(f"{path} decoded again"))
    check_images(info, ids, None)
    monkeypatch.undo()
    broken = tmp_path / "broken.jpg"
    data = open(info.image_path(ids[0]), "rb").read()
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="broken.jpg: cannot decode image"):
        check_images_decode([info.image_path(ids[1]), str(broken)], str(tmp_path / "cache.json"))


def test_outputs_get_the_mode_of_a_plain_open(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_text(str(tmp_path / "a.txt"), "x")
        with open(tmp_path / "b.txt", "w") as handle:
            handle.write("x")
    finally:
        os.umask(old)
    assert oct((tmp_path / "a.txt").stat().st_mode & 0o777) == oct((tmp_path / "b.txt").stat().st_mode & 0o777)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
