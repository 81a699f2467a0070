"""A client of the example ``Jobs`` server (``examples/rpc_server.py``).

    python examples/rpc_client.py 127.0.0.1:50051 submit --jobs 3 --seconds 2
    python examples/rpc_client.py 127.0.0.1:50051 watch --count 100
    python examples/rpc_client.py 127.0.0.1:50051 watch --count 100 --resume

With ``--resume``, when the server ends the stream with UNAVAILABLE (it got
SIGTERM), the client waits for the server to be back on the same address (run
the server with a fixed ``--port``) and continues from the resume point that
taskguard put in the trailing metadata (``taskguard-sent``): no message lost,
none repeated. The implementation is ``taskguard/_example_client.py``.
"""

from __future__ import annotations

import sys

from taskguard._example_client import main

if __name__ == "__main__":
    sys.exit(main())
