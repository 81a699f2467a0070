"""Argument fuzzing of the configuration (keywords, dicts, TaskGuard(...), TASKGUARD_*
variables) and of taskguard.run (see tests/fuzz_support.py)."""

from __future__ import annotations

import os
import time
from typing import Any

import anyio
import pytest
from fuzz_support import (
    BACKENDS,
    CANCEL_GRACE,
    EXIT_WAIT,
    FUZZ,
    SLACK,
    Evil,
    Exercise,
    UserError,
    attempt,
    is_seconds,
    plain_str,
    run_example,
    text_of,
    values,
    witness,
)
from helpers_reliability import Hygiene
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import taskguard
from taskguard import (
    GuardConfig,
    ShutdownReport,
    TaskGuard,
)
from taskguard._config import HOOK_ABANDON_GRACE

# -- configuration: keywords, dicts, TaskGuard(...), the environment ------------------------

FIELDS = [
    "exit_wait_timeout",
    "cancel_grace",
    "hook_timeout",
    "drain_delay",
    "stream_grace",
    "handle_signals",
    "exit_signals",
    "groups",
    "error_handler",
    "grace_period",
    "exit_wait_tmeout",  # a typo
]
GROUP_FIELDS = ["on_shutdown", "timeout", "limit", "pending_limit", "on_error", "limt"]
SECONDS_FIELDS = ("exit_wait_timeout", "cancel_grace", "hook_timeout", "drain_delay")
field_values = st.one_of(
    values,
    st.sampled_from([0.2, 1, 30, "TERM", ["TERM"], [15], "cancel", "drain", "shutdown", print]),
)


#: group names as dict keys (hashable ones: an unhashable key cannot even be written)
group_keys = st.one_of(
    st.sampled_from(["g", "mail", "", " ", "\ud800", "default", None, True, 0, 1.5, b"g"]),
    st.text(max_size=6),
    st.integers(),
)


@st.composite
def configs(draw: st.DrawFn) -> dict[str, Any]:
    """A config dict with one to three fuzzed fields, sometimes a fuzzed group."""
    cfg: dict[str, Any] = {}
    for name in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3, unique=True)):
        cfg[name] = draw(field_values, label=name)
    if draw(st.booleans(), label="fuzz a group"):
        group_name = draw(group_keys, label="group")
        group_field = draw(st.sampled_from(GROUP_FIELDS), label="group field")
        cfg["groups"] = {group_name: {group_field: draw(field_values, label=group_field)}}
    return cfg


def check_accepted_config(cfg: GuardConfig) -> None:
    """What an accepted config promises, whatever it was built from."""
    for name in (*SECONDS_FIELDS, "stream_grace"):
        value = getattr(cfg, name)
        assert is_seconds(value, zero=True), (name, value)
    if cfg.grace_period is not None:
        assert is_seconds(cfg.grace_period), cfg.grace_period
    assert isinstance(cfg.handle_signals, bool)
    for name, group in cfg.groups.items():
        assert plain_str(name), name
        assert name, "an empty group name"
        assert group.timeout is None or is_seconds(group.timeout), group
        assert group.limit is None or (type(group.limit) is int and group.limit > 0), group


def worst(cfg: GuardConfig) -> float:
    """The budget with one hook at hook_timeout (and its abandon grace)."""
    return cfg.exit_wait_timeout + cfg.cancel_grace + cfg.hook_timeout + HOOK_ABANDON_GRACE


@pytest.mark.parametrize("via", ["keywords", "dict", "TaskGuard", "TaskGuard+overrides"])
@FUZZ
@given(cfg=configs())
def test_config_fuzz(via: str, cfg: dict[str, Any]) -> None:
    with Hygiene() as hygiene:
        if via == "keywords":
            accepted, result = attempt(GuardConfig, **cfg)
        elif via == "dict":
            accepted, result = attempt(GuardConfig.model_validate, cfg)
        elif via == "TaskGuard":
            accepted, result = attempt(TaskGuard, cfg)
        else:
            accepted, result = attempt(TaskGuard, GuardConfig(), **cfg)
    hygiene.check()
    if not accepted:
        return
    config = result if isinstance(result, GuardConfig) else result.config
    check_accepted_config(config)
    if config.handle_signals or worst(config) > 5:
        return  # signals in the test process, or a long wait: test_run_fuzz covers them

    async def body(ex: Exercise) -> None:
        pass

    run_example("asyncio", body, **{k: getattr(config, k) for k in config.model_fields_set})


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_name_with_a_lone_surrogate_keeps_the_report_json_ready(backend: str) -> None:
    async def body(ex: Exercise) -> None:
        accepted, handle = attempt(ex.guard.spawn, witness, group="caf\udce9")
        if accepted:
            ex.handles.append(handle)

    run_example(backend, body)


ENV_NAMES = [
    "EXIT_WAIT_TIMEOUT",
    "CANCEL_GRACE",
    "HOOK_TIMEOUT",
    "DRAIN_DELAY",
    "STREAM_GRACE",
    "HANDLE_SIGNALS",
    "EXIT_SIGNALS",
    "GROUPS",
    "GROUPS__MAIL__LIMIT",
    "GROUPS__MAIL__TIMEOUT",
    "GROUPS__MAIL__ON_SHUTDOWN",
    "GRACE_PERIOD",
    "ERROR_HANDLER",
    "EXIT_WAIT_TMEOUT",
    "exit_wait_timeout",
    "GROUPS__",
]
env_values = st.one_of(
    st.sampled_from(
        ["1", "0.5", "-1", "0", "nan", "inf", "1e13", "1e300", "true", "yes", "", " ", "TERM"]
    ),
    st.sampled_from(['["TERM"]', "[15]", '{"mail": {"limit": 2}}', "{", "[", "null", "{}"]),
    st.text(max_size=8).filter(lambda t: "\x00" not in t),
)


@settings(FUZZ, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    env=st.dictionaries(st.sampled_from(ENV_NAMES), env_values, min_size=1, max_size=3),
    suffix=st.sampled_from(["", "", "__X", "__"]),
)
def test_from_env_fuzz(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], suffix: str) -> None:
    names = {
        f"TASKGUARD_{name}{suffix if i == 0 else ''}": v for i, (name, v) in enumerate(env.items())
    }
    with monkeypatch.context() as patch:
        for key in [k for k in os.environ if k.upper().startswith("TASKGUARD_")]:
            patch.delenv(key)
        for key, value in names.items():
            patch.setenv(key, value)
        with Hygiene() as hygiene:
            accepted, cfg = attempt(GuardConfig.from_env)
    hygiene.check()
    if accepted:
        check_accepted_config(cfg)
        for key in names:
            field_name = key[len("TASKGUARD_") :].split("__", 1)[0].lower()
            assert field_name in GuardConfig.model_fields, f"{key} was accepted"
            assert field_name != "error_handler", f"{key} was accepted"


@FUZZ
@given(config=values, overrides=st.dictionaries(st.sampled_from(FIELDS), field_values, max_size=2))
def test_taskguard_constructor_fuzz(config: Any, overrides: dict[str, Any]) -> None:
    with Hygiene() as hygiene:
        accepted, guard = attempt(TaskGuard, config, **overrides)
    hygiene.check()
    if accepted:
        assert config is None or isinstance(config, (dict, GuardConfig)), config
        check_accepted_config(guard.config)


# -- taskguard.run -------------------------------------------------------------------------

MAIN_KINDS = ["async", "async_raises", "async_no_params", "sync", "lambda_coro", "lambda_value"]
MAIN_KINDS += ["not_callable", "evil"]


def make_main(kind: str) -> Any:
    async def main(guard: TaskGuard) -> str:
        guard.spawn(witness, name="witness")
        await anyio.sleep(0)
        return "main"

    async def raises(guard: TaskGuard) -> None:
        raise UserError("main failed")

    async def no_params() -> None:
        pass

    def sync(guard: TaskGuard) -> int:
        return 1

    return {
        "async": lambda: main,
        "async_raises": lambda: raises,
        "async_no_params": lambda: no_params,
        "sync": lambda: sync,
        "lambda_coro": lambda: lambda guard: main(guard),
        "lambda_value": lambda: lambda guard: 42,
        "not_callable": lambda: 42,
        "evil": Evil,
    }[kind]()


@FUZZ
@given(
    # weighted towards a run that works, so that its promises get checked too
    kind=st.one_of(st.just("async"), st.just("lambda_coro"), st.sampled_from(MAIN_KINDS)),
    backend=st.one_of(*[st.sampled_from(BACKENDS)] * 3, values),
    config=st.one_of(st.none(), st.just({"hook_timeout": 1}), st.none(), configs()),
    overrides=st.one_of(
        st.just({}),
        st.just({}),
        st.dictionaries(st.sampled_from(FIELDS), field_values, max_size=2),
    ),
)
def test_run_fuzz(kind: str, backend: Any, config: Any, overrides: dict[str, Any]) -> None:
    import signal

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    short = {"exit_wait_timeout": EXIT_WAIT, "cancel_grace": CANCEL_GRACE, "hook_timeout": 1}
    overrides = {**short, **overrides}
    try:
        built = GuardConfig.model_validate({**(config or {}), **overrides})
    except (ValueError, TypeError, UserError):
        built = None
    if built is not None:
        assume(worst(built) < 10)
    started = time.monotonic()
    with Hygiene() as hygiene:
        try:
            accepted, report = attempt(
                taskguard.run, make_main(kind), config=config, backend=backend, **overrides
            )
        finally:
            after = {sig: signal.getsignal(sig) for sig in before}
    took = time.monotonic() - started
    hygiene.check()
    assert after == before, "run() left other exit-signal handlers than it found"
    event(
        "run() returned"
        if accepted
        else f"run() refused: {type(report).__name__} {text_of(report)[:50]}"
    )
    if accepted:
        assert kind in ("async", "lambda_coro"), f"run() returned for a {kind} main"
        assert backend in BACKENDS, backend
        assert isinstance(report, ShutdownReport)
        assert report.groups["default"].completed == 1, report  # the witness drained
        assert getattr(report, "errors", []) == []
        assert ShutdownReport.model_validate_json(report.model_dump_json()) == report
        assert built is not None
        assert took < worst(built) + SLACK, took
