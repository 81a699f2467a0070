"""The durable demo: a task cut at the deadline is resumed by the next start."""

from __future__ import annotations

import logging

import pytest

from taskguard._demo.durable import durable_demo


def test_the_demo_checks_out(capsys: pytest.CaptureFixture[str]) -> None:
    level = logging.getLogger("taskguard").level
    assert durable_demo(quick=True) == 0
    assert logging.getLogger("taskguard").level == level  # left as it found it
    out = capsys.readouterr().out
    assert "run 1 closed: cut=2, journaled=1, saved_at_cut=1, completed=0" in out
    assert "run 2 closed: resumed=2, completed=2" in out
    assert "OK: the work cut at the deadline was resumed" in out
