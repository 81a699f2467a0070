"""pytest plugin of the conformance runs: write each test's outcome to a JSON file.

The file is named by the environment variable ``CONFORMANCE_RESULTS``; each
test id maps to one of passed, failed, error (setup or teardown), skipped,
xfailed, xpassed.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

_outcomes: dict[str, str] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call":
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if report.skipped else "xpassed"
        else:
            outcome = report.outcome
        if _outcomes.get(report.nodeid) != "error":
            _outcomes[report.nodeid] = outcome
    elif report.failed:
        _outcomes[report.nodeid] = "error"
    elif report.skipped and report.when == "setup":
        _outcomes[report.nodeid] = "xfailed" if hasattr(report, "wasxfail") else "skipped"


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed:
        _outcomes[report.nodeid] = "collection error"


def pytest_sessionfinish(session: Any) -> None:
    path = os.environ.get("CONFORMANCE_RESULTS")
    if path:
        with open(path, "w") as out:
            json.dump(_outcomes, out, indent=0, sort_keys=True)
