"""asyncio's signal wake-up fd: ours, so a signal wakes the loop; passed on to the
one that was there (held back for exit signals until intake stops, if asked)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket

__all__ = ["WakeupRelay"]


class WakeupRelay:
    """Wakes the loop at every signal; passes the bytes on to the previous wake-up fd,
    holding back those of ``hold`` until ``release()``.

    Why wake the loop: the kernel may hand a process-directed signal to any
    thread that does not block it (the watchdog's, a worker's); there the
    C-level handler only sets a flag, and Python runs the handler the guard
    installed with ``signal.signal`` once the main thread executes bytecode
    again: an idle asyncio loop would sleep through it until its next timer.
    (trio always has a wake-up fd of its own.)

    Why hold: asyncio's ``loop.add_signal_handler`` (hypercorn's asyncio worker) learns of
    a signal from the byte the C-level handler writes to the fd set with
    ``signal.set_wakeup_fd``, whatever Python-level handler runs. So we put a
    socket of ours there and pass the bytes on (the documented protocol: one
    byte per signal, its number): those of other signals at once, those of
    exit signals once intake stops.
    """

    def __init__(
        self, target: int, reader: socket.socket, writer: socket.socket, hold: frozenset[int]
    ):
        self.target, self.reader, self.writer, self.hold = target, reader, writer, hold
        self.pending = bytearray()
        self.released = False
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(reader.fileno(), self._read)

    @classmethod
    def install(cls, hold: frozenset[int], *, always: bool = False) -> WakeupRelay | None:
        """Relay the current wake-up fd, if there is one; without one, None (nothing
        to hold), unless ``always`` (the relay then only wakes the loop)."""
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        target = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        if target == -1 and not always:
            signal.set_wakeup_fd(-1)
            reader.close()
            writer.close()
            return None
        return cls(target, reader, writer, hold)

    def _read(self) -> None:
        try:
            data = self.reader.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        for signum in data:
            if signum in self.hold and not self.released:
                self.pending.append(signum)
            else:
                self._forward(bytes((signum,)))
        if self.released and self.pending:  # released by a signal handler meanwhile
            self.release()

    def release(self) -> None:
        self.released = True
        data, self.pending = bytes(self.pending), bytearray()
        if data:
            self._forward(data)

    def _forward(self, data: bytes) -> None:
        if self.target == -1:
            return  # nobody else listens: waking the loop was the point
        try:
            os.write(self.target, data)
        except OSError:  # full or closed: the loop would have lost it the same way
            pass

    def close(self) -> None:
        self.release()
        current = signal.set_wakeup_fd(self.target)
        if current != self.writer.fileno():  # someone set their own since: leave it
            signal.set_wakeup_fd(current)
        self.loop.remove_reader(self.reader.fileno())
        self._read()  # what arrived meanwhile
        self.reader.close()
        self.writer.close()
