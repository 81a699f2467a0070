"""Bad input, table-driven: every mistake is a validation error naming its field.

Each row is one mistake a user can make in code (keyword arguments, a dict)
or in the environment (``TASKGUARD_*``). The test checks three things: the
error is a pydantic ``ValidationError``, it names the field path (in the
error's ``loc`` or, for checks across fields, in its message), and nothing
started: ``TaskGuard(...)`` raised in its constructor, before any event loop,
task or signal handler existed.
"""

from __future__ import annotations

import math
import signal
import threading
from typing import Any

import pytest
from pydantic import ValidationError

from taskguard import GroupConfig, GuardConfig, TaskGuard

# (id, keyword arguments, the field path the error must name)
KWARG_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("exit-wait-negative", {"exit_wait_timeout": -1}, "exit_wait_timeout"),
    ("exit-wait-zero", {"exit_wait_timeout": 0}, "exit_wait_timeout"),
    ("exit-wait-nan", {"exit_wait_timeout": math.nan}, "exit_wait_timeout"),
    ("exit-wait-inf", {"exit_wait_timeout": math.inf}, "exit_wait_timeout"),
    ("exit-wait-string", {"exit_wait_timeout": "soon"}, "exit_wait_timeout"),
    ("exit-wait-none", {"exit_wait_timeout": None}, "exit_wait_timeout"),
    ("cancel-grace-negative", {"cancel_grace": -0.5}, "cancel_grace"),
    ("cancel-grace-nan", {"cancel_grace": math.nan}, "cancel_grace"),
    ("cancel-grace-inf", {"cancel_grace": math.inf}, "cancel_grace"),
    ("hook-timeout-zero", {"hook_timeout": 0}, "hook_timeout"),
    ("hook-timeout-negative", {"hook_timeout": -3}, "hook_timeout"),
    ("hook-timeout-nan", {"hook_timeout": math.nan}, "hook_timeout"),
    ("hook-timeout-neg-inf", {"hook_timeout": -math.inf}, "hook_timeout"),
    ("drain-delay-negative", {"drain_delay": -1}, "drain_delay"),
    ("drain-delay-inf", {"drain_delay": math.inf}, "drain_delay"),
    ("drain-delay-above-exit-wait", {"exit_wait_timeout": 5, "drain_delay": 6}, "drain_delay"),
    ("stream-grace-nan", {"stream_grace": math.nan}, "stream_grace"),
    ("stream-grace-above-exit-wait", {"exit_wait_timeout": 5, "stream_grace": 5}, "stream_grace"),
    ("grace-period-zero", {"grace_period": 0}, "grace_period"),
    (
        "grace-period-below-worst-case",
        {"exit_wait_timeout": 20, "grace_period": 25},
        "grace_period",
    ),
    ("signal-unknown-name", {"exit_signals": ["SIGFOO"]}, "exit_signals"),
    ("signal-unknown-number", {"exit_signals": [99999]}, "exit_signals"),
    ("signal-uncatchable", {"exit_signals": ["KILL"]}, "exit_signals"),
    ("signal-wrong-type", {"exit_signals": [1.5]}, "exit_signals"),
    ("signal-bool", {"exit_signals": [True]}, "exit_signals"),
    ("signal-twice", {"exit_signals": ["TERM", "SIGTERM"]}, "exit_signals"),
    ("signals-empty-but-handled", {"handle_signals": True, "exit_signals": []}, "exit_signals"),
    ("unknown-field", {"exit_wait_tmeout": 3}, "exit_wait_tmeout"),
    ("handle-signals-garbage", {"handle_signals": "maybe"}, "handle_signals"),
    ("error-handler-not-callable", {"error_handler": 3}, "error_handler"),
    ("groups-not-a-dict", {"groups": [1]}, "groups"),
    ("group-unknown-field", {"groups": {"g": {"timeuot": 5}}}, "groups.g.timeuot"),
    ("group-timeout-negative", {"groups": {"g": {"timeout": -1}}}, "groups.g.timeout"),
    ("group-timeout-zero", {"groups": {"g": {"timeout": 0}}}, "groups.g.timeout"),
    ("group-timeout-nan", {"groups": {"g": {"timeout": math.nan}}}, "groups.g.timeout"),
    ("group-timeout-inf", {"groups": {"g": {"timeout": math.inf}}}, "groups.g.timeout"),
    (
        "group-timeout-above-exit-wait",
        {"exit_wait_timeout": 10, "groups": {"g": {"timeout": 11}}},
        "groups.g.timeout",
    ),
    ("group-policy-unknown", {"groups": {"g": {"on_shutdown": "wait"}}}, "groups.g.on_shutdown"),
    ("group-on-error-unknown", {"groups": {"g": {"on_error": "crash"}}}, "groups.g.on_error"),
    ("group-limit-zero", {"groups": {"g": {"limit": 0}}}, "groups.g.limit"),
    ("group-limit-string", {"groups": {"g": {"limit": "many"}}}, "groups.g.limit"),
    ("group-limit-float", {"groups": {"g": {"limit": 2.5}}}, "groups.g.limit"),
    (
        "group-pending-limit-negative",
        {"groups": {"g": {"limit": 1, "pending_limit": -1}}},
        "groups.g.pending_limit",
    ),
    ("group-pending-without-limit", {"groups": {"g": {"pending_limit": 3}}}, "pending_limit"),
]

# Booleans are ints to Python, and pydantic's lax mode turns True into 1: a
# flag put in the wrong place would silently become a one-second timeout or a
# limit of one task (found by this test; fixed in the core).
BOOL_AS_NUMBER_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("exit-wait-bool", {"exit_wait_timeout": True}, "exit_wait_timeout"),
    ("group-limit-bool", {"groups": {"g": {"limit": True}}}, "groups.g.limit"),
]

# (id, environment, the field path the error must name)
ENV_CASES: list[tuple[str, dict[str, str], str]] = [
    ("env-exit-wait-garbage", {"TASKGUARD_EXIT_WAIT_TIMEOUT": "abc"}, "exit_wait_timeout"),
    ("env-exit-wait-nan", {"TASKGUARD_EXIT_WAIT_TIMEOUT": "nan"}, "exit_wait_timeout"),
    ("env-exit-wait-negative", {"TASKGUARD_EXIT_WAIT_TIMEOUT": "-5"}, "exit_wait_timeout"),
    ("env-cancel-grace-inf", {"TASKGUARD_CANCEL_GRACE": "inf"}, "cancel_grace"),
    ("env-cancel-grace-empty", {"TASKGUARD_CANCEL_GRACE": ""}, "cancel_grace"),
    ("env-hook-timeout-zero", {"TASKGUARD_HOOK_TIMEOUT": "0"}, "hook_timeout"),
    ("env-handle-signals-garbage", {"TASKGUARD_HANDLE_SIGNALS": "perhaps"}, "handle_signals"),
    ("env-signal-unknown", {"TASKGUARD_EXIT_SIGNALS": '["FOO"]'}, "exit_signals"),
    ("env-unknown-variable", {"TASKGUARD_EXIT_WAIT_TIMOUT": "3"}, "TASKGUARD_EXIT_WAIT_TIMOUT"),
    ("env-group-limit-garbage", {"TASKGUARD_GROUPS__MAIL__LIMIT": "x"}, "groups.mail.limit"),
    ("env-group-unknown-field", {"TASKGUARD_GROUPS__MAIL__LIMT": "3"}, "groups.mail.limt"),
    (
        "env-group-timeout-above-exit-wait",
        {"TASKGUARD_GROUPS__MAIL__TIMEOUT": "99"},
        "groups.mail.timeout",
    ),
]

# Unparsable JSON in a complex field: pydantic-settings raises its own
# SettingsError (a ValueError, not a ValidationError) before validation;
# the core turns it into a ValidationError naming the field (found by this test).
ENV_JSON_CASES: list[tuple[str, dict[str, str], str]] = [
    ("env-signals-not-json", {"TASKGUARD_EXIT_SIGNALS": "not json"}, "exit_signals"),
    ("env-groups-bad-json", {"TASKGUARD_GROUPS": "{bad"}, "groups"),
]


def _names(err: ValidationError, field: str) -> bool:
    """Whether ``err`` names ``field``: as an error location, or in a cross-field message."""
    for item in err.errors():
        loc = ".".join(str(part) for part in item["loc"])
        if loc == field or loc.startswith(field + ".") or field in item["msg"]:
            return True
    return False


def _assert_nothing_started(threads_before: set[threading.Thread]) -> None:
    # No watchdog, supervisor or signal thread, and the default SIGTERM handler.
    assert set(threading.enumerate()) <= threads_before
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize(("kwargs", "field"), [pytest.param(k, f, id=i) for i, k, f in KWARG_CASES])
def test_bad_keyword_config_names_field_and_starts_nothing(
    kwargs: dict[str, Any], field: str
) -> None:
    threads = set(threading.enumerate())
    with pytest.raises(ValidationError) as info:
        TaskGuard(**kwargs)
    assert _names(info.value, field), info.value
    _assert_nothing_started(threads)
    # The same mistake in a dict, and in the model itself, gives the same error.
    with pytest.raises(ValidationError) as info:
        TaskGuard(dict(kwargs))
    assert _names(info.value, field), info.value
    with pytest.raises(ValidationError):
        GuardConfig.model_validate(kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"), [pytest.param(k, f, id=i) for i, k, f in BOOL_AS_NUMBER_CASES]
)
def test_bool_is_not_a_number(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        TaskGuard(**kwargs)
    assert _names(info.value, field), info.value


@pytest.mark.parametrize(("env", "field"), [pytest.param(e, f, id=i) for i, e, f in ENV_CASES])
def test_garbage_environment_names_field(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], field: str
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    threads = set(threading.enumerate())
    with pytest.raises(ValidationError) as info:
        GuardConfig.from_env()
    assert _names(info.value, field), info.value
    _assert_nothing_started(threads)


@pytest.mark.parametrize(("env", "field"), [pytest.param(e, f, id=i) for i, e, f in ENV_JSON_CASES])
def test_unparsable_environment_json_is_a_validation_error(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], field: str
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError) as info:
        GuardConfig.from_env()
    assert _names(info.value, field), info.value


@pytest.mark.parametrize(("env", "field"), [pytest.param(e, f, id=i) for i, e, f in ENV_JSON_CASES])
def test_unparsable_environment_json_names_field(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], field: str
) -> None:
    # Whatever its class, the error must name the variable's field and be a ValueError.
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=field):
        GuardConfig.from_env()


def test_valid_inputs_are_accepted() -> None:
    # The table above must fail for the mistake, not for something else: the
    # closest valid neighbours of its rows build fine.
    cfg = GuardConfig.model_validate(
        {
            "exit_wait_timeout": 10,
            "cancel_grace": 0,
            "hook_timeout": 0.5,
            "drain_delay": 1,
            "stream_grace": 1,
            "exit_signals": ["TERM", 2, signal.SIGHUP],
            "groups": {
                "g": GroupConfig(timeout=10, limit=1, pending_limit=0, on_shutdown="cancel")
            },
            "grace_period": 30,
        }
    )
    assert cfg.exit_signals == (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    assert TaskGuard(cfg).config is cfg


def test_valid_environment_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKGUARD_EXIT_WAIT_TIMEOUT", "12.5")
    monkeypatch.setenv("TASKGUARD_EXIT_SIGNALS", '["TERM"]')
    monkeypatch.setenv("TASKGUARD_GROUPS__MAIL__LIMIT", "3")
    cfg = GuardConfig.from_env()
    assert cfg.exit_wait_timeout == 12.5
    assert cfg.exit_signals == (signal.SIGTERM,)
    assert cfg.groups["mail"].limit == 3


def test_bad_hook_arguments_are_refused_at_registration() -> None:
    guard = TaskGuard()
    for timeout in (0, -1, math.nan, math.inf):
        with pytest.raises(ValueError, match="timeout"):
            guard.on_shutdown(lambda: None, timeout=timeout)
    bad_stage: Any = "during"
    with pytest.raises(ValueError, match="stage"):
        guard.on_shutdown(lambda: None, stage=bad_stage)
    assert len(guard._hooks) == 0
