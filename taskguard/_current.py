"""Finding "the" guard: ``taskguard.current()`` and the module-level shortcuts."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any, TypeVar, overload

from ._exceptions import NoGuardError
from ._report import State

if TYPE_CHECKING:
    from ._guard import TaskGuard
    from ._guarded import Guarded
    from ._handle import TaskHandle
    from ._hooks import Stage

__all__ = ["current", "guarded", "on_shutdown", "spawn"]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

_CURRENT: ContextVar[TaskGuard | None] = ContextVar("taskguard_current", default=None)
# Guards that are running, in the order they were entered. A request handler's
# context often does not descend from the task that entered the guard (servers
# create connection tasks from their own context), hence this fallback.
_RUNNING: list[TaskGuard] = []


def enter(guard: TaskGuard) -> Token[TaskGuard | None]:
    _RUNNING.append(guard)
    return _CURRENT.set(guard)


def leave(guard: TaskGuard, token: Token[TaskGuard | None] | None) -> None:
    try:
        _RUNNING.remove(guard)
    except ValueError:
        pass
    if token is not None:
        try:
            _CURRENT.reset(token)
        except ValueError:  # exited in another context than it was entered in
            if _CURRENT.get() is guard:
                _CURRENT.set(None)


def current() -> TaskGuard:
    """The guard of the current context, else the most recently entered running guard.

    Raises :class:`NoGuardError` when no guard runs.
    """
    guard = _CURRENT.get()
    if guard is not None and guard._state is not State.CLOSED:
        return guard
    if _RUNNING:
        return _RUNNING[-1]
    if guard is not None:
        return guard  # closed: its spawn() raises ShuttingDownError, which says more
    raise NoGuardError(
        "no TaskGuard is running. Start one with `async with TaskGuard() as guard:`, "
        "run your app with taskguard.run(main), or wrap your ASGI app in "
        "taskguard.asgi.TaskGuardMiddleware"
    )


@overload
def spawn(
    fn: Coroutine[Any, Any, T], /, *, group: str = ..., name: str | None = ...
) -> TaskHandle[T]: ...
@overload
def spawn(
    fn: Callable[..., Coroutine[Any, Any, T]],
    /,
    *args: Any,
    group: str = ...,
    name: str | None = ...,
) -> TaskHandle[T]: ...
def spawn(fn: Any, /, *args: Any, group: str = "default", name: str | None = None) -> Any:
    """``current().spawn(...)``: start background work in the current guard."""
    return current().spawn(fn, *args, group=group, name=name)


def guarded(name: str | None = None, *, shield: bool = False) -> Guarded:
    """A guarded section of the current guard, found when it is entered or called.

    As a decorator, the guard is looked up at each call, not at decoration
    time, so module-level functions can be decorated before any guard exists.
    """
    from ._guarded import Guarded

    return Guarded(None, name, shield)


def on_shutdown(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    stage: Stage = "after_drain",
    timeout: float | None = None,
    name: str | None = None,
) -> Any:
    """``current().on_shutdown(...)``: register a hook with the current guard."""
    return current().on_shutdown(fn, stage=stage, timeout=timeout, name=name)
