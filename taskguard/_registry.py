"""Shutdown hooks and resources: the part of TaskGuard that registers them.

The supervisor (``_shutdown``) runs them; ``_hooks`` holds how one hook runs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, TypeVar, overload

from ._exceptions import ShuttingDownError
from ._hooks import STAGES, Hook, ResourceKeeper, Stage, hook_name
from ._report import State

if TYPE_CHECKING:
    from ._backend import Backend
    from ._config import GuardConfig
    from ._shutdown import Shutdown

__all__ = ["HookRegistry"]

logger = logging.getLogger("taskguard")

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class HookRegistry:
    """Mixin of :class:`TaskGuard`: ``on_shutdown`` and ``enter_async_context``."""

    if TYPE_CHECKING:
        config: GuardConfig
        _state: State
        _shutdown: Shutdown | None
        _hooks: list[Hook]
        _warnings: list[str]
        _keeper: ResourceKeeper | None
        _backend: Backend | None
        _system_tasks: list[object]

        def _refuse_section(self, name: str) -> None: ...

    @overload
    def on_shutdown(
        self,
        fn: F,
        /,
        *,
        stage: Stage = ...,
        timeout: float | None = ...,
        name: str | None = ...,
    ) -> F: ...

    @overload
    def on_shutdown(
        self,
        fn: None = ...,
        /,
        *,
        stage: Stage = ...,
        timeout: float | None = ...,
        name: str | None = ...,
    ) -> Callable[[F], F]: ...

    def on_shutdown(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        stage: Stage = "after_drain",
        timeout: float | None = None,
        name: str | None = None,
    ) -> Any:
        """Register a shutdown hook (sync or async, no arguments); also a decorator.

        ``stage="before_drain"`` hooks stop intake (close listeners, deregister)
        and must not wait for in-flight work; ``"after_drain"`` hooks (the
        default) close what the background work used. Within a stage, the last
        registered runs first. Async hooks are cancelled at ``timeout``
        (default ``hook_timeout``).
        """
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}; got {stage!r}")
        if timeout is not None and not (
            isinstance(timeout, (int, float)) and 0 < timeout < math.inf
        ):
            raise ValueError(
                f"timeout must be a positive finite number of seconds, not {timeout!r}"
            )

        def register(func: F) -> F:
            if not callable(func):
                raise TypeError(f"on_shutdown() takes a function, not {func!r}")
            hook_timeout = timeout or self.config.hook_timeout
            self._add_hook(Hook(func, stage, hook_timeout, name or hook_name(func)))
            return func

        return register if fn is None else register(fn)

    def _add_hook(self, hook: Hook) -> None:
        if self._shutdown is not None and self._shutdown.stage_done(hook.stage):
            raise ShuttingDownError(
                f"the {hook.stage} hooks already ran; {hook.name!r} would never run"
            )
        hook.before_start = self._state is State.IDLE and self._shutdown is None
        self._hooks.append(hook)
        if hook.stage == "after_drain":
            self._check_grace_period()

    def _check_grace_period(self) -> None:
        cfg = self.config
        if cfg.grace_period is None:
            return
        worst = cfg.worst_case([h.timeout for h in self._hooks if h.stage == "after_drain"])
        if worst > cfg.grace_period:
            msg = (
                f"grace_period {cfg.grace_period:g}s is shorter than the worst-case shutdown "
                f"{worst:g}s (exit_wait_timeout + cancel_grace + after_drain hook timeouts)"
            )
            if msg not in self._warnings:
                self._warnings.append(msg)
                logger.warning(msg)

    async def enter_async_context(self, cm: AbstractAsyncContextManager[T]) -> T:
        """Enter ``cm`` now and exit it after the drain (last entered first).

        One dedicated task of the guard enters and exits every such context, so
        anyio task groups and cancel scopes work as resources. Its exit is an
        ``after_drain`` step bounded by ``hook_timeout``.
        """
        if not hasattr(cm, "__aenter__") or not hasattr(cm, "__aexit__"):
            raise TypeError(f"enter_async_context() takes an async context manager, not {cm!r}")
        if self._state is not State.RUNNING and self._state is not State.DRAINING:
            self._refuse_section("enter_async_context")
        if self._keeper is None:
            keeper = self._keeper = ResourceKeeper(self._resource_entered)
            assert self._backend is not None
            self._system_tasks.append(
                self._backend.start_system_task(keeper.run, name="taskguard-resources")
            )
        return await self._keeper.enter(cm)  # type: ignore[no-any-return]

    def _resource_entered(self, cm: AbstractAsyncContextManager[Any]) -> None:
        assert self._keeper is not None
        # an @asynccontextmanager is better known by its function's name
        gen = getattr(cm, "gen", None)
        name = f"exit {hook_name(gen) if gen is not None else type(cm).__qualname__}"
        self._add_hook(self._keeper.exit_hook(cm, name, self.config.hook_timeout))
