"""``python -m benchmarks.rolling``: the bare app and the taskguard app, side by side.

For each repeat, each server and each app variant (in that order, so the
variants of one server run back to back under the same machine load), one
run of :func:`benchmarks.rolling.harness.run`; prints a line per run and a
table per (server, app) with the spread over the repeats, and writes every
figure to ``benchmarks/results/rolling-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.rolling import VARIANTS
from benchmarks.rolling.harness import Settings, default_workdir, run
from benchmarks.run import RESULTS, machine
from tests.servers import KINDS

HEADLINE = ("failed_requests", "broken_streams", "broken_websockets", "lost_jobs")


def _line(server: str, app: str, s: dict[str, Any]) -> str:
    fails = ", ".join(f"{k} x{v}" for k, v in s["requests"]["failures"].items()) or "-"
    times, lb = s["restart_s"], s["haproxy"]
    return (
        f"{server:<10} {app:<9} requests {s['requests']['total']:>5}  "
        f"failed {s['failed_requests']:>3}  broken streams {s['broken_streams']:>2}  "
        f"broken ws {s['broken_websockets']:>2}  lost jobs {s['lost_jobs']:>3}/"
        f"{s['jobs']['acknowledged']}  | restart: out of pool "
        f"{_median(times['down_after'])} s, exit {_median(times['exit_after'])} s, "
        f"back {_median(times['up_after'])} s  ({s['elapsed_s']} s)\n"
        f"{'':<21}failures: {fails}\n"
        f"{'':<21}haproxy: {lb['failures_by_status_and_termination'] or '-'}, "
        f"reaching it s after the SIGTERM: {lb['failures_s_after_sigterm'] or '-'}"
    )


def _median(spread: dict[str, float] | None) -> str:
    return "-" if spread is None else f"{spread['median']:.1f}"


def _table(runs: list[dict[str, Any]]) -> list[str]:
    rows = [f"{'server':<10} {'app':<9} " + "  ".join(f"{h:>22}" for h in HEADLINE)]
    keys = dict.fromkeys((r["server"], r["app"]) for r in runs)
    for server, app in keys:
        mine = [r for r in runs if (r["server"], r["app"]) == (server, app)]
        cells = []
        for h in HEADLINE:
            values = [r["summary"][h] if "summary" in r else "error" for r in mine]
            cells.append(f"{' '.join(map(str, values)):>22}")
        rows.append(f"{server:<10} {app:<9} " + "  ".join(cells))
    return rows


def main(argv: list[str] | None = None) -> int:
    defaults = Settings()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rolling", description=__doc__)
    parser.add_argument(
        "--servers",
        default="uvicorn,gunicorn,hypercorn",
        help=f"comma-separated, of {', '.join(KINDS)}",
    )
    parser.add_argument("--apps", default=",".join(VARIANTS), help="bare, taskguard or both")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--rollouts", type=int, default=defaults.rollouts)
    parser.add_argument(
        "--rate", type=float, default=defaults.rate, help="plain requests per second"
    )
    parser.add_argument("--signup-rate", type=float, default=defaults.signup_rate)
    parser.add_argument(
        "--streams", type=int, default=defaults.streams, help="concurrent SSE clients"
    )
    parser.add_argument(
        "--ws", type=int, default=defaults.websockets, help="concurrent websocket clients (0: none)"
    )
    parser.add_argument("--drain-delay", type=float, default=defaults.drain_delay)
    parser.add_argument(
        "--job-seconds", type=float, default=defaults.job_seconds, help="a signup job's duration"
    )
    parser.add_argument(
        "--deregister-first",
        action="store_true",
        help="take each backend out of HAProxy before its SIGTERM (the control)",
    )
    parser.add_argument(
        "--output", type=Path, help="JSON file (default benchmarks/results/rolling-<date>.json)"
    )
    parser.add_argument("--workdir", type=Path, help="logs and files of the runs (default: new)")
    args = parser.parse_args(argv)
    servers = [s for s in args.servers.split(",") if s]
    apps = [a for a in args.apps.split(",") if a]
    bad = [s for s in servers if s not in KINDS] + [a for a in apps if a not in VARIANTS]
    if bad:
        parser.error(f"unknown server or app: {', '.join(bad)}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    try:
        settings = Settings(
            rollouts=args.rollouts,
            rate=args.rate,
            signup_rate=args.signup_rate,
            streams=args.streams,
            websockets=args.ws,
            drain_delay=args.drain_delay,
            job_seconds=args.job_seconds,
            deregister_first=args.deregister_first,
        )
    except ValueError as exc:
        parser.error(str(exc))
    # A SIGTERM to the benchmark unwinds it like Ctrl-C: every process it started is stopped.
    signal.signal(signal.SIGTERM, signal.getsignal(signal.SIGINT))
    started = datetime.datetime.now(datetime.timezone.utc)
    workdir = args.workdir or default_workdir()
    output = args.output or RESULTS / f"rolling-{started:%Y-%m-%d-%H%M}.json"
    info = machine()
    print(
        f"rolling restarts behind HAProxy - {started:%Y-%m-%d %H:%M} UTC, {info['cores']} cores, "
        f"load {info['loadavg']}; logs in {workdir}",
        flush=True,
    )
    runs: list[dict[str, Any]] = []
    t0 = time.monotonic()
    for repeat in range(args.repeats):
        for server in servers:
            for app in apps:
                entry: dict[str, Any] = {"server": server, "app": app, "repeat": repeat}
                try:
                    summary = run(server, app, settings, workdir / f"{server}-{app}-{repeat}")
                except Exception:
                    entry["error"] = traceback.format_exc()
                    print(f"{server:<10} {app:<9} ERROR\n{entry['error']}", flush=True)
                else:
                    entry["summary"] = summary
                    print(_line(server, app, summary), flush=True)
                entry["loadavg"] = os.getloadavg()
                runs.append(entry)
    info["loadavg_end"] = os.getloadavg()
    print("\nper run, in repeat order:")
    print("\n".join(_table(runs)))
    print(f"({time.monotonic() - t0:.0f} s)")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        json.dumps(
            {
                "started": started.isoformat(),
                "command": " ".join(["python -m benchmarks.rolling", *(argv or sys.argv[1:])]),
                "machine": info,
                "settings": asdict(settings) | {"servers": servers, "apps": apps},
                "runs": runs,
            },
            indent=1,
        )
    )
    print(f"results: {output}")
    return 1 if any("error" in r for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
