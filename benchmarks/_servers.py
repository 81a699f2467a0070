"""Real uvicorn subprocesses on 127.0.0.1 and a lean keep-alive load client."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def asgi_available() -> str | None:
    """None when taskguard.asgi imports, else why not (the ASGI cases then skip)."""
    missing = [m for m in ("uvicorn", "starlette", "httpx") if importlib.util.find_spec(m) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (pip install -e '.[dev]')"
    try:
        import taskguard.asgi  # noqa: F401
    except Exception as exc:
        return f"taskguard.asgi is not importable yet ({type(exc).__name__}: {exc})"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def uvicorn(
    factory: str, *extra: str, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """Run ``uvicorn --factory benchmarks._asgi_app:<factory>``; always killed at the end."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "uvicorn", "--factory", f"benchmarks._asgi_app:{factory}",
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log",
        *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"uvicorn exited at startup ({proc.returncode}): {err[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("uvicorn did not start within 20 s") from None
                time.sleep(0.05)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()


_REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


async def _worker(port: int, count: int) -> int:
    """Send ``count`` keep-alive requests one after the other; return the 200s."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    ok = 0
    try:
        for _ in range(count):
            writer.write(_REQUEST)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            ok += head.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
    return ok


def load(port: int, requests: int, concurrency: int) -> float:
    """Requests per second for ``requests`` GETs over ``concurrency`` keep-alive connections."""

    async def main() -> float:
        per = requests // concurrency
        t0 = time.perf_counter()
        oks = await asyncio.gather(*(_worker(port, per) for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
        if sum(oks) != per * concurrency:
            raise RuntimeError(f"only {sum(oks)} of {per * concurrency} requests got 200")
        return per * concurrency / elapsed

    return asyncio.run(main())
