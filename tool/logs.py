"""Logging that coexists with tqdm bars, the resolved configuration as JSON, CSV curves.

``sys.stdout`` is never replaced: console messages go through ``tqdm.write`` so they
do not break a running progress bar, and the log file gets the same lines.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
from typing import Any, Mapping, Sequence

from tqdm import tqdm

from tool.fileio import DataError, atomic_write_text

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_HANDLER_MARK = "_avc_pipeline_handler"


class TqdmLoggingHandler(logging.Handler):
    """Writes records with ``tqdm.write`` so they appear above the active bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record))
        except Exception:  # logging must never crash the run
            self.handleError(record)


def setup_logging(log_file: str | None = None, is_main: bool = True,
                  level: int = logging.INFO) -> logging.Logger:
    """Configure the root logger: console via tqdm, plus ``log_file`` on the main rank.

    Non-main ranks only log warnings, so N processes do not print N copies. Calling it
    again (a second run in the same process) replaces the handlers it installed before.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
            handler.close()
    formatter = logging.Formatter(LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [TqdmLoggingHandler()]
    if log_file and is_main:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(formatter)
        setattr(handler, _HANDLER_MARK, True)
        root.addHandler(handler)
    root.setLevel(level if is_main else max(level, logging.WARNING))
    return root


def _json_ready(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    return str(value)


def config_dict(args: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    """The flags as a plain JSON-ready dict (objects that JSON cannot hold become strings)."""
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    return {str(key): _json_ready(value) for key, value in sorted(values.items())}


def save_config(args: argparse.Namespace | Mapping[str, Any], path: str, keep_previous: bool = False) -> None:
    """Write the resolved configuration as indented JSON, atomically.

    ``keep_previous``: an existing file with other content is first renamed to
    ``<stem>.1.json`` (then ``.2``, ...: the highest number is the latest earlier one), so the
    configuration of an earlier run of the same session is never lost.
    """
    text = json.dumps(config_dict(args), indent=2, sort_keys=True) + "\n"
    if keep_previous and os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            previous = handle.read()
        if previous != text:
            stem, extension = os.path.splitext(path)
            number = 1
            while os.path.exists(f"{stem}.{number}{extension}"):
                number += 1
            os.replace(path, f"{stem}.{number}{extension}")
    atomic_write_text(path, text)


class CsvLogger:
    """Append one row per call to a CSV file; an existing file is continued (resume).

    An existing file must have the same header, otherwise two runs with different
    columns would be mixed in one table.
    """

    def __init__(self, path: str, fieldnames: Sequence[str], start_over: bool = False) -> None:
        self.path = path
        self.fieldnames = list(fieldnames)
        # start_over: rows are held back until commit(), which replaces an earlier file, so a
        # run that fails before its first checkpoint leaves the earlier run's log intact.
        self._held: list[dict[str, Any]] | None = [] if start_over else None
        if len(set(self.fieldnames)) != len(self.fieldnames):
            raise ValueError(f"{path}: duplicate CSV column names in {self.fieldnames}")
        if start_over:
            return
        if os.path.isfile(path) and os.path.getsize(path) > 0:
            with open(path, newline="", encoding="utf-8") as handle:
                header = next(csv.reader(handle), [])
            if header != self.fieldnames:
                raise DataError(f"{path}: existing CSV log has columns {header}, this run writes "
                                f"{self.fieldnames}; use another session name or remove the file")
        else:
            self._rewrite([])

    def log(self, row: Mapping[str, Any]) -> None:
        unknown = set(row) - set(self.fieldnames)
        if unknown:
            raise ValueError(f"{self.path}: row has columns {sorted(unknown)} not in the header")
        if self._held is not None:
            self._held.append(dict(row))
            return
        with open(self.path, "a", newline="", encoding="utf-8") as handle:
            csv.DictWriter(handle, fieldnames=self.fieldnames).writerow(row)

    def commit(self) -> None:
        """Write the held-back rows over the earlier file (start_over); afterwards rows append."""
        if self._held is not None:
            rows, self._held = self._held, None
            self._rewrite(rows)

    def read_rows(self) -> list[dict[str, str]]:
        with open(self.path, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))

    def drop_rows_after(self, column: str, last_value: float) -> int:
        """Remove rows whose ``column`` exceeds ``last_value`` (steps a resumed run repeats).

        Returns the number of rows removed.
        """
        if self._held is not None:  # nothing on disk belongs to this run yet
            self._held = [row for row in self._held if float(row[column]) <= last_value]
            return 0
        rows = self.read_rows()
        kept = [row for row in rows if float(row[column]) <= last_value]
        if len(kept) != len(rows):
            self._rewrite(kept)
        return len(rows) - len(kept)

    def _rewrite(self, rows: list[Mapping[str, Any]]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.fieldnames)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path, buffer.getvalue())
