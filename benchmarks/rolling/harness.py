"""One rolling-restart run: HAProxy, the backends, the load, the rollouts, the count.

:func:`run` starts ``backends`` servers of one kind (the command lines of
``tests/servers.py``) running the app of one variant, HAProxy in front of
them and the load generator, waits until HAProxy has every server up, then
rolls the backends ``rollouts`` times: for each one in turn, SIGTERM; once the
old process has exited (its slot is free, as a pod's is only once the pod is
gone), a replacement on the same port; the next one only once HAProxy has
the replacement up. Then it stops the load, waits for the background jobs
the acknowledged signups started, and returns what :mod:`.summary` makes of it.
"""

from __future__ import annotations

import json
import math
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.rolling.lb import Haproxy
from benchmarks.rolling.summary import summarize
from tests.servers import ROOT, ServerProcess, free_port

APP = "benchmarks.rolling.app:app"


@dataclass(frozen=True)
class Settings:
    """What one run does; the defaults are those of the documented benchmark."""

    rollouts: int = 3
    backends: int = 3
    rate: float = 50.0  # plain requests per second
    signup_rate: float = 5.0
    streams: int = 4
    stream_items: int = 100  # 100 ms apart: 10 s streams
    websockets: int = 0
    job_seconds: float = 1.0
    drain_delay: float = 3.0  # > inter x fall (2 s): out of the pool before intake stops
    exit_wait: float = 20.0
    inter: float = 1.0
    fall: int = 2
    rise: int = 2
    warmup: float = 3.0  # steady load before the first SIGTERM, and after the last restart
    kill_after: float = 40.0  # an old process still running this long after SIGTERM is killed
    # take the backend out of HAProxy before SIGTERM (a preStop hook): the control
    deregister_first: bool = False

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool):
                continue
            if value < 0 or (value == 0 and name in ("rollouts", "backends", "inter", "fall")):
                raise ValueError(f"{name} must be positive, not {value!r}")


def run(kind: str, variant: str, settings: Settings, workdir: Path) -> dict[str, Any]:
    """Roll ``settings.backends`` servers of ``kind`` running ``variant``; the summary."""
    workdir.mkdir(parents=True, exist_ok=True)
    db = workdir / "jobs.sqlite3"
    env = {
        "ROLLING_APP": variant,
        "ROLLING_DB": str(db),
        "ROLLING_JOB_SECONDS": str(settings.job_seconds),
        "ROLLING_DRAIN_DELAY": str(settings.drain_delay),
        "ROLLING_EXIT_WAIT": str(settings.exit_wait),
    }
    ports = _distinct_ports(settings.backends + 2)  # the backends, HAProxy, its stats
    # hypercorn cuts connections --graceful-timeout (3 s) after its shutdown
    # starts: docs/asgi.md has users set it to the exit wait at least. uvicorn
    # waits without a limit, gunicorn 30 s.
    extra = (
        ["--graceful-timeout", str(math.ceil(settings.exit_wait + 5))]
        if "hypercorn" in kind
        else []
    )
    servers: list[ServerProcess] = []
    generations = [0] * settings.backends

    def start(slot: int) -> ServerProcess:
        gen_dir = workdir / f"s{slot}-{generations[slot]}"
        gen_dir.mkdir()
        generations[slot] += 1
        return ServerProcess(
            kind, APP, gen_dir, env=env, port=ports[slot], ready_path=None, extra=extra
        )

    lb: Haproxy | None = None
    load: subprocess.Popen[bytes] | None = None
    timeline: list[dict[str, Any]] = []
    t0 = time.monotonic()
    try:
        servers.extend(start(slot) for slot in range(settings.backends))
        for server in servers:
            server.wait_ready("/healthz/ready", timeout=60)
        lb = Haproxy(
            ports[: settings.backends],
            workdir,
            ports[-2],
            ports[-1],
            inter=settings.inter,
            fall=settings.fall,
            rise=settings.rise,
        )
        for slot in range(settings.backends):
            lb.wait_status(f"s{slot}", "UP", timeout=15)
        load_out = workdir / "load.json"
        load = _start_load(lb.url, load_out, settings, workdir, tag=f"{kind}-{variant}")
        time.sleep(settings.warmup)
        for rollout in range(settings.rollouts):
            for slot in range(settings.backends):
                step = _restart(servers, slot, start, lb, settings)
                timeline.append({"rollout": rollout, "slot": slot, **step})
        time.sleep(settings.warmup)
        result = _stop_load(load, load_out)
        # The last signups were acknowledged as the load stopped; the backends now
        # running finish theirs within job_seconds (a write takes milliseconds).
        done = _wait_for_jobs(db, result["acked"], settings.job_seconds + 5)
        return summarize(result, done, timeline, lb, settings, t0, time.monotonic() - t0)
    finally:
        if load is not None and load.poll() is None:
            load.kill()
            load.wait()
        for server in servers:
            server.stop()
        if lb is not None:
            lb.stop()


def _distinct_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


def _restart(
    servers: list[ServerProcess],
    slot: int,
    start: Callable[[int], ServerProcess],
    lb: Haproxy,
    settings: Settings,
) -> dict[str, Any]:
    """SIGTERM the backend of ``slot``, replace it, wait until HAProxy has it up."""
    old = servers[slot]
    t_begin = time.monotonic()
    if settings.deregister_first:
        lb.command(f"set server app/s{slot} state maint")
        time.sleep(0.2)  # a request HAProxy just picked this server for reaches it first
    t_term = old.send_signal(signal.SIGTERM)
    try:
        code: int | None = old.proc.wait(settings.kill_after)
        killed = False
    except subprocess.TimeoutExpired:
        code, killed = None, True
    t_exit = time.monotonic()
    old.stop()  # whatever is left of it (gunicorn workers), and its log file
    servers[slot] = new = start(slot)
    new.wait_ready("/healthz/ready", timeout=60)  # slow on a busy machine (gunicorn: 11 s)
    t_ready = time.monotonic()
    if settings.deregister_first:
        lb.command(f"set server app/s{slot} state ready")
    t_seen_up = lb.wait_status(f"s{slot}", "UP", timeout=30)
    changes = lb.changes(f"s{slot}", t_begin)
    downs = [when for when, state in changes if state == "DOWN"]
    ups = [when for when, state in changes if state == "UP"]
    # None: never taken out (the replacement answered before `fall` checks failed)
    t_down = downs[0] if downs else None
    t_up = ups[-1] if downs and ups else t_seen_up  # (the log line may still be on its way)
    return {
        "t_term": t_term,
        "exit_code": code,
        "killed": killed,
        "down_after": None if t_down is None else t_down - t_term,
        "exit_after": t_exit - t_term,
        "ready_after": t_ready - t_term,
        "up_after": t_up - t_term,
        "t_up": t_up,
    }


def _start_load(
    url: str, out: Path, settings: Settings, workdir: Path, tag: str
) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "benchmarks.rolling.load", url, "--out", str(out),
        "--rate", str(settings.rate), "--signup-rate", str(settings.signup_rate),
        "--streams", str(settings.streams), "--stream-items", str(settings.stream_items),
        "--ws", str(settings.websockets), "--tag", tag,
    ]  # fmt: skip
    log = (workdir / "load.log").open("wb")
    with log:
        return subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def _stop_load(load: subprocess.Popen[bytes], out: Path) -> dict[str, Any]:
    load.send_signal(signal.SIGTERM)
    code = load.wait(60)
    if code != 0 or not out.exists():
        log = (out.parent / "load.log").read_text(errors="replace")
        raise RuntimeError(f"the load generator failed ({code}):\n{log[-3000:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def _wait_for_jobs(db: Path, acked: list[str], timeout: float) -> set[str]:
    """The job rows written, once every acknowledged one is there or ``timeout`` passed."""
    want = set(acked)
    deadline = time.monotonic() + timeout
    while True:
        with closing(sqlite3.connect(db, timeout=30)) as conn:
            done = {row[0] for row in conn.execute("SELECT id FROM jobs")}
        if want <= done or time.monotonic() > deadline:
            return done
        time.sleep(0.25)


def default_workdir() -> Path:
    """A fresh directory for the logs and files of the runs (kept: see the logs after)."""
    return Path(tempfile.mkdtemp(prefix="rolling-"))
