"""``taskguard demo``: the example gRPC server through a SIGTERM, with and without taskguard.

It starts the example ``Jobs`` server (``examples/rpc_server.py``) as a real
subprocess on 127.0.0.1, opens a 100-message ``Watch``, submits jobs, sends the
server SIGTERM mid-stream, and reports what it measured: how fast the stream
ended and with which resume point, whether the jobs finished (read back from
SQLite), what was cancelled, the hooks in order, and how long the server took
to exit. Then the same steps against the same service run the usual way.
Exit status 0 when taskguard kept every promise, 1 otherwise, 2 when the
``grpc`` extra is not installed (with a one-line hint).

The demo runs the repository's examples, ``rpc_server.py`` and
``rpc_client.py``, as they are: from a source checkout in ``examples/``; the
wheel ships the same two files in this package (see ``pyproject.toml``).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import rpc_client

#: where the ``taskguard`` package is (a checkout, or site-packages)
_ROOT = Path(__file__).resolve().parents[2]
#: the distribution name on the package index (the import name is ``taskguard``)
DIST = "anyio-taskguard"
HINT = (
    f"taskguard demo needs the grpc extra: pip install '{DIST}[grpc]' "
    "(from a clone: .venv/bin/pip install -e '.[grpc]')"
)


def examples_dir() -> Path:
    """Where ``rpc_server.py`` and ``rpc_client.py`` are: in the wheel, or in the checkout."""
    here = Path(__file__).resolve().parent
    return here if (here / "rpc_server.py").exists() else here.parents[1] / "examples"


def _examples_importable() -> None:
    """Put the examples on ``sys.path`` (the client imports the server's module, as scripts do)."""
    path = str(examples_dir())
    if path not in sys.path:
        sys.path.insert(0, path)


#: the exit wait of the taskguard server, and the grace of the plain one's server.stop()
EXIT_WAIT = 6.0
JOBS = 3
JOB_SECONDS = 2.0
COUNT = 100
SUBMIT_AT = 10  # submit the jobs when this message arrives...
SIGTERM_AT = 15  # ...and send SIGTERM at this one


@dataclass
class Run:
    """What one server run looked like from outside."""

    mode: str
    watch: rpc_client.WatchResult | None = None
    job_ids: list[str] = field(default_factory=list)
    finished: set[str] = field(default_factory=set)
    stream_end_ms: float | None = None
    exit_seconds: float | None = None
    exit_code: int | None = None
    report: dict[str, Any] | None = None
    plain: dict[str, Any] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


class Server:
    """The example server as a subprocess; its output is collected as it comes."""

    def __init__(self, data_dir: str, plain: bool) -> None:
        self.args = ["--data-dir", data_dir, "--exit-wait", str(EXIT_WAIT)]
        if plain:
            self.args.append("--plain")
        self.proc: asyncio.subprocess.Process | None = None
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.port = 0
        self._port_seen = asyncio.Event()
        self._readers: list[asyncio.Task[None]] = []

    async def start(self) -> int:
        env = dict(os.environ)
        if _ROOT.name not in ("site-packages", "dist-packages"):
            # A source checkout (editable install or none): the child imports the
            # same taskguard as we do, whatever its current directory.
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(examples_dir() / "rpc_server.py"),
            *self.args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        self._readers = [
            asyncio.ensure_future(self._read(self.proc.stdout, self.stdout)),
            asyncio.ensure_future(self._read(self.proc.stderr, self.stderr)),
        ]
        await asyncio.wait_for(self._port_seen.wait(), 20)
        return self.port

    async def _read(self, stream: asyncio.StreamReader, into: list[str]) -> None:
        async for raw in stream:
            line = raw.decode(errors="replace").rstrip("\n")
            into.append(line)
            if line.startswith("PORT "):
                self.port = int(line.split()[1])
                self._port_seen.set()

    def terminate(self) -> float:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return time.monotonic()

    async def wait(self, timeout: float) -> int:
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.wait(self._readers, timeout=2)
        return code

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        for reader in self._readers:
            reader.cancel()

    def marked(self, marker: str) -> dict[str, Any] | None:
        for line in self.stderr:
            if line.startswith(marker):
                return dict(json.loads(line[len(marker) :]))
        return None

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(ln[6:]) for ln in self.stdout if ln.startswith("EVENT ")]


async def scenario(mode: str, data_dir: str, with_watch: bool = True) -> Run:
    """Watch(100); submit the jobs at message 10; SIGTERM at message 15; measure."""
    import grpc.aio

    _examples_importable()
    import rpc_client as client
    import rpc_server as server_module

    run = Run(mode)
    server = Server(data_dir, plain=mode == "plain")
    try:
        port = await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            submit_now, sigterm_now = asyncio.Event(), asyncio.Event()

            def on_message(message: dict[str, Any]) -> None:
                if message["seq"] == SUBMIT_AT:
                    submit_now.set()
                elif message["seq"] == SIGTERM_AT:
                    sigterm_now.set()

            watching = None
            if with_watch:
                watching = asyncio.ensure_future(
                    client.watch(channel, COUNT, on_message=on_message)
                )
                await asyncio.wait_for(submit_now.wait(), 10)
            for i in range(JOBS):
                run.job_ids.append(await client.submit(channel, {"n": i}, JOB_SECONDS))
            if watching is not None:
                await asyncio.wait_for(sigterm_now.wait(), 10)
            signalled = server.terminate()
            if watching is not None:
                run.watch = await asyncio.wait_for(watching, EXIT_WAIT + 10)
                run.stream_end_ms = (run.watch.ended_at - signalled) * 1000
        run.exit_code = await server.wait(EXIT_WAIT + 10)
        run.exit_seconds = time.monotonic() - signalled
        run.finished = server_module.JobStore(data_dir).finished_ids() & set(run.job_ids)
        run.report = server.marked(server_module.REPORT_MARKER)
        run.plain = server.marked(server_module.PLAIN_MARKER)
        run.events = server.events()
    except Exception as exc:
        tail = "\n      ".join(server.stderr[-15:])
        run.error = f"{type(exc).__name__}: {exc}" + (
            f"; server stderr:\n      {tail}" if tail else ""
        )
        run.events = server.events()
    finally:
        await server.kill()
    return run


async def resume(data_dir: str, offset: int) -> tuple[list[int], str]:
    """Restart the server and resume the watch from ``offset`` (10 ms apart, to be quick)."""
    import grpc.aio

    _examples_importable()
    import rpc_client as client

    server = Server(data_dir, plain=False)
    try:
        port = await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            result = await client.watch(channel, COUNT, offset, interval=0.01, timeout=20)
        server.terminate()
        await server.wait(EXIT_WAIT + 5)
        return result.seqs, result.code
    finally:
        await server.kill()


class Checks:
    def __init__(self) -> None:
        self.failed: list[str] = []

    def line(self, ok: bool | None, text: str, promise: bool = True) -> None:
        if ok is None:
            mark = "[--]  "
        elif ok:
            mark = "[ok]  "
        else:
            mark = "[FAIL]" if promise else "[bad] "
        print(f"  {mark} {text}")
        if promise and ok is False:
            self.failed.append(text)


def show_guarded(run: Run, resumed: tuple[list[int], str] | None, checks: Checks) -> None:
    print("\nWith taskguard (GuardInterceptor + serve() + taskguard.run):")
    if run.error or run.watch is None or run.report is None:
        checks.line(False, f"the run failed: {run.error or 'no report from the server'}")
        return
    w, report = run.watch, run.report
    received = len(w.seqs)
    checks.line(
        w.code == "UNAVAILABLE" and run.stream_end_ms is not None and run.stream_end_ms < 1000,
        f"the stream ended {run.stream_end_ms:.0f} ms after SIGTERM with {w.code}: {w.details!r}",
    )
    checks.line(
        w.resume_from == received,
        f"resume point {w.resume_from} in the trailing metadata; the client received "
        f"{received} messages (0..{received - 1})",
    )
    if resumed is not None:
        seqs, code = resumed
        expected = list(range(received, COUNT))
        checks.line(
            seqs == expected and code == "OK",
            f"after a restart, Watch(offset={received}) delivered messages "
            f"{seqs[0] if seqs else '-'}..{seqs[-1] if seqs else '-'} ({len(seqs)}), status {code}:"
            " no gap, no duplicate",
        )
    checks.line(
        len(run.finished) == len(run.job_ids),
        f"jobs: {len(run.finished)} of {len(run.job_ids)} submitted just before SIGTERM "
        f"finished (rows in jobs.sqlite, written through the audit channel); the drain "
        f"waited {report['phases'].get('drain', 0):.1f} s for them",
    )
    metrics = report["groups"].get("metrics", {})
    checks.line(
        metrics.get("cancelled", 0) > 0,
        f"metrics work cancelled at once: {metrics.get('cancelled', 0)} task(s) "
        "(group 'metrics', on_shutdown='cancel')",
    )
    hooks = report["hooks"]
    stages = [h["stage"] for h in hooks]
    in_order = stages == sorted(stages, key=lambda s: s != "before_drain")
    steps = " -> ".join(f"{h['stage']}:{h['name']} {h['outcome']}" for h in hooks)
    checks.line(in_order and all(h["outcome"] == "ok" for h in hooks), f"hooks in order: {steps}")
    phases = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in report["phases"].items())
    checks.line(
        run.exit_code == 0 and report["clean"] and (run.exit_seconds or 99) < EXIT_WAIT + 2,
        f"the server exited {run.exit_seconds:.2f} s after SIGTERM, status {run.exit_code}, "
        f"report {'clean' if report['clean'] else 'NOT clean'} ({phases}; streams "
        f"{report['streams']})",
    )


def show_plain(held: Run, lost: Run, checks: Checks) -> None:
    print(f"\nPlain grpc.aio (asyncio.create_task + server.stop(grace={EXIT_WAIT:g}) on SIGTERM):")
    if held.error or held.watch is None:
        checks.line(None, f"the run with a stream failed: {held.error}", promise=False)
    else:
        w = held.watch
        ended = (held.stream_end_ms or 0) < 1000
        checks.line(
            ended,
            f"the stream went on {(held.stream_end_ms or 0) / 1000:.1f} s after SIGTERM "
            f"(holding exit), then ended {w.code} {w.details!r}, "
            f"{'with' if w.resume_from is not None else 'with no'} resume point "
            f"(client got {len(w.seqs)} messages); the server exited after "
            f"{held.exit_seconds or 0:.1f} s; jobs finished: {len(held.finished)} of "
            f"{len(held.job_ids)} (they ran while the stream held the process)",
            promise=False,
        )
    if lost.error:
        checks.line(None, f"the run without a stream failed: {lost.error}", promise=False)
    else:
        checks.line(
            len(lost.finished) == len(lost.job_ids),
            f"without an open stream: the server exited {lost.exit_seconds:.2f} s after SIGTERM; "
            f"jobs finished: {len(lost.finished)} of {len(lost.job_ids)} "
            f"({len(lost.job_ids) - len(lost.finished)} lost)",
            promise=False,
        )


async def _demo(quick: bool) -> int:
    started = time.monotonic()
    print(
        "taskguard demo: the example gRPC Jobs server (examples/rpc_server.py) gets SIGTERM "
        "mid-stream.\n"
        f"Steps: Watch({COUNT}) at 100 ms/message; {JOBS} jobs of {JOB_SECONDS:g} s submitted at "
        f"message {SUBMIT_AT}; SIGTERM at message {SIGTERM_AT}. Exit wait {EXIT_WAIT:g} s.",
        flush=True,
    )
    checks = Checks()
    with tempfile.TemporaryDirectory(prefix="taskguard-demo-") as tmp:
        dirs = {name: os.path.join(tmp, name) for name in ("guarded", "held", "lost")}
        plain = None
        if not quick:  # the plain runs take EXIT_WAIT seconds: run them alongside
            plain = asyncio.gather(
                scenario("plain", dirs["held"]), scenario("plain", dirs["lost"], with_watch=False)
            )
        guarded = await scenario("taskguard", dirs["guarded"])
        resumed = None
        if not quick and guarded.watch is not None:
            try:
                resumed = await resume(dirs["guarded"], len(guarded.watch.seqs))
            except Exception as exc:
                resumed = ([], f"failed: {type(exc).__name__}: {exc}")
        show_guarded(guarded, resumed, checks)
        if plain is not None:
            held, lost = await plain
            show_plain(held, lost, checks)
    took = time.monotonic() - started
    if checks.failed:
        print(f"\ntaskguard did NOT keep {len(checks.failed)} promise(s) (demo took {took:.1f} s).")
        return 1
    print(f"\nAll of taskguard's promises held (demo took {took:.1f} s).")
    return 0


def demo(quick: bool = False) -> int:
    """Run the demo; 0 when taskguard kept its promises. ``quick`` skips the comparison.

    Two parts: the example RPC server through a graceful shutdown (beside a
    plain grpc.aio server), then durable tasks cut at the deadline and resumed
    by the next start."""
    if importlib.util.find_spec("grpc") is None:
        print(HINT, file=sys.stderr)
        return 2
    code = asyncio.run(_demo(quick))
    from .durable import durable_demo

    print()
    return code or durable_demo(quick)
