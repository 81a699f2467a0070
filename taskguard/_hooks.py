"""Shutdown hooks and resources (async context managers closed after the drain)."""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import sys
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._report import HookReport

__all__ = ["STAGES", "Hook", "ResourceKeeper", "run_hook"]

logger = logging.getLogger("taskguard")

Stage = Literal["before_drain", "after_drain"]
STAGES: tuple[Stage, ...] = ("before_drain", "after_drain")


class Hook:
    """A registered shutdown step: a hook function, or the exit of a resource."""

    __slots__ = ("fn", "name", "stage", "timeout")

    def __init__(self, fn: Callable[[], Any], stage: Stage, timeout: float, name: str) -> None:
        self.fn = fn
        self.stage = stage
        self.timeout = timeout
        self.name = name


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _cancelled_from_outside() -> bool:
    """Whether a cancellation that reached a hook's runner is meant for the runner.

    On asyncio a hook may raise CancelledError on its own (it awaited a future
    that was cancelled); only a pending ``cancel()`` of our own task means we
    must stop. On trio, Cancelled only ever comes from a cancel scope.
    """
    try:
        task = asyncio.current_task()
    except RuntimeError:
        return True  # trio
    if task is None:
        return True
    if sys.version_info >= (3, 11):
        return task.cancelling() > 0
    return True


async def run_hook(hook: Hook, limit: float) -> HookReport:
    """Run one hook within ``limit`` seconds; record, never raise (but for our own cancellation).

    Async hooks are cancelled at their limit. Sync hooks run inline on the loop
    thread (they may call loop-bound APIs) and cannot be interrupted: an overrun
    is reported as a timeout.
    """
    start = anyio.current_time()
    limit = max(limit, 0.0)
    outcome, error = "ok", None
    try:
        with anyio.move_on_after(limit) as scope:
            result = hook.fn()
            if inspect.isawaitable(result):
                await result
            elif anyio.current_time() - start > limit:
                outcome = "timeout"
                error = f"sync hook ran {anyio.current_time() - start:.3f}s, over its {limit:g}s"
        if scope.cancelled_caught:
            outcome, error = "timeout", f"cancelled at its {limit:g}s timeout"
    except anyio.get_cancelled_exc_class() as exc:
        if _cancelled_from_outside():
            raise
        outcome, error = "error", _describe(exc)
    except BaseException as exc:  # even KeyboardInterrupt: the other hooks must still run
        outcome, error = "error", _describe(exc)
        logger.error("shutdown hook %s (%s) failed", hook.name, hook.stage, exc_info=exc)
    duration = anyio.current_time() - start
    if outcome == "timeout":
        logger.warning("shutdown hook %s (%s): %s", hook.name, hook.stage, error)
    return HookReport(
        name=hook.name, stage=hook.stage, outcome=outcome, duration=duration, error=error
    )


class _Command:
    __slots__ = ("cm", "done", "error", "op", "timeout", "value")

    def __init__(self, op: str, cm: Any = None, timeout: float = math.inf) -> None:
        self.op = op
        self.cm = cm
        self.timeout = timeout
        self.done = anyio.Event()
        self.value: Any = None
        self.error: BaseException | None = None


class ResourceKeeper:
    """One task of the guard that enters and later exits the resources.

    A cancel scope or an anyio task group must be exited by the task that
    entered it; so every resource is entered and exited here, never in the
    caller's task.
    """

    def __init__(self) -> None:
        send, receive = anyio.create_memory_object_stream[_Command](math.inf)
        self._send: MemoryObjectSendStream[_Command] = send
        self._receive: MemoryObjectReceiveStream[_Command] = receive
        self._stack: list[AbstractAsyncContextManager[Any]] = []

    async def enter(self, cm: AbstractAsyncContextManager[Any]) -> Any:
        cmd = _Command("enter", cm)
        self._send.send_nowait(cmd)
        await cmd.done.wait()
        if cmd.error is not None:
            raise cmd.error
        return cmd.value

    def exit_hook(self, name: str, timeout: float) -> Hook:
        """A hook that exits the most recently entered resource still open."""

        async def exit_one() -> None:
            cmd = _Command("exit", timeout=timeout)
            self._send.send_nowait(cmd)
            # The keeper enforces the timeout; if the resource swallows its
            # cancellation, run_hook's own limit (slightly longer) gives up on it.
            await cmd.done.wait()
            if cmd.error is not None:
                raise cmd.error
            if cmd.value == "timeout":
                raise TimeoutError(f"resource exit cancelled at its {timeout:g}s timeout")

        exit_one.__qualname__ = name
        return Hook(exit_one, "after_drain", timeout, name)

    async def run(self) -> None:
        """The keeper's loop: runs as the guard's own task until the guard closes."""
        try:
            async for cmd in self._receive:
                if cmd.op == "enter":
                    try:
                        cmd.value = await cmd.cm.__aenter__()
                    except BaseException as exc:
                        cmd.error = exc
                        if isinstance(exc, anyio.get_cancelled_exc_class()):
                            cmd.done.set()
                            raise
                    else:
                        self._stack.append(cmd.cm)
                elif self._stack:
                    cm = self._stack.pop()
                    with anyio.move_on_after(cmd.timeout) as scope:
                        try:
                            await cm.__aexit__(None, None, None)
                        except BaseException as exc:
                            if isinstance(exc, anyio.get_cancelled_exc_class()) and not (
                                scope.cancel_called
                            ):
                                cmd.done.set()
                                raise
                            cmd.error = exc
                    if scope.cancelled_caught:
                        cmd.value = "timeout"
                cmd.done.set()
        finally:
            self._send.close()

    def close(self) -> None:
        self._send.close()
