"""Case 7: ASGI overhead, requests/s of a small Starlette app under uvicorn.

Four servers run at once on 127.0.0.1: the app alone, the app behind a
pure-ASGI no-op middleware (the floor any middleware costs), the same with one
anyio cancel scope per request (the floor of a middleware that can cut a
request without piercing the app's shielded scopes: see _asgi_app.py), and the
app wrapped in ``TaskGuardMiddleware``. The load client (a fixed request count
over a fixed number of keep-alive connections) hits them in turns, so noise
hits all four. Two figures per sample:

- requests/s as the client sees it (the target: guarded ≥ 0.95x plain);
- the server process's CPU time per request (user + system, from
  ``/proc/<pid>/stat``; Linux only), which does not move with how the
  scheduler shares the cores between client and server.

The target is checked on the median of the per-round ratios (each round
measures every server once, back to back), which cancels the slow drifts of a
shared machine better than a ratio of medians. Where the OS allows it, the
client runs on the first core and the servers on the last.
"""

from __future__ import annotations

import os
import statistics
import subprocess
from functools import partial

from ._core import Measurement, Settings, Target, interleave, link
from ._servers import asgi_available, load, uvicorn

CASE = "asgi"
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process ``pid`` so far (None where /proc is missing)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


def _sample(
    proc: subprocess.Popen[bytes], port: int, requests: int, concurrency: int
) -> tuple[float, float | None]:
    before = _cpu_seconds(proc.pid)
    rate = load(port, requests, concurrency)
    after = _cpu_seconds(proc.pid)
    cpu = None if before is None or after is None else (after - before) / requests
    return rate, cpu


def _pin(pid: int, cpu: int) -> None:
    """Run ``pid`` (0: this process) on core ``cpu`` only, where the OS allows it."""
    cores = os.cpu_count() or 1
    if hasattr(os, "sched_setaffinity") and cores >= 2:
        os.sched_setaffinity(pid, {cpu % cores})


def _round_ratio(samples: list[float], baseline: list[float]) -> float:
    return statistics.median(s / b for s, b in zip(samples, baseline, strict=True))


def run(settings: Settings) -> tuple[list[Measurement], list[Target]]:
    why = asgi_available()
    if why is not None:
        print(f"  skipped: {why}")
        return [], []
    requests = 2_000 if settings.quick else 10_000
    concurrency = 16
    variant = f"{requests:,} GET / over {concurrency} connections"
    names = {
        "make_plain": "starlette (baseline)",
        "make_noop": "starlette + no-op ASGI middleware",
        "make_scoped": "starlette + no-op + anyio CancelScope",
        "make_guarded": "starlette + TaskGuardMiddleware",
    }
    with (
        uvicorn("make_plain") as plain,
        uvicorn("make_noop") as noop,
        uvicorn("make_scoped") as scoped,
        uvicorn("make_guarded") as guarded,
    ):
        servers = dict(zip(names.values(), (plain, noop, scoped, guarded), strict=True))
        affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        for proc, _ in servers.values():
            _pin(proc.pid, -1)
        _pin(0, 0)
        try:
            samples = interleave(
                {
                    name: partial(_sample, proc, port, requests, concurrency)
                    for name, (proc, port) in servers.items()
                },
                settings.repeats,
            )
        finally:
            if affinity is not None:
                os.sched_setaffinity(0, affinity)
    rates = [
        Measurement(CASE, variant, name, "req/s", [r for r, _ in s], higher_is_better=True)
        for name, s in samples.items()
    ]
    link(rates, "starlette (baseline)")
    group = rates
    base = rates[0].samples
    per_round = {m.impl: round(_round_ratio(m.samples, base), 3) for m in rates[1:]}
    print(f"  req/s, median of per-round ratios to the baseline: {per_round}")
    cpu_rounds = [c for _, c in samples[rates[0].impl]]
    if None not in cpu_rounds:
        cpu_ratio = {
            name: round(_round_ratio([c for _, c in s], cpu_rounds), 3)  # type: ignore[misc]
            for name, s in samples.items()
            if name != rates[0].impl
        }
        print(f"  server CPU per request, median of per-round ratios: {cpu_ratio}")
    ratio = per_round[rates[-1].impl]
    what = "guarded req/s / plain req/s (median of per-round ratios)"
    targets = [Target(CASE, variant, what, ratio, ">=", 0.95, extra={"per-round": per_round})]
    if all(c is not None for s in samples.values() for _, c in s):
        cpu_variant = f"{variant}: server CPU per request"
        cpu = [
            Measurement(CASE, cpu_variant, name, "s", [c for _, c in s if c is not None])
            for name, s in samples.items()
        ]
        link(cpu, "starlette (baseline)")
        group += cpu
    return group, targets
