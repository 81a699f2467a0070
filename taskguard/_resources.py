"""Resources: async context managers entered now and exited after the drain."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._config import HOOK_ABANDON_GRACE
from ._hooks import Hook

__all__ = ["ResourceKeeper"]


class _Command:
    __slots__ = ("cm", "done", "error", "op", "timeout", "value")

    def __init__(self, op: str, cm: Any, timeout: float = math.inf) -> None:
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
    caller's task. Each resource is entered inside a cancel scope of its own,
    whose deadline bounds the resource's exit (a task group's children are
    cancelled at the timeout) without breaking the nesting of scopes.
    A resource's exit runs in the keeper's task too, so it is not cancelled
    when the hook that asked for it is abandoned; the keeper then stays busy and
    later exits time out as well: every step stays bounded.
    """

    def __init__(self, on_entered: Callable[[Any], None]) -> None:
        send, receive = anyio.create_memory_object_stream[_Command](math.inf)
        self._send: MemoryObjectSendStream[_Command] = send
        self._receive: MemoryObjectReceiveStream[_Command] = receive
        self._stack: list[tuple[AbstractAsyncContextManager[Any], anyio.CancelScope]] = []
        # Called in the keeper's task once a resource is entered: registers its
        # exit hook even if the caller of enter() was cancelled meanwhile.
        self._on_entered = on_entered

    async def enter(self, cm: AbstractAsyncContextManager[Any]) -> Any:
        cmd = _Command("enter", cm)
        self._send.send_nowait(cmd)
        await cmd.done.wait()
        if cmd.error is not None:
            raise cmd.error
        return cmd.value

    def exit_hook(self, cm: AbstractAsyncContextManager[Any], name: str, timeout: float) -> Hook:
        """A hook that exits ``cm`` (and whatever was entered after it and is still open)."""

        async def exit_resource() -> None:
            cmd = _Command("exit", cm, timeout)
            self._send.send_nowait(cmd)
            await cmd.done.wait()
            if cmd.error is not None:
                raise cmd.error
            if cmd.value == "timeout":
                raise TimeoutError(f"resource exit cancelled at its {timeout:g}s timeout")

        return Hook(exit_resource, "after_drain", timeout, name, backstop=HOOK_ABANDON_GRACE)

    async def run(self) -> None:
        """The keeper's loop: runs as the guard's own task until the guard closes."""
        try:
            while True:
                # Shielded: cancelling a resource's own scope (tg.cancel_scope.cancel()
                # on a task group resource) must not end the keeper. Closing the
                # stream (the guard closed) does.
                with anyio.CancelScope(shield=True):
                    try:
                        cmd = await self._receive.receive()
                    except (anyio.EndOfStream, anyio.ClosedResourceError):
                        break
                try:
                    if cmd.op == "enter":
                        await self._enter(cmd)
                    else:
                        await self._exit_through(cmd)
                finally:
                    cmd.done.set()
        finally:
            self._send.close()
            self._receive.close()
            while self._stack:  # not exited by a hook (the guard closed early)
                await self._exit_top(_Command("exit", None, 1.0))

    async def _enter(self, cmd: _Command) -> None:
        # Shielded, so that a cancelled earlier resource (its scope encloses this
        # one in the keeper's task) does not cancel this one; its deadline is set
        # at exit time.
        scope = anyio.CancelScope(shield=True)
        scope.__enter__()
        try:
            cmd.value = await cmd.cm.__aenter__()
        except BaseException as exc:
            scope.__exit__(None, None, None)
            cmd.error = exc
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                raise
            return
        self._stack.append((cmd.cm, scope))
        try:
            self._on_entered(cmd.cm)
        except Exception as exc:  # e.g. too late: its exit would never run, so exit it now
            cmd.error = exc
            await self._exit_top(_Command("exit", cmd.cm, 1.0))

    async def _exit_through(self, cmd: _Command) -> None:
        if not any(cm is cmd.cm for cm, _ in self._stack):
            return  # already exited
        while self._stack:
            top = self._stack[-1][0]
            await self._exit_top(cmd if top is cmd.cm else _Command("exit", top, cmd.timeout))
            if top is cmd.cm:
                return

    async def _exit_top(self, cmd: _Command) -> None:
        cm, scope = self._stack.pop()
        scope.deadline = anyio.current_time() + cmd.timeout
        error: BaseException | None = None
        try:
            await cm.__aexit__(None, None, None)
        except BaseException as exc:
            error = exc
        if error is None:
            scope.__exit__(None, None, None)
        elif scope.__exit__(type(error), error, error.__traceback__):
            cmd.value = "timeout"  # our deadline's cancellation, absorbed by our scope
        elif isinstance(error, anyio.get_cancelled_exc_class()) and not scope.cancel_called:
            raise error  # the keeper itself is being cancelled (the event loop is ending)
        else:
            cmd.error = error
        if scope.cancel_called and cmd.error is None:
            cmd.value = "timeout"

    def close(self) -> None:
        self._send.close()
        self._receive.close()
