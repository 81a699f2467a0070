"""The example gRPC server as a real process (real signals, a real client), and
``taskguard demo``, which runs to completion from any directory and states what
it measured.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from children import Child

pytest.importorskip("grpc")
import grpc.aio
from rpc_client import submit, watch  # examples/ (on pytest's pythonpath)
from rpc_server import REPORT_MARKER, JobStore, decode, encode

import taskguard

ROOT = Path(taskguard.__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # grpc.aio runs on asyncio only


async def read_some(call: Any, n: int) -> list[int]:
    seqs = []
    async for message in call:
        seqs.append(message["seq"])
        if len(seqs) == n:
            break
    return seqs


def run_demo(cwd: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    script = Path(sys.executable).with_name("taskguard")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "taskguard"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    start = time.monotonic()
    proc = subprocess.run(
        [*command, "demo", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    return proc, time.monotonic() - start


def test_demo_runs_and_states_its_figures(tmp_path: Path) -> None:
    proc, took = run_demo(tmp_path)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr[-3000:]
    assert took < 30, f"the demo took {took:.1f}s"
    assert "[FAIL]" not in out
    # the taskguard side: each figure it measured
    ended = re.search(r"the stream ended (\d+) ms after SIGTERM with UNAVAILABLE", out)
    assert ended, out
    assert int(ended.group(1)) < 1000
    resume = re.search(
        r"resume point (\d+) in the trailing metadata; the client received (\d+)",
        out,
    )
    assert resume, out
    assert resume.group(1) == resume.group(2)
    assert re.search(rf"Watch\(offset={resume.group(1)}\) delivered messages", out), out
    assert re.search(r"jobs: 3 of 3 submitted just before SIGTERM finished", out), out
    assert re.search(r"metrics work cancelled at once: [1-9]\d* task", out), out
    assert "hooks in order: before_drain:grpc: stop intake ok -> after_drain:" in out
    exited = re.search(r"the server exited (\d+\.\d+) s after SIGTERM, status 0, report clean", out)
    assert exited, out
    # the plain server next to it: a stream that held exit, and lost jobs
    held = re.search(r"the stream went on (\d+\.\d) s after SIGTERM \(holding exit\)", out)
    assert held, out
    assert float(held.group(1)) > float(exited.group(1))
    assert re.search(r"jobs finished: [0-2] of 3 \([1-3] lost\)", out), out
    assert "All of taskguard's promises held" in out


def test_demo_quick_skips_the_comparison(tmp_path: Path) -> None:
    proc, _ = run_demo(tmp_path, "--quick")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "the stream ended" in proc.stdout
    assert "Plain grpc.aio" not in proc.stdout


# -- the example server as a real process ----------------------------------------


class ServerProcess(Child):
    """The example RPC server; it prints ``PORT <n>`` once it listens."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        super().__init__(
            [sys.executable, str(EXAMPLES / "rpc_server.py"), "--data-dir", str(data_dir), *args],
            env=env,
        )
        try:
            self.port = int(self.wait_line("PORT ", timeout=30).split()[1])
        except AssertionError:
            self.stop()
            raise

    def err(self) -> str:
        return "\n".join(self.err_lines[-40:])

    def events(self, name: str) -> list[dict[str, Any]]:
        lines = [json.loads(ln[6:]) for ln in list(self.lines) if ln.startswith("EVENT ")]
        return [e for e in lines if e["event"] == name]

    def report(self, marker: str = REPORT_MARKER, *, stderr: bool = True) -> dict[str, Any]:
        return super().report(marker, stderr=stderr)

    def wait_exit(self, timeout: float) -> tuple[int, float]:
        start = time.monotonic()
        code = self.wait(timeout)
        return code, time.monotonic() - start

    def close(self) -> None:
        self.stop()


@pytest.fixture
def example_server(tmp_path: Path) -> Iterator[Any]:
    started: list[ServerProcess] = []

    def start(*args: str) -> ServerProcess:
        server = ServerProcess(tmp_path, *args)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.close()


@pytest.mark.anyio
async def test_sigterm_mid_watch_ends_stream_fast_and_server_exits(
    example_server: Any, tmp_path: Path
) -> None:
    server = example_server()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        ids = [await submit(channel, i, seconds=1.0) for i in range(3)]
        signalled: list[float] = []

        def on_message(message: dict[str, Any]) -> None:
            if message["seq"] == 10:
                signalled.append(time.monotonic())
                server.signal(signal.SIGTERM)

        result = await watch(channel, 100, on_message=on_message)
    assert result.code == "UNAVAILABLE", server.err()
    assert "shutting down" in result.details
    # generous bounds for a loaded machine: uncut, the watch runs ~9 s more and the
    # exit wait is 10 s; neither was waited for
    assert result.ended_at - signalled[0] < 2.5
    assert result.resume_from == len(result.seqs) == 11
    code, _ = await asyncio.to_thread(server.wait_exit, 10)
    exited = time.monotonic() - signalled[0]
    assert code == 0, server.err()
    assert exited < 5.0, f"exit took {exited:.2f}s"
    report = server.report()
    assert report["clean"]
    assert report["streams"] == {"interrupted": 1}
    assert JobStore(tmp_path).finished_ids() >= set(ids)


@pytest.mark.anyio
async def test_jobs_submitted_just_before_sigterm_all_finish(
    example_server: Any, tmp_path: Path
) -> None:
    server = example_server()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        ids = [await submit(channel, i, seconds=1.5) for i in range(5)]
    server.signal(signal.SIGTERM)
    code, _ = await asyncio.to_thread(server.wait_exit, 15)
    assert code == 0, server.err()
    assert JobStore(tmp_path).finished_ids() == set(ids)
    report = server.report()
    assert report["groups"]["jobs"]["completed"] == 5
    assert report["groups"]["metrics"]["cancelled"] >= 5  # the per-job pushes and the reporter
    names = [h["name"] for h in report["hooks"]]
    assert names == ["grpc: stop intake", "exit Channel", "exit AuditServer", "flush metrics"]


@pytest.mark.anyio
async def test_client_cancelling_a_watch_stops_the_producer(example_server: Any) -> None:
    server = example_server()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        method = channel.unary_stream(
            "/taskguard.example.Jobs/Watch", request_serializer=encode, response_deserializer=decode
        )
        call = method({"count": 1000, "interval": 0.02})
        await read_some(call, 3)
        call.cancel()
        for _ in range(100):
            if server.events("watch_closed"):
                break
            await asyncio.sleep(0.05)
        closed = server.events("watch_closed")
        assert closed, server.err()
        await asyncio.sleep(0.3)
        assert server.events("watch_closed") == closed  # closed once
        assert closed[0]["produced"] < 20
    server.signal(signal.SIGTERM)
    code, _ = await asyncio.to_thread(server.wait_exit, 10)
    assert code == 0
    assert server.report()["streams"] == {"disconnected": 1}


@pytest.mark.anyio
async def test_second_sigterm_forces_exit(example_server: Any, tmp_path: Path) -> None:
    server = example_server("--exit-wait", "30")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        await submit(channel, "slow", seconds=60)
    server.signal(signal.SIGTERM)
    await asyncio.sleep(0.5)
    assert server.popen.poll() is None  # draining: waiting for the 60 s job
    server.signal(signal.SIGTERM)
    code, took = await asyncio.to_thread(server.wait_exit, 10)
    assert took < 5, server.err()
    assert code == 1  # forced: the job was cut, the report is not clean
    report = server.report()
    assert report["forced"]
    assert report["groups"]["jobs"]["cut"] == 1
    assert JobStore(tmp_path).finished_ids() == set()
