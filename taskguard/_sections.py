"""The open guarded sections of one guard run, and what they came to."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from ._backends import thread_stack
from ._report import SectionReport, StuckTask

if TYPE_CHECKING:
    from ._backends import Backend
    from ._guarded import Guarded
    from ._inflight import InFlight

__all__ = ["Sections"]


class Sections:
    """The drain waits for open sections like for tasks. Worker-thread sections
    are kept apart under a lock; the last one to close wakes the drain through
    the loop.

    ``accepting`` is set by the guard as its state changes: new sections are
    taken while running and draining, refused from stopping on (``refuse``
    raises the error that says why).
    """

    __slots__ = (
        "_backend",
        "_counts",
        "_inflight",
        "_lock",
        "accepting",
        "current_task",
        "new_scope",
        "open",
        "refuse",
        "thread_id",
        "threads",
    )

    def __init__(
        self,
        inflight: InFlight,
        backend: Backend,
        refuse: Callable[[str], None],
    ) -> None:
        self._inflight = inflight
        self._backend = backend
        self.refuse = refuse
        self.accepting = True
        #: the backend's cancel-scope class and current-task function, bound once:
        #: guarded() is on every request's path
        self.new_scope = backend.cancel_scope
        self.current_task = backend.current_task_function()
        #: the thread of the guard's event loop (async sections are entered there)
        self.thread_id = threading.get_ident()
        self.open: dict[Guarded, None] = {}  # async sections (don't modify directly)
        self.threads: dict[Guarded, None] = {}  # worker-thread sections, under _lock
        self._lock = threading.Lock()
        self._counts = Counter[str]()
        inflight.watch(self.busy)

    # -- async sections (on the loop thread) ----------------------------------------

    def enter(self, section: Guarded) -> None:
        if not self.accepting:
            self.refuse(section.name)
        self.open[section] = None

    def exit(self, section: Guarded, cancelled: bool, cut: bool) -> None:
        open_ = self.open
        if open_.pop(section, 0) is not None:
            return  # already accounted (abandoned as stuck)
        if cut:
            self._counts["cut"] += 1
        else:
            self._counts["cancelled" if cancelled else "completed"] += 1
        if not open_:
            self._inflight.emptied()

    def busy(self) -> bool:
        """Whether a section is open (async, or in a worker thread)."""
        return bool(self.open or self.threads)

    def holds(self, task: object) -> bool:
        """Whether ``task`` holds an open async section."""
        return any(section._task is task for section in self.open)

    def cut_all(self) -> None:
        """Cancel every open async section (a deadline or a forced shutdown)."""
        for section in list(self.open):
            section._cut = True
            if section._scope is not None:
                section._scope.cancel()

    # -- worker-thread sections (any thread) ------------------------------------------

    def enter_thread(self, section: Guarded) -> None:
        with self._lock:
            if self.accepting:
                self.threads[section] = None
                return
        self.refuse(section.name)

    def exit_thread(self, section: Guarded) -> None:
        with self._lock:
            if self.threads.pop(section, 0) is not None:
                return  # abandoned as stuck: already accounted
            self._counts["completed"] += 1
            empty = not self.threads
        if empty:
            if threading.get_ident() == self.thread_id:
                self._inflight.emptied()
            elif self._inflight.waiting:
                # A wake-up of the loop from another thread costs a self-pipe write
                # and a loop turn (measured: 2 -> 8 µs per section when done on every
                # exit): only once the drain waits. It arms before it checks, so an
                # exit that saw no waiter is seen by that check.
                self._backend.call_soon_threadsafe(self._inflight.emptied)

    # -- for the shutdown -------------------------------------------------------------

    def outstanding(self) -> list[tuple[str, str, float]]:
        """Open sections as (name, where, age), for progress logs."""
        now = time.monotonic()
        items = [(s.name, "guarded", now - s._started) for s in list(self.open)]
        with self._lock:
            threads = list(self.threads)
        items += [(s.name, "guarded, thread", now - s._started) for s in threads]
        return items

    def abandon_all(self) -> list[StuckTask]:
        """Give up on every open section (after the cancel grace): they are stuck."""
        now = time.monotonic()
        stuck = []
        for section in list(self.open):
            del self.open[section]
            self._counts["stuck"] += 1
            stack = self._backend.task_stack(section._task)
            stuck.append(
                StuckTask(
                    name=section.name, group="(guarded)", age=now - section._started, stack=stack
                )
            )
        with self._lock:
            threads = list(self.threads)
            self.threads.clear()
        for section in threads:
            self._counts["stuck"] += 1
            stuck.append(
                StuckTask(
                    name=section.name,
                    group="(guarded, thread)",
                    age=now - section._started,
                    stack=thread_stack(section._thread),
                )
            )
        return stuck

    def report(self) -> SectionReport:
        counts = self._counts
        return SectionReport(
            completed=counts["completed"],
            cancelled=counts["cancelled"],
            cut=counts["cut"],
            stuck=counts["stuck"],
        )
