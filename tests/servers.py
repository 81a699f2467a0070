"""Real ASGI servers for the tests: one command line per server, a free port, a log file.

``ServerProcess(kind, "module:app", tmp_path)`` starts the server the way a user
would, on 127.0.0.1, and waits until ``ready_path`` answers 200. Kinds:

- ``uvicorn``: ``uvicorn module:app``
- ``uvicorn-workers``: ``uvicorn --workers 2 module:app`` (a supervisor process
  and two worker processes sharing the listening socket)
- ``gunicorn``: ``gunicorn -k uvicorn_worker.UvicornWorker -w 2 module:app``
- ``hypercorn``: ``hypercorn --workers 0 module:app`` (asyncio, in-process)
- ``hypercorn-trio``: the same with ``-k trio``
- ``hypercorn-serve``: a script calling ``hypercorn.asyncio.serve(app, config,
  shutdown_trigger=app.guard.wait_for_intake_stop)``; ``app`` must be a
  ``TaskGuardMiddleware`` whose guard handles the signals itself
  (``handle_signals=True``), as docs/asgi.md says for ``serve()``

The app module is found on ``PYTHONPATH`` (the repository root and the test's
``tmp_path`` are on it), so a test can write its own app file next to its data.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("uvicorn", "uvicorn-workers", "gunicorn", "hypercorn", "hypercorn-trio", "hypercorn-serve")

SERVE_SCRIPT = """
import asyncio, importlib, sys
from hypercorn.asyncio import serve
from hypercorn.config import Config

module, _, name = sys.argv[1].partition(":")
app = getattr(importlib.import_module(module), name)
config = Config()
config.bind = [sys.argv[2]]
asyncio.run(serve(app, config, shutdown_trigger=app.guard.wait_for_intake_stop))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ctrl_c_as_in_a_terminal() -> None:
    """In the server process, give SIGINT its default action, as in a terminal.

    A shell starts background jobs with SIGINT ignored, and children inherit
    that: under a CI runner started in the background, Python would then leave
    SIGINT ignored, trio would install no Ctrl-C handler, and a SIGINT test
    would hang on the test environment, not on the server.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def require(kind: str) -> None:
    """Skip (or, with CI=true, fail) when the server of ``kind`` is not installed."""
    module = {"gunicorn": "uvicorn_worker", "uvicorn-workers": "uvicorn"}.get(
        kind, kind.split("-")[0]
    )
    try:
        __import__(module)
    except ImportError:
        why = f"{kind} needs the Python package {module!r} (the dev extra installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)


def require_program(name: str) -> str:
    """The path of an external program (haproxy, postgres, ...); skip or fail without it."""
    path = shutil.which(name)
    if path is None:
        why = f"{name!r} is not installed (.ci/run installs it on a fresh machine)"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    return path


def server_command(kind: str, app: str, port: int, extra: Sequence[str] = ()) -> list[str]:
    py = sys.executable
    host, bind = ["--host", "127.0.0.1", "--port", str(port)], f"127.0.0.1:{port}"
    commands = {
        "uvicorn": [py, "-m", "uvicorn", app, *host],
        "uvicorn-workers": [py, "-m", "uvicorn", app, *host, "--workers", "2"],
        "gunicorn": [py, "-m", "gunicorn", "-k", "uvicorn_worker.UvicornWorker", "-w", "2",
                     "-b", bind, app],
        "hypercorn": [py, "-m", "hypercorn", "--workers", "0", "-b", bind, app],
        "hypercorn-trio": [py, "-m", "hypercorn", "--workers", "0", "-k", "trio", "-b", bind, app],
        "hypercorn-serve": [py, "-c", SERVE_SCRIPT, app, bind],
    }  # fmt: skip
    return [*commands[kind], *extra]


class ServerProcess:
    """One real server process; its output goes to a log file in ``tmp``."""

    def __init__(
        self,
        kind: str,
        app: str,
        tmp: Path,
        *,
        env: Mapping[str, str] | None = None,
        ready_path: str | None = "/healthz/ready",
        extra: Sequence[str] = (),
        port: int | None = None,
    ) -> None:
        require(kind)
        self.kind = kind
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"{kind}-{self.port}.log"
        full_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("TASKGUARD_")},
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp)]),
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self._logfile = self.log.open("wb")
        self.proc = subprocess.Popen(
            server_command(kind, app, self.port, extra),
            cwd=tmp,
            env=full_env,
            stdout=self._logfile,
            stderr=subprocess.STDOUT,
            preexec_fn=ctrl_c_as_in_a_terminal,
            start_new_session=True,  # stop() ends the workers of multi-process kinds too
        )
        if ready_path is not None:
            self.wait_ready(ready_path)

    def wait_ready(self, path: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(self.url + path, timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"{self.kind} did not start:\n{self.output()}")

    def output(self) -> str:
        self._logfile.flush()
        return self.log.read_text(errors="replace")

    def send_signal(self, sig: int = signal.SIGTERM) -> float:
        """Send ``sig`` to the server (the supervisor, for multi-process kinds); when
        (taken just before: whatever a test saw earlier happened before the signal)."""
        sent = time.monotonic()
        self.proc.send_signal(sig)
        return sent

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.kind} still running:\n{self.output()}") from None

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self._logfile.close()


@contextmanager
def running_server(kind: str, app: str, tmp: Path, **options: object) -> Iterator[ServerProcess]:
    """A :class:`ServerProcess` that is killed at the end whatever happened."""
    server = ServerProcess(kind, app, tmp, **options)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()
