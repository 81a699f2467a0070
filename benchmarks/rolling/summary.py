"""What a run's raw outcomes add up to: the counts, the latencies, the restart timeline.

A *failed request* is a plain request, a signup, a stream or a websocket that
got no proper answer: a 5xx (from HAProxy or the app), a connection error, a
timeout. A *broken stream* is one whose body ended without a final event
(``end``, or ``shutdown`` with the resume point). A *lost job* is an
acknowledged (202) signup whose job wrote no row by the end. Failures are
also placed on the restart timeline (seconds after the latest SIGTERM) and
explained by HAProxy's own log (status and termination state per request).
"""

from __future__ import annotations

import bisect
from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from benchmarks.rolling.harness import Settings
    from benchmarks.rolling.lb import Haproxy

#: websocket outcomes that are not failures of any kind
_WS_FINE = {"closed", "stopped"}
#: stream and websocket outcomes that are a failed request (no stream at all)
_OPEN_FAILED_PREFIXES = ("http ", "no response", "open failed")
#: per restart, seconds after SIGTERM: HAProxy took it out, it exited, the
#: replacement answered ready, HAProxy had the replacement up
_PHASES = ("down_after", "exit_after", "ready_after", "up_after")


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    values = sorted(values)

    def at(q: float) -> float:
        return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 1)

    return {"n": len(values), "p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": at(1.0)}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _spread(values: list[float | None]) -> dict[str, float | None] | None:
    """min, median, max (seconds) of what was seen; None where HAProxy never saw a change."""
    seen = sorted(v for v in values if v is not None)
    if not seen:
        return None
    return {
        "min": _round(seen[0]),
        "median": _round(seen[len(seen) // 2]),
        "max": _round(seen[-1]),
        "missing": len(values) - len(seen),
    }


def _failed_open(outcome: str) -> bool:
    return outcome.startswith(_OPEN_FAILED_PREFIXES)


def _bin(offset: float) -> str:
    low = int(offset * 2) / 2
    return f"{low:.1f}-{low + 0.5:.1f}"


def _lb_failures(lb: Haproxy, timeline: list[dict[str, Any]]) -> dict[str, Any]:
    """HAProxy's view of the failures: status and termination state, and when they
    reached HAProxy, in seconds after the SIGTERM of the backend they were sent to."""
    by_kind: Counter[str] = Counter()
    after_sigterm: Counter[str] = Counter()
    in_pool = 0
    lb_requests = lb.requests()
    for accepted, status, term, server, _retries, _ms, _method, _uri in lb_requests:
        if status == 101 or not (status >= 500 or status < 0 or term[0] in "SsPRIDLK"):
            continue  # fine, a client's own abort, or a websocket (counted by the client)
        by_kind[f"{status} {term}"] += 1
        steps = [st for st in timeline if f"s{st['slot']}" == server and st["t_term"] <= accepted]
        if steps:
            step = steps[-1]
            after_sigterm[_bin(accepted - step["t_term"])] += 1
            down = step["down_after"]
            in_pool += down is None or accepted < step["t_term"] + down
    return {
        "requests": len(lb_requests),
        "retried": sum(1 for r in lb_requests if r[4] > 0),
        "failures_by_status_and_termination": dict(by_kind.most_common()),
        "failures_s_after_sigterm": dict(sorted(after_sigterm.items())),
        "failures_sent_while_in_pool": in_pool,
    }


def summarize(
    result: dict[str, Any],
    done: set[str],
    timeline: list[dict[str, Any]],
    lb: Haproxy,
    settings: Settings,
    t0: float,
    elapsed: float,
) -> dict[str, Any]:
    """The figures of one run (JSON-ready)."""
    terms = [step["t_term"] for step in timeline]
    windows = [(step["t_term"], step["t_up"]) for step in timeline]

    def since_sigterm(t: float) -> float | None:
        i = bisect.bisect_right(terms, t)
        return None if i == 0 else round(t - terms[i - 1], 2)

    failures: Counter[str] = Counter()
    latency: dict[str, list[float]] = {"steady": [], "restart": []}
    requests = result["requests"]
    for kind, start, seconds, outcome, _detail in requests:
        if outcome != "ok":
            failures[f"{kind}: {outcome}"] += 1
        elif kind == "plain":
            restarting = any(a <= start <= b for a, b in windows)
            latency["restart" if restarting else "steady"].append(seconds)

    streams = Counter(outcome for *_, outcome, _detail in result["streams"])
    broken = []
    for _n, start, seconds, outcome, detail in result["streams"]:
        if _failed_open(outcome):
            failures[f"stream: {outcome}"] += 1
        elif outcome == "broken":
            broken.append((since_sigterm(start + seconds), detail))
    websockets = Counter(
        f"{outcome} ({detail})" if outcome in ("closed", "broken") else outcome
        for *_, outcome, detail in result["websockets"]
    )
    ws_broken = 0
    for *_, outcome, _detail in result["websockets"]:
        if _failed_open(outcome):
            failures[f"websocket: {outcome}"] += 1
        elif outcome not in _WS_FINE:
            ws_broken += 1

    acked = set(result["acked"])
    return {
        "elapsed_s": round(elapsed, 1),
        "failed_requests": sum(failures.values()),
        "broken_streams": len(broken),
        "lost_jobs": len(acked - done),
        "broken_websockets": ws_broken,
        "requests": {
            "total": len(requests) + len(result["streams"]) + len(result["websockets"]),
            "plain": sum(1 for r in requests if r[0] == "plain"),
            "signups": sum(1 for r in requests if r[0] == "signup"),
            "failures": dict(failures.most_common()),
        },
        "streams": {
            "segments": sum(streams.values()),
            "outcomes": dict(streams.most_common()),
            "broken_s_after_sigterm": broken[:50],
            "gaps": result["stream_gaps"],
        },
        "websockets": {"connections": sum(websockets.values()), "outcomes": dict(websockets)},
        "jobs": {
            "acknowledged": len(acked),
            "written": len(acked & done),
            "lost": len(acked - done),
        },
        "haproxy": _lb_failures(lb, timeline),
        "latency": {phase: _percentiles(values) for phase, values in latency.items()},
        # how late the load generator started requests (a busy machine): should be small
        "client_lag": _percentiles(result["lag"])
        | {"overloaded": result["overloaded"], "cpu_s": round(result["cpu_s"], 1)},
        "restarts": [
            {
                "rollout": step["rollout"],
                "slot": step["slot"],
                "at_s": round(step["t_term"] - t0, 2),
                "exit_code": step["exit_code"],
                "killed": step["killed"],
                **{k: _round(step[k]) for k in _PHASES},
            }
            for step in timeline
        ],
        "restart_s": {k: _spread([step[k] for step in timeline]) for k in _PHASES},
        # HAProxy took every draining backend out before drain_delay ended
        "down_within_drain_delay": all(
            step["down_after"] is not None and step["down_after"] < settings.drain_delay
            for step in timeline
        ),
        "t0_monotonic": t0,  # the logs' times (haproxy.log, load.json) are monotonic
    }
