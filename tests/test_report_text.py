"""The suite's own report plugin (tests/report_text.py), run as pytest would run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


@pytest.mark.parametrize("where", ["assertion", "output"])
def test_a_failure_with_a_lone_surrogate_is_reported_under_xdist(
    tmp_path: Path, where: str
) -> None:
    body = (
        'assert "\\udc80" == "x"'
        if where == "assertion"
        else 'print("\\udc80", flush=True)\n    assert False'
    )
    (tmp_path / "test_lone.py").write_text(f"def test_lone():\n    {body}\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "-p", "report_text", "-p", "no:randomly",
         "-p", "no:cacheprovider", "-q", "test_lone.py"],
        cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": str(TESTS)},
        capture_output=True, text=True, errors="replace", timeout=120,
    )  # fmt: skip
    assert "INTERNALERROR" not in out.stdout + out.stderr, out.stdout[-3000:]
    assert "1 failed" in out.stdout, out.stdout[-3000:]
    assert "\\udc80" in out.stdout  # escaped, not lost
