"""Durable tasks: the declaration (``@guard.durable``, ``@taskguard.durable``) and their context.

A durable function is an async function registered under a stable name, whose
arguments pydantic validates and serialises (a ``TypeAdapter`` over its
signature), so that a spawn can be journaled and run again by another process
or the next start. The journal, the group commit, retries and leases live in
:mod:`taskguard._journal._manager`; see docs/durable.md for the semantics.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Coroutine
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from pydantic import PydanticSchemaGenerationError, TypeAdapter, ValidationError
from pydantic_core import PydanticSerializationError
from typing_extensions import NotRequired, TypedDict

if TYPE_CHECKING:
    from ._guard import TaskGuard
    from ._handle import TaskHandle

__all__ = ["DurableContext", "DurableFunction", "durable", "durable_context", "registered"]

R = TypeVar("R")
JournalOn = Literal["spawn", "cut"]

#: module-level declarations (``@taskguard.durable``), by name; any guard runs them
_GLOBAL: dict[str, DurableFunction[Any]] = {}


@dataclass(frozen=True)
class DurableContext:
    """What a durable task knows about itself: read it with :func:`durable_context`."""

    #: the registered name of the durable function
    name: str
    #: the journal entry's id (stable across retries and resumes)
    entry_id: str
    #: the ``key`` given to ``spawn``, or None
    key: str | None
    #: 1 for the first run, one more after each failure (an exception of the task)
    attempt: int
    max_attempts: int
    #: how many times it was taken over from a process that died while holding it
    #: (a run may have done part of its work before: make effects idempotent by key)
    recoveries: int = 0


#: the running durable task (the manager's record of it: ``.fn`` and ``.entry``);
#: each task runs in a context of its own, so it is set once per task, never reset
_CONTEXT: ContextVar[Any] = ContextVar("taskguard_durable", default=None)


def durable_context() -> DurableContext:
    """The context of the running durable task (its key, attempt, entry id).

    Raises :class:`LookupError` outside a durable task.
    """
    task = _CONTEXT.get()
    if task is None:
        raise LookupError("durable_context() is only available inside a durable task")
    entry, fn = task.entry, task.fn
    return DurableContext(
        fn.name, entry.id, entry.key, entry.attempt, fn.max_attempts, entry.recoveries
    )


class DurableFunction(Generic[R]):
    """An async function declared durable. ``await fn.spawn(...)`` journals a call
    and runs it in the guard; calling ``fn(...)`` directly runs it inline, as the
    plain function."""

    def __init__(
        self,
        fn: Callable[..., Coroutine[Any, Any, R]],
        *,
        name: str | None,
        group: str,
        max_attempts: int,
        journal_on: JournalOn,
        backoff: float,
        guard: TaskGuard | None,
    ) -> None:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(
                f"@durable takes an async function, not {getattr(fn, '__qualname__', fn)!r}"
            )
        if name is not None and (not isinstance(name, str) or not name):
            raise TypeError(f"durable(name=...) must be a non-empty str, not {name!r}")
        if not isinstance(group, str) or not group:
            raise TypeError(f"durable(group=...) must be a non-empty str, not {group!r}")
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError(f"durable(max_attempts=...) must be an int >= 1, not {max_attempts!r}")
        if journal_on not in ("spawn", "cut"):
            raise ValueError(f"durable(journal_on=...) is 'spawn' or 'cut', not {journal_on!r}")
        if isinstance(backoff, bool) or not isinstance(backoff, (int, float)) or not backoff > 0:
            raise ValueError(f"durable(backoff=...) must be seconds > 0, not {backoff!r}")
        self.fn = fn
        self.name = name or f"{fn.__module__}:{fn.__qualname__}"
        self.group = group
        self.max_attempts = max_attempts
        self.journal_on: JournalOn = journal_on
        self.backoff = float(backoff)
        self.guard = guard
        self.__wrapped__ = fn
        self.__doc__ = fn.__doc__
        self._signature = sig = inspect.signature(fn)
        self._adapter = _arguments_adapter(fn, sig, self.name)
        params = sig.parameters.values()
        # The common signature (plain named parameters) skips inspect's binding,
        # which costs more than the rest of a durable spawn's bookkeeping.
        self._simple = all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params)
        self._names = tuple(sig.parameters)
        self._accepted = frozenset(self._names)
        self._required = frozenset(p.name for p in params if p.default is p.empty)

    def __repr__(self) -> str:
        return f"<durable {self.name} group={self.group!r} journal_on={self.journal_on!r}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, R]:
        return self.fn(*args, **kwargs)

    async def spawn(self, *args: Any, key: str | None = None, **kwargs: Any) -> TaskHandle[R]:
        """Journal ``fn(*args, **kwargs)`` and run it; return once it is acknowledged.

        With ``journal_on="spawn"`` (the default) the handle comes back once the
        entry is committed. A ``key`` already journaled returns the handle of the
        task that holds it instead of starting another. The guard is the one
        this function was declared on, else :func:`taskguard.current`.
        """
        guard = self.guard or _current()
        manager = guard._durable or guard._durable_manager()
        return await manager.spawn(self, args, kwargs, key)

    # -- the arguments ---------------------------------------------------------

    def encode(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Validate a call's arguments; return them as JSON and as validated values.

        Raises TypeError for a call that does not fit the signature and
        ValueError naming the argument that fails validation or cannot be journaled.
        """
        names = self._names
        if (
            self._simple
            and len(args) <= len(names)
            and not (kwargs and not kwargs.keys().isdisjoint(names[: len(args)]))
        ):
            arguments = dict(zip(names, args, strict=False))
            if kwargs:
                arguments.update(kwargs)
            if not self._required <= arguments.keys() <= self._accepted:
                arguments = self._bind(args, kwargs)
        else:
            arguments = self._bind(args, kwargs)
        try:
            values: dict[str, Any] = self._adapter.validate_python(arguments)
        except ValidationError as exc:
            bad = sorted({str(err["loc"][0]) for err in exc.errors() if err["loc"]})
            raise ValueError(
                f"{self.name}.spawn(): invalid argument {', '.join(map(repr, bad))}: {exc}"
            ) from None
        try:
            payload = self._adapter.dump_json(values).decode()
        except PydanticSerializationError as exc:
            culprit = _unserialisable(values)
            raise ValueError(
                f"{self.name}.spawn(): argument {culprit!r} cannot be journaled "
                f"(pydantic cannot serialise it to JSON: {exc}); pass plain data, "
                "e.g. an id instead of a connection"
            ) from None
        return payload, values

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        try:
            return self._signature.bind(*args, **kwargs).arguments
        except TypeError as exc:
            raise TypeError(f"{self.name}.spawn(): {exc}") from None

    def decode(self, payload: str) -> dict[str, Any]:
        """The validated argument values of a journaled payload."""
        values: dict[str, Any] = self._adapter.validate_json(payload)
        return values

    def call(self, values: dict[str, Any]) -> Coroutine[Any, Any, R]:
        """Call the function with argument values (from :meth:`encode` or :meth:`decode`)."""
        if self._simple:
            return self.fn(**values)
        bound = inspect.BoundArguments(
            self._signature, {p: values[p] for p in self._names if p in values}
        )
        return self.fn(*bound.args, **bound.kwargs)


def _arguments_adapter(
    fn: Callable[..., Any], sig: inspect.Signature, name: str
) -> TypeAdapter[Any]:
    if "key" in sig.parameters:
        raise TypeError(
            f"durable function {name}: a parameter may not be named 'key' "
            "(spawn() takes key= for idempotency); rename it"
        )
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception as exc:
        raise TypeError(
            f"durable function {name}: cannot resolve its annotations ({exc}); durable "
            "arguments need types pydantic can find at decoration"
        ) from None
    fields: dict[str, Any] = {}
    for param in sig.parameters.values():
        hint = hints.get(param.name, Any)
        if param.kind is param.VAR_POSITIONAL:
            hint = tuple[hint, ...]  # type: ignore[valid-type]
        elif param.kind is param.VAR_KEYWORD:
            hint = dict[str, hint]  # type: ignore[valid-type]
        fields[param.name] = NotRequired[hint]
    arguments = TypedDict("arguments", fields)  # type: ignore[misc]
    try:
        return TypeAdapter(arguments)
    except PydanticSchemaGenerationError as exc:
        raise TypeError(
            f"durable function {name}: an argument type cannot be journaled ({exc})"
        ) from None


def _unserialisable(values: dict[str, Any]) -> str:
    anything: TypeAdapter[Any] = TypeAdapter(Any)
    for param, value in values.items():
        try:
            anything.dump_json(value)
        except PydanticSerializationError:
            return param
    return "?"


def _current() -> TaskGuard:
    from ._current import current  # a cycle at import time: _current re-exports durable

    global _current
    _current = current  # later calls skip the import machinery
    return current()


def register(registry: dict[str, DurableFunction[Any]], fn: DurableFunction[Any]) -> None:
    """Add ``fn`` to a registry; the same function defined again (a re-import, a
    function declared inside another) replaces itself, another one is an error."""
    for table in (registry, _GLOBAL):
        old = table.get(fn.name)
        if old is not None and not _same_definition(old.fn, fn.fn):
            raise ValueError(
                f"a durable task named {fn.name!r} is already declared "
                f"({_where(old.fn)}); give this one another name= ({_where(fn.fn)})"
            )
    registry[fn.name] = fn


def registered(extra: dict[str, DurableFunction[Any]]) -> dict[str, DurableFunction[Any]]:
    """Module-level declarations and a guard's own, by name."""
    return {**_GLOBAL, **extra}


def _same_definition(a: Callable[..., Any], b: Callable[..., Any]) -> bool:
    ca, cb = getattr(a, "__code__", None), getattr(b, "__code__", None)
    return (
        ca is not None
        and cb is not None
        and (ca.co_filename, ca.co_firstlineno) == (cb.co_filename, cb.co_firstlineno)
    )


def _where(fn: Callable[..., Any]) -> str:
    code = getattr(fn, "__code__", None)
    return f"{code.co_filename}:{code.co_firstlineno}" if code else repr(fn)


def durable(
    name: str | None = None,
    *,
    group: str = "default",
    max_attempts: int = 5,
    journal_on: JournalOn = "spawn",
    backoff: float = 0.5,
    guard: TaskGuard | None = None,
) -> Callable[[Callable[..., Coroutine[Any, Any, R]]], DurableFunction[R]]:
    """Declare an async function durable (module level: any running guard with a
    journal runs it; ``spawn`` finds the guard when called, like ``guarded``).

    ``name`` is its stable journal name (default ``module:qualname``): keep it
    when you move or rename the function, or journaled calls will not resume.
    A failure is retried up to ``max_attempts`` in all, the n-th retry after
    ``backoff * 2**(n-1)`` seconds (at most 60, plus up to 10% jitter).
    ``journal_on="cut"`` writes nothing until the guard's deadline cuts the task.
    """
    if callable(name):
        raise TypeError("use @durable() or @durable(name=...), with parentheses")

    def decorate(fn: Callable[..., Coroutine[Any, Any, R]]) -> DurableFunction[R]:
        declared = DurableFunction(
            fn,
            name=name,
            group=group,
            max_attempts=max_attempts,
            journal_on=journal_on,
            backoff=backoff,
            guard=guard,
        )
        if guard is None:
            register(_GLOBAL, declared)
        else:
            guard._durable_manager().declare(declared)
        return declared

    return decorate
