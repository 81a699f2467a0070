"""asyncio's signal wake-up fd, held back for exit signals until intake stops."""

from __future__ import annotations

import asyncio
import os
import signal
import socket

__all__ = ["WakeupRelay"]


class WakeupRelay:
    """Holds back the wake-up bytes of exit signals until intake stops.

    asyncio's ``loop.add_signal_handler`` (hypercorn's asyncio worker) learns of
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
    def install(cls, hold: frozenset[int]) -> WakeupRelay | None:
        """Relay the current wake-up fd, if there is one (else there is nothing to hold)."""
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        target = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        if target == -1:
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
