"""Case 7: ASGI overhead, requests/s of a small Starlette app under uvicorn.

Both servers (the app alone, and wrapped in ``TaskGuardMiddleware``) run at
once on 127.0.0.1; the load client (fixed request count over a fixed number of
keep-alive connections) hits them in turns, so noise hits both. Target: the
guarded app ≥ 0.9x the plain app's requests/s.
"""

from __future__ import annotations

from ._core import Measurement, Settings, Target, interleave, link
from ._servers import asgi_available, load, uvicorn

CASE = "asgi"


def run(settings: Settings) -> tuple[list[Measurement], list[Target]]:
    why = asgi_available()
    if why is not None:
        print(f"  skipped: {why}")
        return [], []
    requests = 2_000 if settings.quick else 10_000
    concurrency = 16
    variant = f"{requests:,} GET / over {concurrency} connections"
    with uvicorn("make_plain") as (_, plain_port), uvicorn("make_guarded") as (_, guarded_port):
        samples = interleave(
            {
                "starlette (baseline)": lambda: load(plain_port, requests, concurrency),
                "starlette + TaskGuardMiddleware": lambda: load(
                    guarded_port, requests, concurrency
                ),
            },
            settings.repeats,
        )
    group = [
        Measurement(CASE, variant, k, "req/s", v, higher_is_better=True) for k, v in samples.items()
    ]
    link(group, "starlette (baseline)")
    ratio = group[1].ratio
    assert ratio is not None
    return group, [Target(CASE, variant, "guarded req/s / plain req/s", ratio, ">=", 0.9)]
