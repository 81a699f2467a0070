"""A rolling restart behind real HAProxy loses nothing (issue 14), bounded for CI.

The benchmark of ``benchmarks/rolling`` in small: three uvicorn backends
running the taskguard app behind HAProxy (health checks on /healthz/ready
every second), a steady load of plain requests, signups and streams, and one
full rollout (each backend in turn gets SIGTERM and is replaced). About 35 s.

The harness runs as its own process, as ``python -m benchmarks.rolling``:
whatever goes wrong in it (HAProxy or a server not starting) fails the test,
and so does one failed request or lost job.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from servers import ROOT, require, require_program

pytestmark = pytest.mark.slow  # real processes: HAProxy, three servers, a load generator


def run_benchmark(tmp_path: Path, *args: str) -> dict[str, Any]:
    """One run of ``python -m benchmarks.rolling args``; its summary."""
    out = tmp_path / "result.json"
    command = [
        sys.executable, "-m", "benchmarks.rolling", *args,
        "--output", str(out), "--workdir", str(tmp_path / "runs"),
    ]  # fmt: skip
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the harness stops what it started
        output, _ = proc.communicate(timeout=30)
        pytest.fail(f"the benchmark did not finish within 150 s:\n{output.decode()}")
    if proc.returncode != 0:
        pytest.fail(f"the benchmark failed ({proc.returncode}):\n{output.decode()}")
    summary: dict[str, Any] = json.loads(out.read_text())["runs"][0]["summary"]
    return summary


def test_rollout_behind_haproxy_loses_no_request_and_no_job(tmp_path: Path) -> None:
    require_program("haproxy")
    require("uvicorn")
    s = run_benchmark(
        tmp_path,
        "--servers", "uvicorn", "--apps", "taskguard", "--rollouts", "1",
        "--rate", "20", "--signup-rate", "4", "--streams", "3",
    )  # fmt: skip
    requests, jobs, streams = s["requests"], s["jobs"], s["streams"]
    # The run did what it says (else the harness is broken: a real failure, not the
    # expected one): load before, during and after each of the three restarts.
    if requests["plain"] < 200 or jobs["acknowledged"] < 40 or len(s["restarts"]) != 3:
        pytest.fail(f"the run was not what it should be: {json.dumps(s)[:3000]}")
    if streams["gaps"] != 0:
        pytest.fail(f"streams resumed at the wrong item: {streams}")
    # HAProxy took each draining backend out of the pool before its intake stopped.
    assert s["down_within_drain_delay"], s["restarts"]
    assert s["failed_requests"] == 0, (requests["failures"], s["haproxy"])
    assert s["broken_streams"] == 0, streams
    assert s["lost_jobs"] == 0, jobs
