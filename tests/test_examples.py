"""The examples say the truth about what happened, and write only where they say.

Real processes: ``uvicorn examples.fastapi_app:app`` on a free port and
``examples/quickstart.py``, stopped with real signals. (Every command of the
README and of the examples' docstrings is run in a fresh venv by
tests/test_readme.py.)
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from children import Child
from helpers_reliability import sigint_inherited_as_default
from servers import running_server

pytestmark = pytest.mark.slow  # real server processes

ROOT = Path(__file__).resolve().parent.parent
APP = "examples.fastapi_app:app"


def _wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_fastapi_example_says_when_background_work_was_cut(tmp_path: Path) -> None:
    env = {"EXAMPLE_DB": str(tmp_path / "signups.sqlite3"), "EXAMPLE_JOB_SECONDS": "60"}
    with running_server("uvicorn", APP, tmp_path, env=env) as server:
        reply = httpx.post(server.url + "/signup", params={"user": "ada"}, timeout=5)
        assert reply.status_code == 202
        server.send_signal(signal.SIGTERM)
        _wait_for(lambda: "shutdown started" in server.output(), 10, "the drain to start")
        server.send_signal(signal.SIGTERM)  # the second exit signal forces: the job is cut
        server.wait_exit(15)
        out = server.output()
    assert "NOT CLEAN" in out, out
    assert "background work already drained" not in out, out
    assert "background work was cut" in out, out


def test_fastapi_example_says_drained_after_a_clean_shutdown(tmp_path: Path) -> None:
    env = {"EXAMPLE_DB": str(tmp_path / "signups.sqlite3"), "EXAMPLE_JOB_SECONDS": "0.5"}
    with running_server("uvicorn", APP, tmp_path, env=env) as server:
        httpx.post(server.url + "/signup", params={"user": "ada"}, timeout=5)
        server.send_signal(signal.SIGTERM)
        server.wait_exit(15)
        out = server.output()
    assert "background work already drained" in out, out


def test_fastapi_example_keeps_its_database_out_of_the_current_directory(
    tmp_path: Path,
) -> None:
    temp = tmp_path / "temp"
    temp.mkdir()
    env = {"EXAMPLE_JOB_SECONDS": "0", "TMPDIR": str(temp)}
    with running_server("uvicorn", APP, tmp_path, env=env) as server:
        httpx.post(server.url + "/signup", params={"user": "ada"}, timeout=5)
        _wait_for(
            lambda: httpx.get(server.url + "/signups", timeout=5).json() == ["ada"],
            10,
            "the signup row",
        )
    # the server ran with tmp_path as its current directory (tests/servers.py)
    assert sorted(p.name for p in tmp_path.glob("*.sqlite3")) == []
    assert (temp / "taskguard-example.sqlite3").exists()


def _quickstart(*signals: int) -> tuple[int, str]:
    """Run examples/quickstart.py, send ``signals`` once it runs; exit status and output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKGUARD_")}
    with sigint_inherited_as_default():
        child = Child([sys.executable, str(ROOT / "examples" / "quickstart.py")], cwd=ROOT,
                      env=env, stderr="merge")  # fmt: skip
    with child:
        child.wait_for("running: press Ctrl-C", timeout=30)
        for sig in signals:
            child.signal(sig)
            time.sleep(0.3)
        return child.wait(30), child.output() + "\n"


def test_quickstart_prints_the_summary_once_when_clean() -> None:
    code, out = _quickstart(signal.SIGINT)
    assert code == 0, out
    assert out.count("taskguard shutdown clean") == 1, out
    assert "mail sent to ada" in out


def test_quickstart_prints_the_summary_once_when_not_clean() -> None:
    code, out = _quickstart(signal.SIGINT, signal.SIGINT)  # the second forces: the mail is cut
    assert code == 1, out
    assert out.count("taskguard shutdown NOT CLEAN") == 1, out
