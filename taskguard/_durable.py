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
    #: 1 for the first run; each failure, and each run cut short by a killed process,
    #: counts one more (a graceful stop gives its attempt back)
    attempt: int
    max_attempts: int


_CONTEXT: ContextVar[DurableContext | None] = ContextVar("taskguard_durable", default=None)


def durable_context() -> DurableContext:
    """The context of the running durable task (its key, attempt, entry id).

    Raises :class:`LookupError` outside a durable task.
    """
    ctx = _CONTEXT.get()
    if ctx is None:
        raise LookupError("durable_context() is only available inside a durable task")
    return ctx


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
        self._signature = inspect.signature(fn)
        self._adapter = _arguments_adapter(fn, self._signature, self.name)

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
        guard = self.guard
        if guard is None:
            from ._current import current

            guard = current()
        return await guard.spawn_durable(self, *args, key=key, **kwargs)

    # -- the arguments ---------------------------------------------------------

    def encode(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Validate a call's arguments; return them as JSON and as validated values.

        Raises TypeError for a call that does not fit the signature and
        ValueError naming the argument that fails validation or cannot be journaled.
        """
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.name}.spawn(): {exc}") from None
        arguments = bound.arguments
        try:
            values: dict[str, Any] = self._adapter.validate_python(arguments)
        except ValidationError as exc:
            names = sorted({str(err["loc"][0]) for err in exc.errors() if err["loc"]})
            raise ValueError(
                f"{self.name}.spawn(): invalid argument {', '.join(map(repr, names))}: {exc}"
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

    def decode(self, payload: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The call's positional and keyword arguments, from a journaled payload."""
        values = self._adapter.validate_json(payload)
        bound = inspect.BoundArguments(
            self._signature, {p: values[p] for p in self._signature.parameters if p in values}
        )
        return bound.args, bound.kwargs

    def call_args(self, values: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Positional and keyword arguments from validated values (see :meth:`encode`)."""
        bound = inspect.BoundArguments(self._signature, values)
        return bound.args, bound.kwargs


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
