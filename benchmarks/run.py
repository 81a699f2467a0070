"""Entry point: ``python -m benchmarks`` (or ``python benchmarks/run.py``).

Runs the cases of docs/benchmarks.md against their peers, each sample in a fresh event
loop (memory: a fresh process), prints medians, min/max and the ratio to the
baseline, checks the targets, and writes everything to
``benchmarks/results/latest.json``. Installs nothing: the peers are the
standard library, anyio, trio and aiojobs (the ``bench`` extra).

    python -m benchmarks --quick            # sub-minute smoke run
    python -m benchmarks                    # the full run (several minutes)
    python -m benchmarks --cases spawn,drain --repeats 9
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import logging
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._core import Measurement, Settings, Target, fmt

#: case name → module (each has ``run(settings) -> (measurements, targets)``)
CASES = {
    "spawn": "benchmarks.case_spawn",
    "guarded": "benchmarks.case_guarded",
    "shutdown": "benchmarks.case_shutdown",
    "memory": "benchmarks.case_memory",
    "streams": "benchmarks.case_streams",
    "asgi": "benchmarks.case_asgi",
    "grpc": "benchmarks.case_grpc",
    "durable": "benchmarks.case_durable",
}
PACKAGES = (
    "anyio-taskguard",  # the distribution of the taskguard package
    "anyio",
    "trio",
    "aiojobs",
    "pydantic",
    "uvicorn",
    "starlette",
    "httpx",
)
RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "packages": versions,
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def print_case(measurements: list[Measurement]) -> None:
    rows = [
        (
            f"{m.case} {m.variant}",
            m.impl,
            fmt(m.median, m.unit),
            f"{fmt(m.min, m.unit)} … {fmt(m.max, m.unit)}",
            "" if m.ratio is None else f"{m.ratio:.2f}x",
        )
        for m in measurements
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(5)] if rows else []
    last = ""
    for row in rows:
        head = row[0] if row[0] != last else ""
        last = row[0]
        print(
            f"  {head:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  "
            f"[{row[3]:^{widths[3]}}]  {row[4]:>{widths[4]}}"
        )
    for m in measurements:
        if m.note:
            print(f"    note ({m.impl}): {m.note}")


def describe(t: Target) -> str:
    value = f"{t.value:.2f}x" if t.unit == "x" else fmt(t.value, t.unit)
    limit = f"{t.limit:g}x" if t.unit == "x" else fmt(t.limit, t.unit)
    if t.unit == "bool":
        value, limit = ("yes" if t.value else "no"), "yes"
    verdict = "MET   " if t.met else "MISSED"
    return f"{verdict} {t.case} {t.variant}: {t.what} = {value} ({t.op} {limit})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="taskguard vs its peers, as ratios to a baseline run alongside",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats (< 1 min)")
    parser.add_argument(
        "--repeats", type=int, help="samples per implementation (default 7; quick 3)"
    )
    parser.add_argument(
        "--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}"
    )
    parser.add_argument(
        "--output", type=Path, help="JSON file (default benchmarks/results/latest.json)"
    )
    args = parser.parse_args(argv)
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    repeats = args.repeats or (3 if args.quick else 7)
    settings = Settings(quick=args.quick, repeats=repeats, sizes=())
    # Shutdown summaries (and the cancel case's "exit wait reached") are not news here.
    logging.getLogger("taskguard").setLevel(logging.ERROR)

    info = machine()
    started = datetime.datetime.now(datetime.timezone.utc)
    print(
        f"taskguard benchmarks {'(quick) ' if args.quick else ''}- {started:%Y-%m-%d %H:%M} UTC, "
        f"{info['cores']} cores, Python {info['python']}, load {info['loadavg']}"
    )
    all_m: list[Measurement] = []
    all_t: list[Target] = []
    t0 = time.perf_counter()
    for name in names:
        print(f"\n== {name}")
        case_start = time.perf_counter()
        measurements, targets = importlib.import_module(CASES[name]).run(settings)
        print_case(measurements)
        for t in targets:
            print("  " + describe(t))
        print(f"  ({time.perf_counter() - case_start:.1f} s)")
        all_m += measurements
        all_t += targets
    info["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    elapsed = time.perf_counter() - t0
    print(f"\n== targets ({sum(t.met for t in all_t)}/{len(all_t)} met, {elapsed:.0f} s)")
    for t in all_t:
        print("  " + describe(t))
    output = args.output or RESULTS / "latest.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": " ".join(
            ["python -m benchmarks", *(argv if argv is not None else sys.argv[1:])]
        ),
        "date": started.isoformat(timespec="seconds"),
        "elapsed_s": elapsed,
        "quick": args.quick,
        "repeats": repeats,
        "machine": info,
        "measurements": [m.to_json() for m in all_m],
        "targets": [t.to_json() for t in all_t],
    }
    output.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"results: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
