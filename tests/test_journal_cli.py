"""``taskguard journal ls|show|retry|drop`` on a real SQLite journal."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

import taskguard
from taskguard import TaskGuard
from taskguard._cli import main


@taskguard.durable(name="cli.send", max_attempts=1)
async def send(to: str, fail: bool = False) -> None:
    if fail:
        raise RuntimeError("smtp down")
    await anyio.sleep_forever()


@pytest.fixture
def journal(tmp_path: Path) -> str:
    """A journal with one entry (cut at the deadline) and one dead letter."""
    url = f"sqlite:///{tmp_path / 'journal.db'}"

    async def fill() -> None:
        async with TaskGuard(journal=url, exit_wait_timeout=0.1, cancel_grace=0.2):
            await send.spawn("a@example.com", key="welcome-a")
            with pytest.raises(RuntimeError):
                await (await send.spawn("b@example.com", fail=True)).wait()

    anyio.run(fill)
    return url


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["journal", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_ls_show_retry_drop(journal: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "ls", "--journal", journal, "--json")
    assert rc == 0
    listing = json.loads(out)
    (entry,) = listing["entries"]
    (dead,) = listing["dead"]
    assert (entry["name"], entry["key"], entry["owner"]) == ("cli.send", "welcome-a", None)
    assert dead["error"] == "RuntimeError: smtp down"
    rc, out, _ = run(capsys, "ls", "--journal", journal)
    assert "1 journaled entry" in out
    assert "after 1 attempts" in out
    rc, out, _ = run(capsys, "show", dead["id"], "--journal", journal, "--json")
    assert json.loads(out)["arguments"] == {"to": "b@example.com", "fail": True}
    rc, out, _ = run(capsys, "retry", dead["id"], "--journal", journal)
    assert rc == 0
    assert "attempt 1" in out
    rc, out, _ = run(capsys, "ls", "--journal", journal, "--json")
    assert {e["id"] for e in json.loads(out)["entries"]} == {entry["id"], dead["id"]}
    assert json.loads(out)["dead"] == []
    rc, out, _ = run(capsys, "drop", entry["id"], "--journal", journal, "--json")
    assert json.loads(out) == {"action": "drop", "id": entry["id"], "ok": True}
    rc, _, err = run(capsys, "drop", entry["id"], "--journal", journal)
    assert rc == 1
    assert "no entry or dead letter" in err


def test_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "ls", "--journal", f"sqlite:///{tmp_path / 'none.db'}")
    assert rc == 2
    assert "no journal at" in err
    assert not (tmp_path / "none.db").exists()  # looking does not create one
    rc, _, err = run(capsys, "ls", "--journal", "redis://localhost")
    assert rc == 2
    assert "unknown journal URL scheme 'redis'" in err
    rc, _, err = run(capsys, "retry", "x", "--journal", "sqlite:///nowhere/x.db")
    assert rc == 2


def test_the_installed_command_reads_the_url_from_the_environment(journal: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "taskguard", "journal", "ls", "--json"],
        env={"TASKGUARD_JOURNAL": journal, "PATH": ""},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["entries"]) == 1
