"""Shutdown hooks: the registry that owns their order and budget, and how one runs."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal

import anyio

from ._config import HOOK_ABANDON_GRACE
from ._exceptions import ShuttingDownError
from ._report import HookReport

if TYPE_CHECKING:
    from ._backends import Backend
    from ._config import GuardConfig

__all__ = ["STAGES", "Hook", "Hooks", "hook_name", "run_hook"]

logger = logging.getLogger("taskguard")

Stage = Literal["before_drain", "after_drain"]
STAGES: tuple[Stage, ...] = ("before_drain", "after_drain")

#: async hooks that ignored their cancellation and still run: strong references,
#: so they are never garbage collected mid-flight; each leaves when it ends
_ABANDONED_HOOKS: set[_HookRun] = set()


class Hook:
    """A registered shutdown step: a hook function, or the exit of a resource."""

    __slots__ = ("backstop", "before_start", "fn", "name", "stage", "timeout")

    def __init__(
        self,
        fn: Callable[[], Any],
        stage: Stage,
        timeout: float,
        name: str,
        backstop: float = 0.0,
    ) -> None:
        self.fn = fn
        self.stage = stage
        self.timeout = timeout
        self.name = name
        #: extra time on top of ``timeout`` before the supervisor gives up (a
        #: resource exit enforces its own timeout; this is the backstop)
        self.backstop = backstop
        #: registered before the guard first started: kept for its later runs
        self.before_start = False

    def worst_case(self) -> float:
        """The longest this step can take: its timeout, the backstop, then the
        grace an async hook that ignores its cancellation gets before it is
        abandoned."""
        return self.timeout + self.backstop + HOOK_ABANDON_GRACE


def hook_name(fn: object) -> str:
    """The function's (qualified) name, without the ``<locals>`` noise of nested functions."""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if not isinstance(name, str):
        return repr(fn)
    return name.rsplit("<locals>.", 1)[-1]


class Hooks:
    """The shutdown hooks of one guard, and the one owner of their order:
    stages in order, last registered first within a stage, a hook registered
    while its stage runs is run too (newest first).

    Registration is refused once it could no longer be honoured: for a stage
    that already ran, and for every stage from the stopping phase on (a hook
    that registers itself again would otherwise never let the shutdown end).
    """

    def __init__(self, config: GuardConfig) -> None:
        self._config = config
        self._hooks: list[Hook] = []
        self._stages_done: set[str] = set()
        self._refusal: str | None = None  # why registration is closed, once it is
        self.warnings: list[str] = []

    def __len__(self) -> int:
        return len(self._hooks)

    def add(self, hook: Hook, *, before_start: bool = False) -> None:
        if self._refusal is not None:
            raise ShuttingDownError(f"on_shutdown({hook.name!r}) refused: {self._refusal}")
        if hook.stage in self._stages_done:
            raise ShuttingDownError(
                f"the {hook.stage} hooks already ran; {hook.name!r} would never run"
            )
        hook.before_start = before_start
        self._hooks.append(hook)
        if hook.stage == "after_drain":
            self._check_grace_period()

    def close(self, why: str) -> None:
        """Refuse further registrations (the stopping phase began, or the guard closed)."""
        self._refusal = why

    def new_run(self) -> None:
        """Keep the hooks registered before the first start; the rest belonged to the
        run that ended."""
        self._hooks = [hook for hook in self._hooks if hook.before_start]
        self._stages_done.clear()
        self._refusal = None
        self.warnings = []
        if self._hooks:
            self._check_grace_period()

    def next(self, stage: Stage, done: set[Hook]) -> Hook | None:
        """The newest hook of ``stage`` not yet in ``done`` (registrations may arrive
        while earlier ones run)."""
        for hook in reversed(self._hooks):
            if hook.stage == stage and hook not in done:
                return hook
        return None

    def stage_done(self, stage: Stage) -> None:
        self._stages_done.add(stage)

    def ran(self, stage: Stage) -> bool:
        return stage in self._stages_done

    def worst_case(self) -> float:
        """The longest the hooks can make a shutdown (on top of the exit wait and the
        cancel grace): every after_drain step's worst case, and the abandon grace
        of every before_drain hook (they are cut at the exit wait, then given it)."""
        return sum(
            hook.worst_case() if hook.stage == "after_drain" else HOOK_ABANDON_GRACE
            for hook in self._hooks
        )

    def budget(self) -> float:
        """The longest a shutdown sequence may take, from its trigger: the exit wait,
        the cancel grace and the hooks' worst case (fixed at the trigger)."""
        cfg = self._config
        return cfg.exit_wait_timeout + cfg.cancel_grace + self.worst_case()

    def _check_grace_period(self) -> None:
        cfg = self._config
        if cfg.grace_period is None:
            return
        worst = self.budget()
        if worst > cfg.grace_period:
            msg = (
                f"grace_period {cfg.grace_period:g}s is shorter than the worst-case shutdown "
                f"{worst:g}s (exit_wait_timeout + cancel_grace + the hooks' timeouts and "
                "grace)"
            )
            if msg not in self.warnings:
                self.warnings.append(msg)
                logger.warning(msg)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class _HookRun:
    """An async hook running in its own task, so that a hook that ignores its
    cancellation can be abandoned: the supervisor never waits on it unbounded."""

    def __init__(self, awaitable: Awaitable[Any]) -> None:
        self.awaitable = awaitable
        self.scope = anyio.CancelScope()
        self.done = anyio.Event()
        self.error: BaseException | None = None

    async def run(self) -> None:
        try:
            with self.scope:
                await self.awaitable
        except BaseException as exc:  # recorded: a hook's failure never ends the shutdown
            self.error = exc
        finally:
            self.done.set()
            _ABANDONED_HOOKS.discard(self)


async def run_hook(hook: Hook, limit: float, backend: Backend) -> HookReport:
    """Run one hook within ``limit`` seconds; record the outcome, never raise.

    Sync hooks run inline on the loop thread (they may call loop-bound APIs)
    and cannot be interrupted: an overrun is reported as a timeout. Async
    hooks run in a task of their own, cancelled at ``limit``; one that ignores
    the cancellation is abandoned after a short grace and reported.
    """
    start = anyio.current_time()
    limit = max(limit, 0.0)
    outcome, error = "ok", None
    failure: BaseException | None = None
    try:
        result = hook.fn()
    except BaseException as exc:  # even KeyboardInterrupt: the other hooks must still run
        outcome, error, failure = "error", _describe(exc), exc
    else:
        if hasattr(result, "__await__"):
            job = _HookRun(result)
            backend.start_system_task(job.run, name=f"taskguard-hook {hook.name}")
            with anyio.move_on_after(limit):
                await job.done.wait()
            if not job.done.is_set():
                job.scope.cancel()
                with anyio.move_on_after(HOOK_ABANDON_GRACE):
                    await job.done.wait()
                outcome = "timeout"
                if job.done.is_set():
                    error = f"cancelled at its {limit:g}s timeout"
                else:
                    error = f"ignored its cancellation at its {limit:g}s timeout; abandoned"
                    _ABANDONED_HOOKS.add(job)
            elif job.error is not None:
                outcome, error, failure = "error", _describe(job.error), job.error
        elif anyio.current_time() - start > limit:
            outcome = "timeout"
            error = f"sync hook ran {anyio.current_time() - start:.3f}s, over its {limit:g}s"
    duration = anyio.current_time() - start
    try:
        if failure is not None:
            logger.error("shutdown hook %s (%s) failed", hook.name, hook.stage, exc_info=failure)
        elif outcome == "timeout":
            logger.warning("shutdown hook %s (%s): %s", hook.name, hook.stage, error)
    except Exception:  # a logging handler that raises must not lose the hook's report
        pass
    return HookReport(
        name=hook.name, stage=hook.stage, outcome=outcome, duration=duration, error=error
    )
