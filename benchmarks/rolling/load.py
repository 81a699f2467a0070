"""The load generator: a steady, open-loop mix of requests through the load balancer.

Runs in its own process (``python -m benchmarks.rolling.load URL --out FILE
...``) until SIGTERM, then lets what is in flight finish (bounded), and writes
every outcome as JSON to ``--out``:

- plain requests (``GET /work``) and signups (``POST /signup``) at fixed rates,
  each started on schedule whether or not earlier ones have answered (open
  loop: a stalled backend cannot slow the load down and hide its own stall);
- ``--streams`` clients, each reading server-sent events from ``/events``; a
  stream that ends with a ``shutdown`` event is resumed where the event says,
  one that ends without a final event (``end`` or ``shutdown``) is broken and
  resumed from the last item received, as an SSE client with Last-Event-ID would;
- ``--websockets`` clients, each echoing a message every 100 ms over ``/ws``
  and reconnecting when the server closes the connection.

Plain requests and signups go over raw asyncio sockets (:mod:`.rawhttp`), a
fifth of httpx's CPU per request, so the schedule holds on a busy machine;
the streams use httpx (async), which reads SSE over a chunked body and tells a
body cut before its terminating chunk (a broken stream) from a clean end;
websockets use the ``websockets`` client. Times are
``time.monotonic()``, which is system-wide on Linux, so the harness can place
them on its own restart timeline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from benchmarks.rolling.rawhttp import HTTPFailure, Pool

#: a stream segment's outcomes that are not failures
STREAM_OK = ("end", "shutdown")
#: websocket close codes that are a clean end (normal, going away, service restart)
WS_CLEAN = (1000, 1001, 1012)


class Load:
    """The generator's state: the settings and every outcome recorded so far."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stop = asyncio.Event()
        self.rng = random.Random(args.seed)
        #: [kind, start, seconds, outcome, detail] per request; outcome "ok" or what went wrong
        self.requests: list[list[Any]] = []
        #: signup ids answered with 202 (their job must write a row)
        self.acked: list[str] = []
        #: [client, start, seconds, outcome, detail] per stream or websocket connection;
        #: a stream's outcome: end, shutdown (resumed elsewhere), broken, no response, http N
        self.streams: list[list[Any]] = []
        self.websockets: list[list[Any]] = []
        #: items out of order or repeated across resumes (must stay 0)
        self.stream_gaps = 0
        #: per stream client: the last item received (where to resume)
        self.last: dict[int, int] = {}
        self.in_flight: set[asyncio.Task[None]] = set()
        self.overloaded = 0
        #: per request started: how late (s) against its schedule (a busy machine)
        self.lag: list[float] = []

    async def request(self, pool: Pool, kind: str) -> None:
        start = time.monotonic()
        try:
            if kind == "plain":
                status, body = await pool.request("GET", f"/work?ms={self.rng.randint(5, 50)}")
            else:
                job_id = f"{self.args.tag}-{len(self.requests)}-{self.rng.getrandbits(32):x}"
                status, body = await pool.request("POST", f"/signup?id={job_id}")
                if status == 202:
                    self.acked.append(job_id)
            outcome = "ok" if status < 400 else f"http {status}"
            detail = "" if status < 400 else body[:100].decode(errors="replace")
        except HTTPFailure as exc:
            outcome, detail = exc.kind, exc.detail
        self.requests.append([kind, start, time.monotonic() - start, outcome, detail])

    async def paced(self, rate: float, fire: Callable[[], Awaitable[None]]) -> None:
        """Start ``fire()`` ``rate`` times a second until stopped."""
        if rate <= 0:
            return
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while not self.stop.is_set():
            self.lag.append(loop.time() - next_at)
            if len(self.in_flight) >= self.args.max_in_flight:
                self.overloaded += 1  # reported: the figures would understate the load
            else:
                task = asyncio.create_task(fire())
                self.in_flight.add(task)
                task.add_done_callback(self.in_flight.discard)
            next_at += 1 / rate
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    async def stream_client(self, client: httpx.AsyncClient, n: int) -> None:
        """Read logical streams of ``stream_items`` items, resuming across restarts."""
        items = self.args.stream_items
        self.last[n] = -1
        # Staggered, so that some stream is always in the middle when a SIGTERM comes.
        await self._pause(n * items * 0.1 / max(1, self.args.streams))
        while not self.stop.is_set():
            start = time.monotonic()
            outcome, detail = "no response", ""
            try:
                params = {"n": items, "after": self.last[n]}
                async with client.stream("GET", "/events", params=params) as response:
                    if response.status_code != 200:
                        outcome = f"http {response.status_code}"
                    else:
                        outcome = "broken"  # until a final event arrives
                        outcome = await self._read_events(response, n)
            except httpx.HTTPError as exc:
                detail = f"{type(exc).__name__}: {exc}"
            self.streams.append([n, start, time.monotonic() - start, outcome, detail])
            if outcome == "end":
                self.last[n] = -1
            elif outcome not in STREAM_OK:
                await self._pause(0.2)

    async def _read_events(self, response: httpx.Response, n: int) -> str:
        """Read events, moving client ``n``'s resume point; ``end``, ``shutdown`` or ``broken``."""
        event = ""
        async for line in response.aiter_lines():
            if not line:
                event = ""  # a blank line ends an event
            elif line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "shutdown":
                resume = int(json.loads(line[6:])["resume_after"])
                if resume != self.last[n]:
                    self.stream_gaps += 1
                self.last[n] = resume
                return "shutdown"
            elif line.startswith("data: ") and event == "end":
                if self.last[n] != self.args.stream_items - 1:
                    self.stream_gaps += 1  # items missing at the end
                return "end"
            elif line.startswith("data: "):
                item = int(line[6:])
                if item != self.last[n] + 1:
                    self.stream_gaps += 1
                self.last[n] = item
        return "broken"  # the body ended without a final event

    async def websocket_client(self, url: str, n: int) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidStatus

        while not self.stop.is_set():
            start = time.monotonic()
            outcome, detail = "stopped", ""
            try:
                async with connect(url, open_timeout=10, close_timeout=2) as ws:
                    i = 0
                    while not self.stop.is_set():
                        await ws.send(str(i))
                        if await ws.recv() != str(i):
                            outcome = detail = "wrong echo"
                            break
                        i += 1
                        await self._pause(0.1)
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else 1006
                outcome = "closed" if code in WS_CLEAN else "broken"
                detail = f"code {code}"
            except InvalidStatus as exc:
                outcome = f"http {exc.response.status_code}"
            except (OSError, TimeoutError, asyncio.TimeoutError) as exc:
                outcome = "open failed"
                detail = f"{type(exc).__name__}: {exc}"
            self.websockets.append([n, start, time.monotonic() - start, outcome, detail])
            if outcome not in ("stopped", "closed"):
                await self._pause(0.2)

    async def _pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.stop.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def run(self) -> None:
        args = self.args
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop.set)
        limits = httpx.Limits(max_connections=args.streams + 10)  # the streams
        timeout = httpx.Timeout(args.timeout, connect=5.0)
        url = httpx.URL(args.url)
        pool = Pool(url.host, url.port or 80, timeout=args.timeout)
        async with httpx.AsyncClient(base_url=args.url, limits=limits, timeout=timeout) as client:
            ws_url = "ws" + args.url.removeprefix("http") + "/ws"
            long_lived = [
                *(asyncio.create_task(self.stream_client(client, n)) for n in range(args.streams)),
                *(asyncio.create_task(self.websocket_client(ws_url, n)) for n in range(args.ws)),
            ]
            await asyncio.gather(
                self.paced(args.rate, lambda: self.request(pool, "plain")),
                self.paced(args.signup_rate, lambda: self.request(pool, "signup")),
            )
            if self.in_flight:  # started before the stop: let them answer
                await asyncio.wait(self.in_flight, timeout=args.timeout + 5)
            for task in long_lived:
                task.cancel()
            await asyncio.gather(*long_lived, return_exceptions=True)
            pool.close()

    def result(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "acked": self.acked,
            "streams": self.streams,
            "stream_gaps": self.stream_gaps,
            "websockets": self.websockets,
            "overloaded": self.overloaded,
            "lag": self.lag,
            "cpu_s": sum(resource.getrusage(resource.RUSAGE_SELF)[:2]),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rolling.load", description=__doc__)
    parser.add_argument("url", help="the load balancer, e.g. http://127.0.0.1:8000")
    parser.add_argument("--out", type=Path, required=True, help="JSON file written at the end")
    parser.add_argument("--rate", type=float, default=50.0, help="plain requests per second")
    parser.add_argument("--signup-rate", type=float, default=5.0, help="signups per second")
    parser.add_argument("--streams", type=int, default=4, help="concurrent SSE clients")
    parser.add_argument("--stream-items", type=int, default=100, help="items per stream (100 ms)")
    parser.add_argument("--ws", type=int, default=0, help="concurrent websocket clients")
    parser.add_argument("--timeout", type=float, default=15.0, help="per-request read timeout")
    parser.add_argument("--max-in-flight", type=int, default=500)
    parser.add_argument("--tag", default="job", help="prefix of the signup ids")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    for name in ("rate", "signup_rate", "streams", "stream_items", "ws", "timeout"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must not be negative")
    load = Load(args)
    asyncio.run(load.run())
    args.out.write_text(json.dumps(load.result()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
