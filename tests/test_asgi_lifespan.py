"""The ASGI lifespan and exit signals through TaskGuardMiddleware.

Lifespan failures reach the server (here Starlette's TestClient, as in
Starlette's own test suite) exactly as without the middleware; an app without
lifespan support leaves the server free to run without one (real uvicorn); a
wrapped app lives through any number of lifespans, and a request outside any
lifespan is served unguarded, before the first as after the last.

Under every covered server (real processes, real signals, tests/servers.py),
intake stays open from SIGTERM until ``drain_delay`` has passed: readiness
answers 503, every other request is served, fresh connections included.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import signal
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from servers import running_server
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, Router

import taskguard
from taskguard.asgi import TaskGuardMiddleware

with warnings.catch_warnings():
    # Starlette 1.10 asks for httpx2 and warns when its TestClient runs on httpx.
    warnings.simplefilter("ignore", UserWarning)
    from starlette.testclient import TestClient


# pytest.raises keeps the failure's traceback for the test's report; its frames
# (the test's, TestClient's, the lifespan's) hold the middleware. Outside pytest the
# same sequence frees the guard: test_a_failed_lifespan_keeps_nothing checks it.
KEPT_BY_PYTEST_RAISES = pytest.mark.no_leak_check(
    reason="pytest.raises holds the lifespan failure's traceback; see "
    "test_a_failed_lifespan_keeps_nothing"
)


def _within(seconds: float, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it takes longer."""
    result: list[Any] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"hung: still running after {seconds}s"
    if error:
        raise error[0]
    return result[0] if result else None


def _enter_and_leave(app: Any) -> None:
    with TestClient(app):
        pass


# -- failures reach the server as without the middleware (Starlette's own tests) ----


def fail_startup() -> None:
    raise RuntimeError("Startup error")


@KEPT_BY_PYTEST_RAISES
def test_an_error_on_startup_is_raised_by_the_test_client() -> None:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        fail_startup()  # a call, not a raise: the yield stays reachable for mypy
        yield

    mw = TaskGuardMiddleware(Starlette(lifespan=lifespan), signals="off")
    with pytest.raises(RuntimeError, match="Startup error"):
        _within(10, lambda: _enter_and_leave(mw))
    assert mw.guard.state is taskguard.State.CLOSED


def test_an_error_on_shutdown_is_raised_by_the_test_client() -> None:
    @contextlib.asynccontextmanager
    async def lifespan(app: Router) -> AsyncIterator[None]:
        yield
        raise RuntimeError("Shutdown failed")

    mw = TaskGuardMiddleware(Router(lifespan=lifespan), signals="off")
    with pytest.raises(RuntimeError, match="Shutdown failed"):
        _within(10, lambda: _enter_and_leave(mw))
    assert mw.guard.report.clean  # the guard itself shut down fine, before the app's shutdown


def test_an_exception_in_a_middleware_is_raised_by_the_test_client() -> None:
    """A middleware (or any app) that raises on the lifespan scope without a word."""

    class MiddlewareException(Exception):
        pass

    class BrokenMiddleware:
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            raise MiddlewareException()

    mw = TaskGuardMiddleware(Starlette(middleware=[Middleware(BrokenMiddleware)]), signals="off")
    with pytest.raises(MiddlewareException):
        _within(10, lambda: _enter_and_leave(mw))


@KEPT_BY_PYTEST_RAISES
def test_a_lifespan_that_crashes_after_startup_raises_at_shutdown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without the middleware the server gets the exception from the app's call
    (and sends no shutdown); with it, the server gets the same exception once
    the guard is closed, instead of a made-up ``lifespan.shutdown.failed``."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "lifespan"
        await receive()
        await send({"type": "lifespan.startup.complete"})
        raise LookupError("lifespan crashed")

    mw = TaskGuardMiddleware(app, signals="off")
    with caplog.at_level(logging.WARNING, "taskguard"), pytest.raises(LookupError):
        _within(10, lambda: _enter_and_leave(mw))
    assert mw.guard.report.clean


FREED_SCRIPT = """
import contextlib, gc, sys, warnings, weakref
warnings.simplefilter("ignore")
from starlette.applications import Starlette
from starlette.testclient import TestClient
from taskguard.asgi import TaskGuardMiddleware

async def crash_after_startup(scope, receive, send):
    await receive()
    await send({"type": "lifespan.startup.complete"})
    raise LookupError("lifespan crashed")

@contextlib.asynccontextmanager
async def fails_on_startup(app):
    raise RuntimeError("Startup error")
    yield

def once(app):
    mw = TaskGuardMiddleware(app, signals="off")
    try:
        with TestClient(mw):
            pass
    except (RuntimeError, LookupError):
        pass
    else:
        sys.exit("no failure reached the test client")
    return weakref.ref(mw.guard)

refs = [once(Starlette(lifespan=fails_on_startup)), once(crash_after_startup)]
gc.collect()
print("alive:", sum(ref() is not None for ref in refs))
"""


def test_a_failed_lifespan_keeps_nothing(tmp_path: Path) -> None:
    """A lifespan that fails at startup or crashes after it: once the server has
    the failure, nothing holds the guard (its own process: no pytest frames)."""
    import subprocess
    import sys

    script = tmp_path / "freed.py"
    script.write_text(FREED_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "alive: 0", done.stdout + done.stderr


# -- an app without lifespan support, under a real server ----------------------------

DJANGO_LIKE = """
import taskguard
from taskguard.asgi import TaskGuardMiddleware


async def django_like(scope, receive, send):
    # as Django's ASGIHandler does
    if scope["type"] != "http":
        raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


app = TaskGuardMiddleware(django_like, taskguard.TaskGuard(exit_wait_timeout=5))


class NoLifespan:  # the recipe of docs/asgi.md: a lifespan that does nothing
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)
        while True:
            kind = (await receive())["type"]
            await send({"type": kind + ".complete"})
            if kind == "lifespan.shutdown":
                return


guarded = TaskGuardMiddleware(
    NoLifespan(django_like),
    taskguard.TaskGuard(exit_wait_timeout=5),
    readiness_path="/healthz/ready",
)
"""


@pytest.mark.slow
def test_an_app_without_lifespan_support_exits_on_sigterm_as_it_does_plain(
    tmp_path: Path,
) -> None:
    """uvicorn treats the lifespan as unsupported and exits at SIGTERM, with the
    middleware as without it (it used to wait for the app's shutdown forever)."""
    (tmp_path / "django_like.py").write_text(DJANGO_LIKE)
    statuses = {}
    for name in ("django_like:django_like", "django_like:app"):
        with running_server("uvicorn", name, tmp_path, ready_path="/") as server:
            assert httpx.get(server.url + "/", timeout=5).text == "ok"
            server.send_signal(signal.SIGTERM)
            statuses[name] = server.wait_exit(timeout=10)
            assert "ASGI 'lifespan' protocol appears unsupported." in server.output()
    assert statuses["django_like:app"] == statuses["django_like:django_like"] == -signal.SIGTERM


@pytest.mark.slow
def test_an_app_without_lifespan_support_is_guarded_with_a_stub_lifespan(tmp_path: Path) -> None:
    """The docs' recipe: a do-nothing lifespan in front of the app lets the
    middleware run its guard (readiness answers 200 only while the guard runs),
    and SIGTERM still ends the process."""
    (tmp_path / "django_like.py").write_text(DJANGO_LIKE)
    with running_server("uvicorn", "django_like:guarded", tmp_path) as server:  # ready: 200
        assert httpx.get(server.url + "/", timeout=5).text == "ok"
        server.send_signal(signal.SIGTERM)
        assert server.wait_exit(timeout=10) == -signal.SIGTERM
        log = server.output()
    assert "unsupported" not in log


# -- one wrapped app, several lifespans ----------------------------------------------


def _counting_app(done: list[str]) -> Starlette:
    async def job(name: str) -> None:
        await anyio.sleep(0.05)
        done.append(name)

    async def spawn(request: Request) -> PlainTextResponse:
        try:
            taskguard.spawn(job, request.query_params["name"])
        except taskguard.TaskGuardError as exc:
            return PlainTextResponse(type(exc).__name__)
        return PlainTextResponse("spawned")

    return Starlette(routes=[Route("/spawn", spawn)])


def test_a_wrapped_app_lives_through_several_lifespans() -> None:
    """A module-level app used by two ``with TestClient(app)`` blocks (pytest
    runs tests that way): each lifespan runs the guard once more, and each
    drains its own work."""
    done: list[str] = []
    mw = TaskGuardMiddleware(_counting_app(done), signals="off")

    def two_lifespans() -> list[taskguard.ShutdownReport]:
        reports = []
        for run in ("first", "second"):
            with TestClient(mw) as client:
                assert client.get("/spawn", params={"name": run}).text == "spawned"
            reports.append(mw.guard.report)
        return reports

    first, second = _within(20, two_lifespans)
    assert done == ["first", "second"]
    assert first is not second
    assert first.groups["default"].completed == second.groups["default"].completed == 1


def test_a_request_outside_any_lifespan_is_served_unguarded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before the first lifespan, between two and after the last, a request is
    passed to the app unguarded (with one warning), as when the server does not
    run the lifespan at all: not a 503 that depends on which test ran first."""
    done: list[str] = []
    mw = TaskGuardMiddleware(_counting_app(done), signals="off")
    client = TestClient(mw)  # used without `with`: no lifespan

    def scenario() -> list[str]:
        seen = [client.get("/spawn", params={"name": "before"}).text]
        with TestClient(mw) as in_lifespan:
            seen.append(in_lifespan.get("/spawn", params={"name": "during"}).text)
        seen.append(client.get("/spawn", params={"name": "after"}).text)
        return seen

    with caplog.at_level(logging.WARNING, "taskguard"):
        seen = _within(20, scenario)
    # outside a lifespan the app runs; its spawn() finds no running guard
    assert seen == ["NoGuardError", "spawned", "NoGuardError"]
    assert done == ["during"]
    warnings = [r for r in caplog.records if "not running" in r.getMessage()]
    assert len(warnings) == 1


# -- intake stays open through drain_delay, under every covered server ----------------

INTAKE_APP = """
import os
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
import taskguard
from taskguard.asgi import TaskGuardMiddleware


async def hello(request):
    return PlainTextResponse(f"hello from {os.getpid()}")


guard = taskguard.TaskGuard(
    drain_delay=float(os.environ["APP_DRAIN_DELAY"]),
    exit_wait_timeout=float(os.environ["APP_EXIT_WAIT"]),
    handle_signals=os.environ.get("APP_GUARD_SIGNALS") == "1",
)
app = TaskGuardMiddleware(
    Starlette(routes=[Route("/hello", hello)]), guard, readiness_path="/healthz/ready"
)
"""

INTAKE_EXIT_STATUS = {
    "uvicorn": -signal.SIGTERM,
    "uvicorn-workers": 0,
    "gunicorn": 0,
    "hypercorn": 0,
    "hypercorn-trio": -signal.SIGTERM,
    "hypercorn-serve": 0,
}


def _probe_fresh_connections(
    url: str, stop: threading.Event, seen: list[tuple[float, str, str]]
) -> None:
    """Every 100 ms a request on a fresh connection, alternately the app and the
    readiness route, into ``seen``: (when sent, path, status code or error name)."""
    paths = ["/hello", "/healthz/ready"]
    no_reuse = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=url, timeout=3, limits=no_reuse) as client:
        while not stop.is_set():
            path = paths[len(seen) % 2]
            sent = time.monotonic()
            try:
                response = client.get(path)
                seen.append((sent, path, str(response.status_code)))
            except httpx.TransportError as exc:
                seen.append((sent, path, type(exc).__name__))
            stop.wait(max(0.0, sent + 0.1 - time.monotonic()))


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(INTAKE_EXIT_STATUS))
def test_intake_stays_open_through_the_drain_delay(kind: str, tmp_path: Path) -> None:
    """From SIGTERM until drain_delay has passed, readiness answers 503 and
    every other request, on a fresh connection each, is served; only then does
    the server stop accepting, and it exits soon after (nothing is in flight)."""
    drain_delay, exit_wait = 2.0, 6.0
    (tmp_path / "intake_app.py").write_text(INTAKE_APP)
    env = {"APP_DRAIN_DELAY": str(drain_delay), "APP_EXIT_WAIT": str(exit_wait)}
    if kind == "hypercorn-serve":
        env["APP_GUARD_SIGNALS"] = "1"
    with running_server(kind, "intake_app:app", tmp_path, env=env) as server:
        stop = threading.Event()
        seen: list[tuple[float, str, str]] = []
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            probing = pool.submit(_probe_fresh_connections, server.url, stop, seen)
            deadline = time.monotonic() + 10
            while len(seen) < 4:  # probing runs
                assert time.monotonic() < deadline, "the probes did not start"
                time.sleep(0.05)
            signalled = server.send_signal(signal.SIGTERM)
            try:
                status = server.wait_exit(timeout=exit_wait + 5)
            finally:
                exited = time.monotonic()
                stop.set()
            probing.result(timeout=10)
        log = server.output()
    before = [s for t, _, s in seen if t < signalled]
    # sent during the delay, less a margin at its end for the request to reach the
    # server (the workers of a supervisor get the signal a little later: no harm)
    during = [
        (t - signalled, p, s) for t, p, s in seen if signalled <= t < signalled + drain_delay - 0.3
    ]
    served = [s for _, p, s in during if p == "/hello"]
    ready = [s for t, p, s in during if p == "/healthz/ready" and t > 1.0]
    print(
        f"{kind}: before {before.count('200')}/{len(before)} ok; during the delay /hello "
        f"{served.count('200')}/{len(served)} served, readiness "
        f"{[(round(t, 2), s) for t, p, s in during if p == '/healthz/ready']}; after: "
        f"{sorted({s for t, _, s in seen if t >= signalled + drain_delay})}; exit "
        f"{exited - signalled:.2f}s after SIGTERM, status {status}"
    )
    failures = [(round(t - signalled, 2), p, s) for t, p, s in seen if not s.isdigit()]
    assert before, log
    assert set(before) == {"200"}, (failures, log)
    assert len(served) >= 5, (during, log)
    assert set(served) == {"200"}, (during, log)
    assert ready, (during, log)
    assert set(ready) == {"503"}, (during, log)
    assert drain_delay - 0.5 < exited - signalled < exit_wait + 2.0, log
    assert status == INTAKE_EXIT_STATUS[kind], log


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["uvicorn", "hypercorn", "hypercorn-trio"])
def test_a_second_signal_cuts_the_drain_delay_short(kind: str, tmp_path: Path) -> None:
    """A second SIGTERM forces the shutdown: the server is told to stop at once,
    without waiting out the rest of the drain delay."""
    drain_delay, exit_wait = 20.0, 25.0
    (tmp_path / "intake_app.py").write_text(INTAKE_APP)
    env = {"APP_DRAIN_DELAY": str(drain_delay), "APP_EXIT_WAIT": str(exit_wait)}
    with running_server(kind, "intake_app:app", tmp_path, env=env) as server:
        signalled = server.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while httpx.get(server.url + "/healthz/ready", timeout=2).status_code != 503:
            assert time.monotonic() < deadline, "readiness did not turn 503"
            time.sleep(0.05)
        assert httpx.get(server.url + "/hello", timeout=2).status_code == 200
        server.send_signal(signal.SIGTERM)
        status = server.wait_exit(timeout=10)
        exited = time.monotonic() - signalled
        print(f"{kind}: exit {exited:.2f}s after the first SIGTERM, status {status}")
        assert exited < drain_delay - 5, server.output()
        assert status == INTAKE_EXIT_STATUS[kind], server.output()


@pytest.mark.parametrize("app_kind", ["starlette", "bare"])
def test_hypercorn_cancelling_the_lifespan_after_shutdown_complete_is_a_clean_end(
    app_kind: str,
) -> None:
    """hypercorn's asyncio worker cancels the lifespan task as soon as it has
    ``lifespan.shutdown.complete`` and awaits it: a plain app has returned by
    then, so must the middleware (it used to wait for the app after forwarding
    the message, and the worker raised that CancelledError on Python 3.12)."""
    import asyncio

    from hypercorn.app_wrappers import ASGIWrapper
    from hypercorn.asyncio.lifespan import Lifespan as HypercornLifespan
    from hypercorn.config import Config

    async def bare(scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "lifespan"
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await send({"type": "lifespan.shutdown.complete"})

    app: Any = Starlette() if app_kind == "starlette" else bare
    mw = TaskGuardMiddleware(app, signals="off")

    async def serve() -> None:  # worker_serve's lifespan steps, in its order
        loop = asyncio.get_running_loop()
        lifespan = HypercornLifespan(ASGIWrapper(mw), Config(), loop, {})  # type: ignore[arg-type]
        task = loop.create_task(lifespan.handle_lifespan())
        await lifespan.wait_for_startup()
        await asyncio.sleep(0.01)
        await lifespan.wait_for_shutdown()
        task.cancel()
        await task

    for _ in range(20):  # the race is lost at once on 3.12; a few rounds elsewhere
        asyncio.run(serve())
        assert mw.guard.report.clean


def test_a_lifespan_that_goes_on_after_its_shutdown_reply_is_cancelled_after_cancel_grace(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The server hears the shutdown reply once the app's call has returned; one
    that does not return is cancelled after ``cancel_grace`` rather than keeping
    the server's shutdown waiting (Starlette's TestClient waits for the app)."""

    async def lingering(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await send({"type": "lifespan.shutdown.complete"})
        await anyio.sleep_forever()

    mw = TaskGuardMiddleware(
        lingering, config=taskguard.GuardConfig(cancel_grace=0.2), signals="off"
    )
    started = time.monotonic()
    _within(10, lambda: _enter_and_leave(mw))
    assert time.monotonic() - started < 5
    assert "did not return within cancel_grace (0.2s)" in caplog.text
