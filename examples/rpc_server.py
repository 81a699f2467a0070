"""The example gRPC ``Jobs`` server, with taskguard (run it, then send it SIGTERM).

    python examples/rpc_server.py --data-dir /tmp/jobs            # prints PORT <n>
    python examples/rpc_server.py --data-dir /tmp/jobs --port 50051
    python examples/rpc_server.py --data-dir /tmp/jobs --plain    # the usual way, to compare

The implementation lives in ``taskguard/_example_rpc.py`` so that ``taskguard
demo`` can run it from an installed package; read it there. In short::

    async def main(guard):
        audit = await guard.enter_async_context(AuditServer(store))   # closed after the drain
        channel = await guard.enter_async_context(grpc.aio.insecure_channel(...))
        jobs = Jobs(lambda coro, group: guard.spawn(coro, group=group), channel, "taskguard")
        server = grpc.aio.server(interceptors=[GuardInterceptor(guard, send_timeout=5)])
        server.add_generic_rpc_handlers([jobs.handler()])
        server.add_insecure_port("127.0.0.1:0")
        await serve(server, guard)            # stops intake first, drains, returns when done

    taskguard.run(main, config=GuardConfig(
        exit_wait_timeout=10,
        groups={"jobs": GroupConfig(on_shutdown="drain"),
                "metrics": GroupConfig(on_shutdown="cancel")}))
"""

from __future__ import annotations

import sys

from taskguard._example_rpc import main

if __name__ == "__main__":
    sys.exit(main())
