"""The drain's deadlines, kept from the trigger on whatever phase is running.

Each ``drain`` group's ``timeout`` counts from the shutdown trigger: when it
passes, the group's tasks are cancelled (counted as cut) and the group takes no
new work, even while ``drain_delay`` runs or a ``before_drain`` hook does. A
task cancelled during the drain (a ``cancel`` group's at the drain's start, a
``drain`` group's at its timeout) gets ``cancel_grace`` to unwind; one that is
still running then is cancelled once more (asyncio delivers a cancellation
once) and, if it goes on, abandoned and reported stuck. trio's ``Deadlines``
(one object that knows every pending deadline and sleeps until the next) is
the model.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel

if TYPE_CHECKING:
    from ._groups import Group

__all__ = ["Deadlines", "let_cancellations_land"]


async def let_cancellations_land() -> None:
    """Give just-cancelled (or just-woken) work a chance to run before anything is
    judged, even with ``cancel_grace=0``: two passes of the event loop. One is not
    always enough on trio, which may run a batch of ready tasks in reverse order."""
    await anyio.lowlevel.checkpoint()
    await anyio.lowlevel.checkpoint()


class Deadlines:
    """Group timeouts and unwind graces of one drain, enforced by :meth:`keep`
    (a task of the supervisor, from the trigger to the end of the drain)."""

    def __init__(
        self,
        groups: dict[str, Group],
        cancel_grace: float,
        abandon: Callable[[Group], None],
        log_cut: Callable[[Group], None],
        fault: Callable[[str, BaseException], None],
        save_cut: Callable[[set[str]], Awaitable[None]],
    ) -> None:
        self._groups = groups
        self._cancel_grace = cancel_grace
        self._abandon = abandon
        self._log_cut = log_cut
        self._fault = fault
        self._save_cut = save_cut  # journal a group's "cut" durable tasks first
        #: groups whose cancelled tasks must have unwound by then (loop time)
        self._unwind_by: dict[Group, float] = {}
        self._wake = anyio.Event()

    def unwind(self, grp: Group) -> None:
        """``grp``'s tasks were just cancelled: abandon what still runs after the grace."""
        if grp.running:
            self._unwind_by[grp] = anyio.current_time() + self._cancel_grace
            self._wake.set()

    async def keep(self) -> None:
        """Enforce the deadlines as they come, until cancelled (the drain is over)."""
        while True:
            try:
                if await self._cut_expired_groups():
                    await let_cancellations_land()
                await self._abandon_expired()
                wake_at = self._next()
            except Exception as exc:  # bookkeeping fault: report it, keep the deadlines
                self._fault("keeping the drain's deadlines", exc)
                wake_at = anyio.current_time() + 0.1
            self._wake = anyio.Event()
            with anyio.move_on_after(max(0.0, wake_at - anyio.current_time())):
                await self._wake.wait()

    async def _cut_expired_groups(self) -> bool:
        now = anyio.current_time()
        cut = False
        for grp in list(self._groups.values()):
            if grp.closed or now < grp.deadline:
                continue
            grp.closed = True  # its deadline passed: it takes no new work
            if len(grp):
                await self._save_cut({grp.name})
                self._log_cut(grp)
                grp.cancel_all(cut=True)
                self.unwind(grp)
                cut = True
        return cut

    async def _abandon_expired(self) -> None:
        now = anyio.current_time()
        expired = [grp for grp, when in self._unwind_by.items() if now >= when]
        if not expired:
            return
        # Cancel once more first: asyncio delivers a cancellation once, so a task
        # that swallowed it and awaits again would never see another (on trio a
        # cancelled scope keeps raising at every checkpoint).
        for grp in expired:
            del self._unwind_by[grp]
            for handle in list(grp.running):
                handle.cancel()
        await let_cancellations_land()
        for grp in expired:
            self._abandon(grp)

    def _next(self) -> float:
        pending = [grp.deadline for grp in self._groups.values() if not grp.closed]
        return min([math.inf, *pending, *self._unwind_by.values()])
