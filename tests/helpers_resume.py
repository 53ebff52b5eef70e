"""The bit-exact resume check shared by the train-script tests: crash a run after a given
optimiser step, resume it with ``--resume auto``, and compare with an uninterrupted run."""
from __future__ import annotations

import csv
import os
from typing import Any, Callable, Sequence

import pytest
import torch

from tool.checkpoint import read_checkpoint
from tool.trainer import Trainer


def log_rows(save_dir: str, session: str) -> list[dict[str, str]]:
    """The rows of a training run's CSV log ``<save_dir>/<session>_log.csv``."""
    with open(os.path.join(save_dir, f"{session}_log.csv"), newline="") as handle:
        return list(csv.DictReader(handle))


class Crash(Exception):
    """Raised in place of a real interruption."""


def assert_resume_is_bit_exact(run: Callable[[Sequence[str]], torch.nn.Module], straight_argv: Sequence[str],
                               argv: Sequence[str], save_dir: str, session: str, crash_after: int,
                               monkeypatch: pytest.MonkeyPatch,
                               records: Callable[[str], Any] | None = None) -> None:
    """``run(argv)`` trains and returns the model. The interrupted run (``argv``, session
    ``session`` in ``save_dir``) must end with the weights of ``straight_argv`` and, if given,
    ``records(session)`` equal to ``records(<straight session>)``."""
    straight = run(straight_argv)
    original_step = Trainer.step

    def crash_after_step(self, loss, terms, **kwargs):
        original_step(self, loss, terms, **kwargs)
        if self.global_step == crash_after:
            raise Crash()

    monkeypatch.setattr(Trainer, "step", crash_after_step)
    with pytest.raises(Crash):
        run(argv)
    monkeypatch.setattr(Trainer, "step", original_step)
    assert read_checkpoint(os.path.join(save_dir, f"{session}_last.pth"))["step"] == crash_after
    resumed = run(list(argv) + ["--resume", "auto"])
    resumed_state = resumed.state_dict()
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed_state[key]), key
    if records is not None:
        straight_session = straight_argv[list(straight_argv).index("--session_name") + 1]
        assert records(straight_session) == records(session)
