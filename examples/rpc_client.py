"""A client of the example ``Jobs`` server (``examples/rpc_server.py``).

    .venv/bin/python examples/rpc_client.py 127.0.0.1:50051 submit --jobs 3 --seconds 2
    .venv/bin/python examples/rpc_client.py 127.0.0.1:50051 watch --count 100
    .venv/bin/python examples/rpc_client.py 127.0.0.1:50051 watch --count 100 --resume

(With the server running on that port: ``rpc_server.py --port 50051``.)
``submit`` starts jobs and prints their ids; ``watch`` prints the stream's
messages. With ``--resume``, when the server ends the stream with
``UNAVAILABLE`` (it got SIGTERM), the client waits for the server to be back on
the same address and continues from the resume point that taskguard put in the
trailing metadata (``taskguard.grpc.RESUME_KEY``): no message lost, none
repeated. ``taskguard demo`` uses ``submit`` and ``watch`` from here.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from rpc_server import SERVICE, decode, encode  # the service's names and codec, like protoc stubs

from taskguard.grpc import RESUME_KEY


@dataclass
class WatchResult:
    """How one ``Watch`` call ended."""

    offset: int
    seqs: list[int] = field(default_factory=list)
    code: str = "OK"
    details: str = ""
    trailing: dict[str, str] = field(default_factory=dict)
    #: time.monotonic() when the stream ended (status received)
    ended_at: float = 0.0

    @property
    def resume_from(self) -> int | None:
        """The server's resume point (offset + messages it sent), if it gave one."""
        sent = self.trailing.get(RESUME_KEY)
        return None if sent is None else self.offset + int(sent)


async def submit(
    channel: grpc.aio.Channel, payload: Any = None, seconds: float = 2.0, timeout: float = 5.0
) -> str:
    call = channel.unary_unary(
        f"/{SERVICE}/Submit", request_serializer=encode, response_deserializer=decode
    )
    reply = await call({"payload": payload, "seconds": seconds}, timeout=timeout)
    return str(reply["id"])


async def watch(
    channel: grpc.aio.Channel,
    count: int = 100,
    offset: int = 0,
    interval: float = 0.1,
    on_message: Callable[[dict[str, Any]], object] | None = None,
    timeout: float | None = None,
    wait_for_ready: bool = False,
) -> WatchResult:
    """Run one ``Watch`` call to its end; never raises for the RPC's status."""
    method = channel.unary_stream(
        f"/{SERVICE}/Watch", request_serializer=encode, response_deserializer=decode
    )
    result = WatchResult(offset=offset)
    call = method(
        {"count": count, "offset": offset, "interval": interval},
        timeout=timeout,
        wait_for_ready=wait_for_ready,
    )
    try:
        async for message in call:
            result.seqs.append(int(message["seq"]))
            if on_message is not None:
                on_message(message)
        result.trailing = _metadata(await call.trailing_metadata())
    except grpc.aio.AioRpcError as exc:
        result.code = exc.code().name
        result.details = exc.details() or ""
        result.trailing = _metadata(exc.trailing_metadata())
    result.ended_at = time.monotonic()
    return result


def _metadata(md: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in md or ():
        out[key] = value.decode() if isinstance(value, bytes) else str(value)
    return out


async def watch_resuming(target: str, count: int, offset: int, interval: float) -> int:
    """Watch to the end, reconnecting after ``UNAVAILABLE`` (e.g. a server restart)."""
    while offset < count:
        async with grpc.aio.insecure_channel(target) as channel:
            result = await watch(
                channel,
                count,
                offset,
                interval,
                on_message=lambda m: print(f"message {m['seq']}", flush=True),
                wait_for_ready=True,
                timeout=300,
            )
        if result.code == "OK":
            return 0
        resume = result.resume_from
        if result.code != "UNAVAILABLE":
            print(f"watch failed: {result.code} {result.details}", file=sys.stderr)
            return 1
        offset = resume if resume is not None else offset + len(result.seqs)
        print(f"stream ended: {result.details}; resuming from {offset}", file=sys.stderr)
        await asyncio.sleep(0.5)
    return 0


async def _main(args: argparse.Namespace) -> int:
    if args.command == "watch":
        if args.resume:
            return await watch_resuming(args.target, args.count, args.offset, args.interval)
        async with grpc.aio.insecure_channel(args.target) as channel:
            result = await watch(
                channel,
                args.count,
                args.offset,
                args.interval,
                on_message=lambda m: print(f"message {m['seq']}", flush=True),
            )
        print(f"status {result.code} {result.details} resume_from={result.resume_from}")
        return 0 if result.code == "OK" else 1
    async with grpc.aio.insecure_channel(args.target) as channel:
        for i in range(args.jobs):
            print(await submit(channel, {"n": i}, args.seconds))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A client of the example Jobs server.")
    parser.add_argument("target", help="host:port the server printed (PORT <n>)")
    sub = parser.add_subparsers(dest="command", required=True)
    p_submit = sub.add_parser("submit", help="submit jobs; prints their ids")
    p_submit.add_argument("--jobs", type=int, default=1)
    p_submit.add_argument("--seconds", type=float, default=2.0)
    p_watch = sub.add_parser("watch", help="open a Watch stream")
    p_watch.add_argument("--count", type=int, default=100)
    p_watch.add_argument("--offset", type=int, default=0)
    p_watch.add_argument("--interval", type=float, default=0.1)
    p_watch.add_argument(
        "--resume", action="store_true", help="on UNAVAILABLE, reconnect and resume"
    )
    return asyncio.run(_main(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
