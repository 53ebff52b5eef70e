"""Settings records: what made the outputs of an inference stage, kept next to them.

Each output folder gets ``<script>_settings.json``: the flags that determine the outputs (the
weights by content digest, run-only flags such as ``--num_workers`` or the list left out). A
rerun with the same settings resumes (images whose outputs are done are skipped); a rerun
with other settings stops with one line naming the differences, unless ``--overwrite`` says
to redo the listed images. A folder holding outputs but no record (made by an older version,
or by hand) is treated as made with unknown settings.

    record = OutputRecord("infer_seed", args, lambda image_id: output_paths(args, image_id))
    if record.pending(ids):
        model = ...               # read while the weights' digest is computed on a thread
    todo = record.start(ids)      # checks, removes the listed outputs under --overwrite, writes the record
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

from tool.fileio import DataError, atomic_write_text, pending_ids, read_json_if_present
from tool.logs import config_dict

# Flags that change where or how fast a run works, never what it writes.
RUN_ONLY_FLAGS = frozenset({
    "num_workers", "threads", "batch_images", "shard", "log_dir", "device", "overwrite", "infer_list", "list", "comment",
    "out_cam", "out_cam_pred", "out_crf", "out_vis", "out_rw", "out_dir", "out_json", "logfile",
    "submission",  # which copies are written, not what they hold
})
# Files identified by their content, so a retrained checkpoint at the same path is another input.
CONTENT_FLAGS = ("weights",)
# Folders identified by their absolute path.
PATH_FLAGS = ("voc12_root", "cam_dir", "gt_dir")
# Files in an output folder that are not outputs.
_BOOKKEEPING_SUFFIXES = ("_settings.json", "_config.json", ".log")


def file_digest(path: str) -> str:
    """sha256 (first 16 hex digits) of a file's content; a missing file raises DataError."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: weight file not found")
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def output_settings(args: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    """The flags of ``args`` that determine the outputs, JSON-ready."""
    settings = {key: value for key, value in config_dict(args).items() if key not in RUN_ONLY_FLAGS}
    for key in CONTENT_FLAGS:
        if settings.get(key):
            settings[key] = {"sha256": file_digest(settings[key])}
    for key in PATH_FLAGS:
        if settings.get(key):
            settings[key] = os.path.abspath(settings[key])
    return settings


def _differences(recorded: Mapping[str, Any], current: Mapping[str, Any], limit: int = 4) -> str:
    keys = sorted(key for key in set(recorded) | set(current) if recorded.get(key) != current.get(key))
    shown = "; ".join(f"--{key} {json.dumps(recorded.get(key))} then, {json.dumps(current.get(key))} now"
                      for key in keys[:limit])
    return shown + (f"; ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _holds_outputs(folder: str) -> bool:
    if not os.path.isdir(folder):
        return False
    return any(not name.startswith(".") and not name.endswith(_BOOKKEEPING_SUFFIXES) for name in os.listdir(folder))


class OutputRecord:
    """The settings record of one run of ``script`` over the folders ``outputs_of`` writes to.

    The settings are computed on a thread from the constructor on: the weights' digest reads the
    whole file (0.6 s for a 400 MB ResNet38, GIL released), so the script reads its model
    meanwhile. :meth:`start`, before the first output, waits for them, checks every folder
    (DataError on other settings, unless ``--overwrite``), writes the records and returns the
    pending ids.
    """

    def __init__(self, script: str, args: argparse.Namespace, outputs_of: Callable[[str], Iterable[str]]) -> None:
        self.script, self.outputs_of = script, outputs_of
        self.overwrite = bool(getattr(args, "overwrite", False))
        executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="settings")
        # A copy of the flags now: the script may change args meanwhile.
        self._settings = executor.submit(output_settings, config_dict(args))
        executor.shutdown(wait=False)  # its one thread ends with the task
        folders = {os.path.dirname(path) or os.curdir for path in outputs_of("_probe_")}
        # A folder inside another output folder (test_deeplab's submission copy) is covered by
        # the outer folder's record and keeps only its outputs.
        self.folders = sorted(folder for folder in folders if not any(
            folder != outer and folder.startswith(outer.rstrip(os.sep) + os.sep) for outer in folders))

    @property
    def settings(self) -> dict[str, Any]:
        """The flags that determine the outputs (waits for the weights' digest)."""
        return self._settings.result()

    def pending(self, image_ids: Sequence[str]) -> list[str]:
        """The ids :meth:`start` will return, if the settings allow the run: every one under
        ``--overwrite``, else those whose outputs are not all done. Reads no settings."""
        return list(image_ids) if self.overwrite else pending_ids(image_ids, self.outputs_of)

    def record_path(self, folder: str) -> str:
        return os.path.join(folder, f"{self.script}_settings.json")

    def _check(self, folder: str) -> None:
        path = self.record_path(folder)
        try:
            recorded = read_json_if_present(path)
        except ValueError:
            recorded = {"unreadable": path}
        if recorded is None:
            if _holds_outputs(folder):
                raise DataError(f"{folder}: holds outputs but no {os.path.basename(path)}, so their settings are "
                                f"unknown; rerun with --overwrite to redo them, or write to another folder")
            return
        if recorded != self.settings and _holds_outputs(folder):
            raise DataError(f"{path}: the outputs in {folder} were made with other settings "
                            f"({_differences(recorded, self.settings)}); rerun with --overwrite to redo them, "
                            f"or write to another folder")

    def start(self, image_ids: Sequence[str]) -> list[str]:
        """Check the folders' records (DataError on other settings, unless ``--overwrite``); under
        ``--overwrite`` remove the listed images' outputs; write the records; the ids to do."""
        if not self.overwrite:
            for folder in self.folders:
                self._check(folder)
        if self.overwrite:
            for image_id in image_ids:
                for path in self.outputs_of(image_id):
                    if os.path.isfile(path):
                        os.remove(path)
        text = json.dumps(self.settings, indent=2, sort_keys=True) + "\n"
        for folder in self.folders:
            atomic_write_text(self.record_path(folder), text)
        return pending_ids(image_ids, self.outputs_of)
