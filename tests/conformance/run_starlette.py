"""Starlette's own test suite, plain and with every app wrapped in TaskGuardMiddleware.

    .venv/bin/python tests/conformance/run_starlette.py [--workdir DIR] [-- -k EXPR]

Takes a few minutes the first time (it makes a virtual environment under
~/.cache/taskguard-conformance), about a minute after. Exit status 1 when a
test passes plain and fails wrapped (or the other way round) and is not listed
below as an artifact of the wrapping. See _runner.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runner import Peer, main

STARLETTE = Peer(
    name="starlette",
    test_dir="tests",
    # starlette[full] without its httpx pin, and the test modules' own imports
    test_deps=(
        "httpx2",
        "itsdangerous",
        "jinja2",
        "python-multipart",
        "pyyaml",
        "opentelemetry-api",
        "opentelemetry-sdk",
        "importlib-metadata",
    ),
    known={},
)

if __name__ == "__main__":
    sys.exit(main(STARLETTE))
