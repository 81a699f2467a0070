"""Argument fuzzing of guard.stream (send, pump, iteration) and enter_async_context
(see tests/fuzz_support.py)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from fuzz_support import (
    BACKENDS,
    EXIT_WAIT,
    FUZZ,
    Evil,
    Exercise,
    UserError,
    attempt,
    attempt_async,
    flags,
    is_seconds,
    names,
    run_example,
    values,
)
from hypothesis import given
from hypothesis import strategies as st

import taskguard

# -- streams -----------------------------------------------------------------------------

SOURCE_KINDS = ["agen", "agen_slow", "agen_raises", "aclose_raises", "none", "list", "evil"]
CONSUMERS = ["pump", "async_for", "async_for_break", "async_with_send", "aclose", "stop"]
seconds_or_odd = st.one_of(st.sampled_from([None, 0.02, 0.5, 5]), values)


class _CloseRaises:
    """An async iterator whose aclose() raises (a buggy source)."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.n = 0

    def __aiter__(self) -> _CloseRaises:
        return self

    async def __anext__(self) -> int:
        self.n += 1
        if self.n > 3:
            raise StopAsyncIteration
        return self.n

    async def aclose(self) -> None:
        self.log.append("closed")
        raise UserError("aclose failed")


def make_source(kind: str, log: list[str]) -> Any:
    async def agen(delay: float = 0.0, fail: bool = False) -> AsyncIterator[int]:
        log.append("started")
        try:
            for i in range(3):
                await anyio.sleep(delay)
                yield i
            if fail:
                raise UserError("source failed")
        finally:
            log.append("closed")

    return {
        "agen": lambda: agen(),
        "agen_slow": lambda: agen(0.05),
        "agen_raises": lambda: agen(fail=True),
        "aclose_raises": lambda: _CloseRaises(log),
        "none": lambda: None,
        "list": lambda: [1, 2, 3],
        "evil": Evil,
    }[kind]()


async def _stream_case(ex: Exercise, data: st.DataObject) -> None:
    guard = ex.guard
    kind = data.draw(st.sampled_from(SOURCE_KINDS), label="source")
    name = data.draw(names, label="name")
    send_timeout = data.draw(seconds_or_odd, label="send_timeout")
    max_duration = data.draw(seconds_or_odd, label="max_duration")
    raise_on_end = data.draw(flags, label="raise_on_end")
    consumer = data.draw(st.sampled_from(CONSUMERS), label="consumer")
    sender = data.draw(st.sampled_from(["ok", "broken", "slow", "not_callable"]), label="send")
    log: list[str] = []
    source = make_source(kind, log)
    if kind == "aclose_raises":  # the guard closes it, and names the failure
        ex.allowed_errors.add("closing the source of stream")
    accepted, stream = attempt(
        guard.stream,
        source,
        name=name,
        send_timeout=send_timeout,
        max_duration=max_duration,
        raise_on_end=raise_on_end,
    )
    if not accepted:
        if kind in ("agen", "agen_slow", "agen_raises"):
            await source.aclose()
        return
    assert kind != "list", "stream() accepted a list"  # Evil has an __aiter__: it may pass
    for label, value in (("send_timeout", send_timeout), ("max_duration", max_duration)):
        assert value is None or is_seconds(value), f"stream() accepted {label}={value!r}"

    async def send(item: object) -> None:
        if sender == "broken":
            raise BrokenPipeError("the client went away")
        if sender == "slow":
            await anyio.sleep(0.1)

    send_fn: Any = 42 if sender == "not_callable" else send
    with anyio.fail_after(EXIT_WAIT + 3):
        if consumer == "pump" and source is not None:
            await attempt_async(_swallow_stream_errors, stream.pump, send_fn)
        elif consumer in ("async_for", "async_for_break") and source is not None:

            async def iterate() -> None:
                async for _ in stream:
                    if consumer == "async_for_break":
                        break
                await stream.aclose()

            await attempt_async(_swallow_stream_errors, iterate)
        elif consumer == "async_with_send":

            async def with_send() -> None:
                async with stream:
                    for i in range(2):
                        await stream.send(send_fn, i)

            await attempt_async(_swallow_stream_errors, with_send)
        else:
            if consumer == "stop":
                stream.stop()
            # (an Evil source's own __aiter__ raises here: the user's error)
            await attempt_async(stream.aclose)
    if stream.outcome is not None:
        ex.streams[stream.outcome.value] += 1
    if "started" in log:
        assert log.count("closed") == 1, log  # its finally ran, exactly once


async def _swallow_stream_errors(fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
    try:
        await fn(*args)
    except (taskguard.StreamError, UserError, BrokenPipeError):
        pass


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(data=st.data())
def test_stream_fuzz(backend: str, data: st.DataObject) -> None:
    async def body(ex: Exercise) -> None:
        await _stream_case(ex, data)

    run_example(backend, body)


# -- resources -----------------------------------------------------------------------------

CM_KINDS = ["class", "generator", "enter_raises", "exit_raises", "exit_hangs", "sync_cm", "evil"]


class _Resource:
    def __init__(self, rec: list[int], kind: str) -> None:
        self.rec = rec
        self.kind = kind

    async def __aenter__(self) -> _Resource:
        if self.kind == "enter_raises":
            raise UserError("cannot enter")
        self.rec[0] += 1
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.rec[1] += 1
        if self.kind == "exit_raises":
            raise UserError("cannot exit")
        if self.kind == "exit_hangs":
            await anyio.sleep_forever()


async def _resource_case(ex: Exercise, data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(CM_KINDS), label="resource")
    rec = [0, 0]

    @asynccontextmanager
    async def generator() -> AsyncIterator[str]:
        rec[0] += 1
        try:
            yield "value"
        finally:
            rec[1] += 1

    if kind == "generator":
        cm: Any = generator()
    elif kind == "sync_cm":
        cm = open(os.devnull)  # noqa: SIM115 - a sync context manager on purpose
    elif kind == "evil":
        cm = Evil()
    else:
        cm = _Resource(rec, kind)
    try:
        accepted, _ = await attempt_async(ex.guard.enter_async_context, cm)
    finally:
        if kind == "sync_cm":
            cm.close()
    if accepted:
        assert kind in ("class", "generator", "exit_raises", "exit_hangs"), kind
        ex.resources.append(rec)
        ex.after_hooks += 1
    else:
        assert rec == [0, 0], (kind, rec)


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(data=st.data())
def test_enter_async_context_fuzz(backend: str, data: st.DataObject) -> None:
    async def body(ex: Exercise) -> None:
        for _ in range(data.draw(st.integers(1, 3), label="resources")):
            await _resource_case(ex, data)

    run_example(backend, body)
