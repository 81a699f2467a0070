"""FastAPI's own test suite, plain and with every app wrapped in TaskGuardMiddleware.

    .venv/bin/python tests/conformance/run_fastapi.py [--workdir DIR] [-- -k EXPR]

FastAPI's ``TestClient`` is Starlette's, so the same wrapping applies (see
wrap_testclient.py). Its suite takes a few minutes per run. Tests that fail
in both runs alike (e.g. ones that start a server or a CLI in a subprocess)
are counted apart, not as differences. See _runner.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runner import Peer, main

FASTAPI = Peer(
    name="fastapi",
    test_dir="tests",
    # fastapi[all] without the CLI and servers, and the "tests" dependency group
    # (telemetry included: it wraps requests and background tasks too)
    test_deps=(
        "httpx2",
        "jinja2",
        "python-multipart",
        "itsdangerous",
        "pyyaml",
        "email-validator",
        "pydantic-extra-types",
        "opentelemetry-sdk",
        "dirty-equals",
        "inline-snapshot",
        "pyjwt",
        "pwdlib[argon2]",
        "sqlmodel",
        "flask",
        "a2wsgi",
        "opentelemetry-exporter-otlp-proto-http",
        "opentelemetry-instrumentation-fastapi",
        "logfire",
        "sentry-sdk",
        "strawberry-graphql",
        "typer",
        "pytest-xdist",  # registers the xdist_group marker the suite uses
    ),
    known={},
)

if __name__ == "__main__":
    sys.exit(main(FASTAPI))
