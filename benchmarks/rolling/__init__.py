"""The rolling-restart benchmark (issue 14): zero-downtime deploys behind HAProxy.

    python -m benchmarks.rolling                       # 3 servers x bare/taskguard, 3 rollouts
    python -m benchmarks.rolling --servers uvicorn --apps taskguard --rollouts 1

See ``python -m benchmarks.rolling --help`` and docs/benchmarks.md. Modules:
``app`` (the app under test), ``load`` (the load generator, its own process),
``lb`` (HAProxy), ``harness`` (one run), ``summary`` (its figures).
"""

#: the app under test, without and with taskguard (``ROLLING_APP``)
VARIANTS = ("bare", "taskguard")
