"""pytest plugin of the wrapped conformance run: every app given to Starlette's
``TestClient`` (FastAPI's is the same class) runs inside ``TaskGuardMiddleware``.

The wrapping, and why it is faithful to how the middleware is used:

- The app is wrapped once per ``TestClient``, as a user wraps their app once.
- While a lifespan runs (``with TestClient(app):``), requests go through the
  middleware whose guard that lifespan entered, as under a server.
- A request with no lifespan running (a bare ``client.get()``: Starlette's
  test client runs the lifespan only inside ``with``) gets a fresh guard
  entered around it (``async with TaskGuard():``). Otherwise the guard would
  be idle and the middleware would pass the request through unguarded, which
  would test nothing. The guard's exit waits for what the request spawned and
  re-raises what the app raised.
- Attribute reads on the wrapper fall through to the app, so tests that read
  attributes of ``client.app`` see the app's.
- ``signals="off"``: the test client runs the app in a worker thread, where
  no signal handler can be installed; the tests send no signals.
"""

from __future__ import annotations

from typing import Any

import starlette.testclient as testclient

from taskguard import TaskGuard
from taskguard.asgi import TaskGuardMiddleware


class Guarded:
    """An ASGI app wrapped in TaskGuardMiddleware as described above."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.middleware = TaskGuardMiddleware(app, signals="off")
        self.lifespans = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.app, name)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            self.lifespans += 1
            try:
                await self.middleware(scope, receive, send)
            finally:
                self.lifespans -= 1
        elif self.lifespans:
            await self.middleware(scope, receive, send)
        else:
            guard = TaskGuard()
            async with guard:
                await TaskGuardMiddleware(self.app, guard, signals="off")(scope, receive, send)


_original_init = testclient.TestClient.__init__


def _init(self: testclient.TestClient, app: Any, *args: Any, **kwargs: Any) -> None:
    if not testclient._is_asgi3(app):  # the client adapts ASGI 2 apps; adapt first
        app = testclient._WrapASGI2(app)
    _original_init(self, Guarded(app), *args, **kwargs)


testclient.TestClient.__init__ = _init  # type: ignore[method-assign]
