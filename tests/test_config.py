"""GuardConfig / GroupConfig: valid forms, env loading, and errors that name their field.

(tests/test_config_table.py holds the long table of bad inputs; here every
error is checked as the user sees it: the field path is in the message.)
"""

from __future__ import annotations

import math
import signal
from typing import Any

import pytest
from pydantic import ValidationError

from taskguard import GroupConfig, GuardConfig, TaskGuard

BAD: list[tuple[dict[str, Any], str]] = [
    ({"exit_wait_timeout": -1}, "exit_wait_timeout"),
    ({"exit_wait_timeout": 0}, "exit_wait_timeout"),
    ({"exit_wait_timeout": math.nan}, "exit_wait_timeout"),
    ({"exit_wait_timeout": math.inf}, "exit_wait_timeout"),
    ({"exit_wait_timeout": "thirty"}, "exit_wait_timeout"),
    ({"cancel_grace": -1}, "cancel_grace"),
    ({"hook_timeout": math.nan}, "hook_timeout"),
    ({"drain_delay": math.inf}, "drain_delay"),
    ({"stream_grace": -0.1}, "stream_grace"),
    ({"exit_signals": ["SIGNOPE"]}, "exit_signals"),
    ({"exit_signals": ["SIGKILL"]}, "exit_signals"),
    ({"exit_signals": ["STOP"]}, "exit_signals"),
    ({"exit_signals": 12345}, "exit_signals"),
    ({"exit_wait": 3}, "exit_wait"),
    ({"handle_signals": "sometimes"}, "handle_signals"),
    ({"groups": {"g": {"timeout": 31}}}, "groups.g.timeout"),
    ({"groups": {"g": {"timeout": -1}}}, "groups.g.timeout"),
    ({"groups": {"g": {"on_shutdown": "later"}}}, "groups.g.on_shutdown"),
    ({"groups": {"g": {"limt": 3}}}, "groups.g.limt"),
    ({"groups": {"g": {"limit": 0}}}, "groups.g.limit"),
    ({"grace_period": 20}, "grace_period"),  # worst case 30 + 5 + 10 = 45
    ({"grace_period": -1}, "grace_period"),
    ({"error_handler": "log it"}, "error_handler"),
]


@pytest.mark.parametrize(("kwargs", "field"), BAD, ids=[f for _, f in BAD])
def test_every_config_error_names_its_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        GuardConfig(**kwargs)
    assert field in str(info.value)
    with pytest.raises(ValidationError):  # the same through TaskGuard(**overrides)
        TaskGuard(**kwargs)


BAD_ENV: list[tuple[dict[str, str], str]] = [
    ({"TASKGUARD_EXIT_WAIT_TIMEOUT": "soon"}, "exit_wait_timeout"),
    ({"TASKGUARD_EXIT_WAIT_TIMEOUT": "inf"}, "exit_wait_timeout"),
    ({"TASKGUARD_CANCEL_GRACE": "-2"}, "cancel_grace"),
    ({"TASKGUARD_EXIT_SIGNALS": '["SIGKILL"]'}, "exit_signals"),
    ({"TASKGUARD_EXIT_SIGNALS": "TERM,"}, "exit_signals"),
    ({"TASKGUARD_HANDLE_SIGNALS": "perhaps"}, "handle_signals"),
    ({"TASKGUARD_EXIT_WAIT": "3"}, "TASKGUARD_EXIT_WAIT"),
    ({"TASKGUARD_GROUPS__G__TIMEOUT": "99"}, "groups.g.timeout"),
    ({"TASKGUARD_GROUPS": '{"g": {"limit": -1}}'}, "groups.g.limit"),
    ({"TASKGUARD_GRACE_PERIOD": "1"}, "grace_period"),
]


@pytest.mark.parametrize(("env", "field"), BAD_ENV, ids=[f for _, f in BAD_ENV])
def test_env_garbage_names_its_field(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], field: str
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError) as info:
        GuardConfig.from_env()
    assert field in str(info.value)


def test_from_env_reads_fields_and_nested_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKGUARD_EXIT_WAIT_TIMEOUT", "20")
    monkeypatch.setenv("TASKGUARD_CANCEL_GRACE", "2.5")
    monkeypatch.setenv("TASKGUARD_EXIT_SIGNALS", '["TERM", 1]')
    monkeypatch.setenv("TASKGUARD_GROUPS", '{"mail": {"limit": 5}}')
    monkeypatch.setenv("TASKGUARD_GROUPS__METRICS__ON_SHUTDOWN", "cancel")
    monkeypatch.setenv("TASKGUARD_GRACE_PERIOD", "60")
    cfg = GuardConfig.from_env(cancel_grace=1)  # keyword overrides win
    assert cfg.exit_wait_timeout == 20
    assert cfg.cancel_grace == 1
    assert cfg.exit_signals == (signal.SIGTERM, signal.SIGHUP)
    assert cfg.groups["mail"].limit == 5
    assert cfg.groups["metrics"].on_shutdown == "cancel"
    assert cfg.grace_period == 60
    assert isinstance(cfg, GuardConfig)


def test_from_env_with_nothing_set_is_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.upper().startswith("TASKGUARD_"):
            monkeypatch.delenv(key)
    assert GuardConfig.from_env() == GuardConfig()


def test_defaults_and_frozen() -> None:
    cfg = GuardConfig()
    assert (cfg.exit_wait_timeout, cfg.cancel_grace, cfg.hook_timeout) == (30, 5, 10)
    assert (cfg.drain_delay, cfg.stream_grace, cfg.handle_signals) == (0, 0, False)
    assert cfg.exit_signals == (signal.SIGINT, signal.SIGTERM)
    assert cfg.group("anything") == GroupConfig()
    with pytest.raises(ValidationError):
        cfg.exit_wait_timeout = 3  # type: ignore[misc]


@pytest.mark.parametrize("value", ["SIGTERM", "TERM", "sigterm", " term ", 15, "15"])
def test_signal_forms(value: object) -> None:
    assert GuardConfig(exit_signals=[value]).exit_signals == (signal.SIGTERM,)


def test_single_signal_and_json_dump() -> None:
    cfg = GuardConfig(exit_signals="HUP", groups={"mail": {"limit": 2}})
    assert cfg.exit_signals == (signal.SIGHUP,)
    dumped = cfg.model_dump(mode="json")
    assert dumped["exit_signals"] == ["SIGHUP"]
    assert "error_handler" not in dumped
    assert GuardConfig.model_validate(dumped) == cfg


def test_taskguard_accepts_config_dict_and_overrides() -> None:
    base = GuardConfig(exit_wait_timeout=10, groups={"mail": GroupConfig(limit=3)})
    assert TaskGuard(base).config is base
    merged = TaskGuard(base, cancel_grace=1).config
    assert (merged.exit_wait_timeout, merged.cancel_grace) == (10, 1)
    assert merged.groups["mail"].limit == 3
    from_dict = TaskGuard({"exit_wait_timeout": 7}, hook_timeout=2).config
    assert (from_dict.exit_wait_timeout, from_dict.hook_timeout) == (7, 2)
    with pytest.raises(TypeError):
        TaskGuard(42)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match=r"groups\.mail\.timeout"):
        TaskGuard(base, exit_wait_timeout=1, groups={"mail": {"timeout": 2}})


def test_grace_period_checked_against_the_worst_case() -> None:
    # exit wait + cancel grace + one after-drain hook at hook_timeout, and the
    # 0.5 s it may take past its timeout before it is abandoned
    assert GuardConfig(exit_wait_timeout=10, cancel_grace=2, hook_timeout=3, grace_period=15.5)
    with pytest.raises(ValidationError, match="grace_period") as info:
        GuardConfig(exit_wait_timeout=10, cancel_grace=2, hook_timeout=3, grace_period=14.9)
    assert "15.5s" in str(info.value)


def test_group_config_alone() -> None:
    g = GroupConfig(on_shutdown="cancel", timeout=3, limit=4, pending_limit=0, on_error="shutdown")
    assert g.pending_limit == 0
    with pytest.raises(ValidationError, match="pending_limit"):
        GroupConfig(pending_limit=3)


@pytest.mark.parametrize(
    "key",
    [
        "TASKGUARD_EXIT_WAIT_TIMEOUT__X",
        "TASKGUARD_HANDLE_SIGNALS__FOO",
        "TASKGUARD_CANCEL_GRACE__",
        "TASKGUARD_GROUPS__",
    ],
)
def test_env_variables_nested_into_a_plain_field_are_errors(
    monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    # Finding 12: they were ignored silently.
    monkeypatch.setenv(key, "1")
    with pytest.raises(ValidationError, match=key):
        GuardConfig.from_env()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"exit_wait_timeout": 1e13},
        {"cancel_grace": 1e300},
        {"hook_timeout": 10**20},
        {"drain_delay": True},
        {"groups": {"g": {"timeout": 1e13}}},
    ],
)
def test_huge_and_boolean_seconds_are_refused(kwargs: dict[str, Any]) -> None:
    # Finding 13: 1e13 was accepted, then the watchdog thread died on it.
    with pytest.raises(ValidationError):
        GuardConfig(**kwargs)
