"""A lean HTTP/1.1 keep-alive client for the steady part of the load.

The plain requests and signups are most of the load, and the load generator
must keep its schedule on a busy 2-core machine: httpx costs about 2 ms of
CPU per request there (measured: 1.5 s of CPU for 10 s at 55 requests/s),
this about a fifth of it. It speaks just what the load balancer answers:
responses with ``Content-Length`` (the app's JSON, HAProxy's own error pages).

Idle connections are reused newest first and dropped after ``keepalive``
seconds (httpx's default, 5 s), far below HAProxy's client timeout, so the
client never reuses a connection HAProxy is closing: a failure seen here is
one the restarts caused, not the client's own keep-alive race.
"""

from __future__ import annotations

import asyncio
import time

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class HTTPFailure(Exception):
    """No response: ``kind`` is what went wrong, as the outcome to record."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


class Pool:
    """Keep-alive connections to ``host:port``, one request at a time on each."""

    def __init__(self, host: str, port: int, *, timeout: float, keepalive: float = 5.0) -> None:
        self.host, self.port = host, port
        self.timeout, self.keepalive = timeout, keepalive
        #: (idle since, requests served, connection), newest last
        self.idle: list[tuple[float, int, Connection]] = []

    def _reuse(self) -> tuple[float, int, Connection] | None:
        now = time.monotonic()
        while self.idle:
            since, served, (reader, writer) = self.idle.pop()
            if now - since < self.keepalive and not reader.at_eof() and not writer.is_closing():
                return since, served, (reader, writer)
            writer.close()
        return None

    async def request(self, method: str, target: str) -> tuple[int, bytes]:
        """Send one request; its status and body, or :class:`HTTPFailure`."""
        reused = self._reuse()
        if reused is None:
            try:
                conn = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port), self.timeout
                )
            except (OSError, asyncio.TimeoutError) as exc:
                raise HTTPFailure("ConnectError", repr(exc)) from None
            served, how = 0, "a new connection"
        else:
            since, served, conn = reused
            how = f"a connection idle {time.monotonic() - since:.2f} s after {served} requests"
        reader, writer = conn
        try:
            writer.write(
                f"{method} {target} HTTP/1.1\r\nHost: {self.host}\r\n"
                "Content-Length: 0\r\n\r\n".encode()
            )
            status, body, close = await asyncio.wait_for(_response(reader), self.timeout)
        except asyncio.TimeoutError:
            writer.close()
            raise HTTPFailure(
                "ReadTimeout", f"nothing within {self.timeout:g} s on {how}"
            ) from None
        except asyncio.IncompleteReadError as exc:
            writer.close()
            what = "incomplete response" if exc.partial else "disconnected without a response"
            raise HTTPFailure(what, f"{exc!r} on {how}") from None
        except (OSError, ValueError) as exc:
            writer.close()
            raise HTTPFailure(type(exc).__name__, f"{exc!r} on {how}") from None
        if close:
            writer.close()
        else:
            self.idle.append((time.monotonic(), served + 1, conn))
        return status, body

    def close(self) -> None:
        for *_, (_, writer) in self.idle:
            writer.close()
        self.idle.clear()


async def _response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip().lower()
    if "content-length" not in headers:
        raise ValueError(f"a response without Content-Length: {head[:200]!r}")
    body = await reader.readexactly(int(headers["content-length"]))
    return status, body, headers.get("connection") == "close"
