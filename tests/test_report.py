"""ShutdownReport: contents after a real shutdown, JSON round trip, summary()."""

from __future__ import annotations

import json
import logging

import anyio
import pytest

from taskguard import GroupConfig, ShutdownReport, TaskGuard

pytestmark = pytest.mark.anyio


async def _eventful_guard() -> TaskGuard:
    async def ok() -> None:
        await anyio.sleep(0.05)

    async def bad() -> None:
        raise ValueError("boom")

    async def forever() -> None:
        await anyio.sleep(60)

    config = {
        "exit_wait_timeout": 0.4,
        "cancel_grace": 0.5,
        "groups": {"metrics": GroupConfig(on_shutdown="cancel"), "mail": GroupConfig()},
    }
    async with TaskGuard(config) as guard:
        guard.spawn(ok, group="mail")
        guard.spawn(bad, group="mail")
        guard.spawn(forever, group="metrics")
        guard.spawn(forever, group="mail", name="stuck-ish")
        guard.on_shutdown(lambda: None, name="close-db")
        async with guard.guarded("handler"):
            await anyio.sleep(0.01)
        guard.shutdown(reason="test")
    return guard


async def test_report_contents() -> None:
    guard = await _eventful_guard()
    r = guard.report
    assert r.trigger == "test"
    assert r.duration >= 0.4
    assert list(r.phases) == ["before_drain", "drain", "stopping", "after_drain"]
    assert abs(sum(r.phases.values()) - r.duration) < 0.05
    assert r.groups["mail"].completed == 1
    assert r.groups["mail"].failed == 1
    assert r.groups["mail"].cut == 1
    assert r.groups["metrics"].cancelled == 1
    assert r.groups["metrics"].cut == 0
    assert r.guarded.completed == 1
    assert [(h.name, h.stage, h.outcome) for h in r.hooks] == [("close-db", "after_drain", "ok")]
    assert r.failures == 1
    assert not r.clean  # the mail task was cut by the exit wait
    assert not r.forced


async def test_report_json_round_trip() -> None:
    r = (await _eventful_guard()).report
    text = r.model_dump_json()
    data = json.loads(text)
    assert data["clean"] is False
    assert data["failures"] == 1
    assert data["groups"]["mail"]["cut"] == 1
    again = ShutdownReport.model_validate_json(text)
    assert again == r
    assert again.clean == r.clean
    assert ShutdownReport.model_validate(r.model_dump()) == r


async def test_summary_is_readable() -> None:
    text = (await _eventful_guard()).report.summary()
    lines = text.splitlines()
    assert lines[0].startswith("taskguard shutdown NOT CLEAN: trigger=test")
    assert any(ln.startswith("  phases: before_drain") for ln in lines)
    assert "  group mail (drain): completed=1, failed=1, cancelled=1, cut=1" in lines
    assert "  group metrics (cancel): cancelled=1" in lines
    assert "  guarded: completed=1" in lines
    assert any(ln.startswith("  hook after_drain:close-db ok") for ln in lines)
    assert "  background failures: 1" in lines


async def test_clean_report_summary() -> None:
    async with TaskGuard() as guard:
        pass
    report = guard.report
    assert report.clean
    assert report.summary().startswith("taskguard shutdown clean: trigger=exit")
    assert "group default (drain): no tasks" in report.summary()


async def test_report_before_close_raises() -> None:
    guard = TaskGuard()
    with pytest.raises(RuntimeError, match="idle"):
        _ = guard.report
    async with guard:
        with pytest.raises(RuntimeError, match="running"):
            _ = guard.report


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_log_lines_stay_encodable_with_a_lone_surrogate_in_a_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fails() -> None:
        raise ValueError("x")

    with caplog.at_level(logging.INFO, "taskguard"):
        async with TaskGuard(exit_wait_timeout=1) as guard:
            guard.spawn(fails, name="caf\udce9")
            await anyio.sleep(0.01)
            guard.shutdown("deploy \ud800")
    lines = [r.getMessage() for r in caplog.records if r.name == "taskguard"]
    assert any("caf\\udce9" in line for line in lines), lines
    assert any("deploy \\ud800" in line for line in lines), lines
    for line in lines:
        line.encode("utf-8")  # a UTF-8 handler can write every line
