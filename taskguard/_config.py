"""Configuration: frozen pydantic models that refuse typos and nonsense.

A mistake in the configuration of a shutdown path is found at the worst
moment (during a deploy), so every field is validated when the config is
built and an error names the field path, e.g. ``groups.mail.timeout``.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Literal, TypedDict

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    field_validator,
    model_validator,
)

__all__ = [
    "HOOK_ABANDON_GRACE",
    "MAX_SECONDS",
    "ErrorHandler",
    "GroupConfig",
    "GuardConfig",
    "GuardOptions",
    "check_flag",
    "check_name",
    "check_seconds",
    "parse_signal",
]

#: Called as ``handler(exc, handle)`` with the exception and the :class:`TaskHandle`
#: of a background task that failed. Runs on the event loop thread; keep it quick.
ErrorHandler = Callable[[BaseException, Any], object]

# Signals that cannot be caught: accepting them would be a silent no-op.
_UNCATCHABLE = {"SIGKILL", "SIGSTOP"}


def parse_signal(value: object) -> signal.Signals:
    """Turn ``"SIGTERM"``, ``"TERM"``, ``"sigterm"``, ``15`` or a ``Signals`` into a ``Signals``."""
    if isinstance(value, signal.Signals):
        sig = value
    elif isinstance(value, bool):
        raise ValueError(f"{value!r} is not a signal")
    elif isinstance(value, int):
        try:
            sig = signal.Signals(value)
        except ValueError:
            raise ValueError(f"{value} is not a signal number on this platform") from None
    elif isinstance(value, str):
        name = value.strip().upper()
        if name.isdigit():
            return parse_signal(int(name))
        if not name.startswith("SIG"):
            name = "SIG" + name
        try:
            sig = signal.Signals[name]
        except KeyError:
            raise ValueError(
                f"unknown signal {value!r} (expected e.g. 'SIGTERM' or 'TERM')"
            ) from None
    else:
        raise ValueError(f"a signal is a name such as 'SIGTERM' or a number, not {value!r}")
    if sig.name in _UNCATCHABLE:
        raise ValueError(f"{sig.name} cannot be caught, so it cannot be an exit signal")
    return sig


Signal = Annotated[
    signal.Signals,
    BeforeValidator(parse_signal),
    PlainSerializer(lambda s: s.name, return_type=str),
]

#: The largest number of seconds taskguard takes for any timeout, delay or
#: grace: a week. Far above any shutdown; it keeps every deadline sum finite and
#: within what timers accept (1e13 s made the watchdog thread die of overflow).
MAX_SECONDS = 7 * 24 * 3600.0

#: how long a cancelled async hook may take to unwind before it is abandoned
HOOK_ABANDON_GRACE = 0.5


def check_seconds(value: object, what: str, *, positive: bool = True) -> float:
    """The one check of a number of seconds given anywhere (config fields through
    their pydantic type, keyword arguments through this function).

    TypeError for what is not a number (a bool is not: a flag put in the wrong
    place would silently become 1 s); ValueError for NaN, the infinities, values
    out of range (> 0, or >= 0 with ``positive=False``, and <= MAX_SECONDS).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number of seconds, not {describe(value)}")
    try:
        seconds = float(value)
    except OverflowError:  # an int beyond any float
        seconds = math.inf
    low_ok = seconds > 0 if positive else seconds >= 0
    if not (low_ok and seconds <= MAX_SECONDS):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(
            f"{what} must be a finite number of seconds {bound} and <= {MAX_SECONDS:g} "
            f"(a week), not {describe(value)}"
        )
    return seconds


def describe(value: object) -> str:
    """``repr(value)`` for an error message, short, and never raising itself."""
    try:
        text = repr(value)
    except Exception:  # a hostile __repr__, or an int beyond Python's digit limit
        return f"an object of type {type(value).__name__}"
    return text if len(text) <= 80 else text[:77] + "..."


def check_flag(value: object, what: str) -> bool:
    """A yes/no option: a bool (``shield="false"`` would otherwise be true)."""
    if value is not True and value is not False:
        raise TypeError(f"{what} must be True or False, not {describe(value)}")
    return value


def check_name(value: object, what: str = "name") -> str | None:
    """A name given to a task, hook, section, stream or reason: a str or None.

    A str subclass comes back as a plain str copy: the report and the
    supervisor hash, compare and print the name long after the call, and a
    subclass's own ``__hash__``/``__repr__`` must not be able to fail there.
    The error names the type only: a hostile ``__repr__`` must not replace it.
    """
    if value is None or type(value) is str:
        return value
    if isinstance(value, str):
        return str.__str__(value)
    raise TypeError(f"{what} must be a str or None, not {type(value).__name__}")


def _not_bool(value: object) -> object:
    # bool is an int to Python, and pydantic's lax mode turns True into 1: a flag
    # put in the wrong place would silently become a 1 s timeout or a limit of 1.
    if isinstance(value, bool):
        raise ValueError(f"expected a number, not the boolean {value!r}")
    return value


NotBool = BeforeValidator(_not_bool)
# NaN compares false to everything, so gt/ge alone would let it through:
# allow_inf_nan=False refuses NaN and the infinities.
PositiveSeconds = Annotated[float, Field(gt=0, le=MAX_SECONDS, allow_inf_nan=False), NotBool]
Seconds = Annotated[float, Field(ge=0, le=MAX_SECONDS, allow_inf_nan=False), NotBool]


class GroupConfig(BaseModel):
    """How one named group of background tasks behaves.

    ``on_shutdown="drain"`` awaits the group's tasks at shutdown (within
    ``timeout``, else the exit wait); ``"cancel"`` cancels them as soon as
    the drain starts. ``limit`` caps how many run at once (the rest wait as
    pending, in order); beyond ``pending_limit`` pending ones, ``spawn`` raises
    :class:`GroupFullError`. ``on_error="shutdown"`` makes a failure of one of
    the group's tasks request shutdown.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    on_shutdown: Literal["drain", "cancel"] = "drain"
    timeout: PositiveSeconds | None = None
    limit: Annotated[int, Field(gt=0), NotBool] | None = None
    pending_limit: Annotated[int, Field(ge=0), NotBool] | None = None
    on_error: Literal["log", "shutdown"] = "log"

    @model_validator(mode="after")
    def _pending_needs_limit(self) -> GroupConfig:
        if self.pending_limit is not None and self.limit is None:
            raise ValueError(
                "pending_limit only applies to a group with a limit "
                "(without a limit nothing ever waits as pending); set limit too"
            )
        return self


class GuardConfig(BaseModel):
    """Settings of a :class:`TaskGuard`.

    Build it from keyword arguments, from a dict (``GuardConfig.model_validate``)
    or from ``TASKGUARD_*`` environment variables (:meth:`from_env`). All times
    are in seconds.
    """

    # defer_build: the validators are built on first use, not by `import taskguard`
    model_config = ConfigDict(
        frozen=True, extra="forbid", arbitrary_types_allowed=True, defer_build=True
    )

    #: the whole drain, counted from the shutdown trigger (includes drain_delay
    #: and the before_drain hooks)
    exit_wait_timeout: PositiveSeconds = 30.0
    #: how long cancelled work may take to unwind before it is abandoned and
    #: reported stuck: after the exit wait, and during the drain for tasks
    #: cancelled there (cancel groups, drain groups at their timeout)
    cancel_grace: Seconds = 5.0
    #: default timeout of each shutdown hook and resource exit
    hook_timeout: PositiveSeconds = 10.0
    #: wait this long after the trigger, still taking work, so a load balancer
    #: can stop routing here first
    drain_delay: Seconds = 0.0
    #: how long open streams may go on after the drain starts
    stream_grace: Seconds = 0.0
    #: install handlers for ``exit_signals`` while the guard runs
    handle_signals: bool = False
    exit_signals: tuple[Signal, ...] = (signal.SIGINT, signal.SIGTERM)
    groups: dict[str, GroupConfig] = Field(default_factory=dict)
    #: called as ``error_handler(exc, handle)`` when a background task fails
    error_handler: ErrorHandler | None = Field(default=None, exclude=True)
    #: the time the platform allows between its exit signal and its hard kill
    #: (Kubernetes' terminationGracePeriodSeconds); checked against the worst case
    grace_period: PositiveSeconds | None = None
    # durable: the journal of durable tasks (docs/durable.md) and its lease
    #: where durable tasks are journaled: ``sqlite:///path.db`` or ``postgresql://...``
    journal: str | None = None
    #: how long an entry stays held by a process that stopped renewing it
    #: (a heartbeat renews it every third of this)
    lease_timeout: PositiveSeconds = 30.0

    @field_validator("journal", mode="before")  # durable:
    @classmethod
    def _journal_url(cls, value: object) -> object:
        if value is None:
            return None
        from ._journal import check_url

        return check_url(value)

    @field_validator("exit_signals", mode="before")
    @classmethod
    def _one_signal_or_many(cls, value: object) -> object:
        if isinstance(value, (str, int)):
            return (value,)
        if isinstance(value, str | bytes) or not isinstance(value, (list, tuple, set, frozenset)):
            return value
        return tuple(value)

    @field_validator("error_handler", mode="before")
    @classmethod
    def _callable_handler(cls, value: object) -> object:
        if value is not None and not callable(value):
            raise ValueError(f"must be a callable taking (exc, handle), not {value!r}")
        return value

    @model_validator(mode="after")
    def _coherent(self) -> GuardConfig:
        problems = []
        if self.drain_delay >= self.exit_wait_timeout:
            problems.append(
                f"drain_delay ({self.drain_delay:g}s) must be shorter than exit_wait_timeout "
                f"({self.exit_wait_timeout:g}s), which counts from the trigger and includes it"
            )
        if self.stream_grace >= self.exit_wait_timeout:
            problems.append(
                f"stream_grace ({self.stream_grace:g}s) must be shorter than "
                f"exit_wait_timeout ({self.exit_wait_timeout:g}s)"
            )
        if self.handle_signals and not self.exit_signals:
            problems.append("exit_signals is empty although handle_signals is true")
        if len(set(self.exit_signals)) != len(self.exit_signals):
            problems.append("exit_signals lists a signal twice")
        for name, group in self.groups.items():
            if not name:
                problems.append("groups: a group name must not be empty")
            if group.timeout is not None and group.timeout > self.exit_wait_timeout:
                problems.append(
                    f"groups.{name}.timeout ({group.timeout:g}s) is above exit_wait_timeout "
                    f"({self.exit_wait_timeout:g}s); the exit wait bounds every group"
                )
        if self.grace_period is not None:
            worst = self.exit_wait_timeout + self.cancel_grace + self.hook_timeout
            worst += HOOK_ABANDON_GRACE
            if worst > self.grace_period:
                problems.append(
                    f"grace_period ({self.grace_period:g}s) is shorter than the worst-case "
                    f"shutdown with one hook: exit_wait_timeout + cancel_grace + hook_timeout "
                    f"+ {HOOK_ABANDON_GRACE:g}s abandon grace = {worst:g}s; the platform "
                    "would kill the process before the guard is done"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def group(self, name: str) -> GroupConfig:
        """The configuration of group ``name`` (defaults for a group not configured)."""
        return self.groups.get(name) or _DEFAULT_GROUP

    @classmethod
    def from_env(cls, prefix: str = "TASKGUARD_", **overrides: Any) -> GuardConfig:
        """Build a config from ``TASKGUARD_*`` environment variables.

        ``TASKGUARD_EXIT_WAIT_TIMEOUT=20``, ``TASKGUARD_EXIT_SIGNALS='["TERM"]'``,
        groups as JSON (``TASKGUARD_GROUPS='{"mail": {"limit": 5}}'``) or nested
        (``TASKGUARD_GROUPS__MAIL__LIMIT=5``). Keyword ``overrides`` win over the
        environment. Unknown ``TASKGUARD_*`` variables are an error, like unknown fields.
        """
        from ._settings import load_env

        return load_env(prefix, overrides)


_DEFAULT_GROUP = GroupConfig.model_construct()  # the defaults, without building the model

SignalLike = signal.Signals | str | int


class GuardOptions(TypedDict, total=False):
    """The keyword options of ``TaskGuard(...)`` and ``taskguard.run(...)``: the fields
    of :class:`GuardConfig` (a type checker then checks their names and types)."""

    exit_wait_timeout: float
    cancel_grace: float
    hook_timeout: float
    drain_delay: float
    stream_grace: float
    handle_signals: bool
    exit_signals: SignalLike | Sequence[SignalLike]
    groups: Mapping[str, GroupConfig | Mapping[str, Any]]
    error_handler: ErrorHandler | None
    grace_period: float | None
    journal: str | None
    lease_timeout: float
