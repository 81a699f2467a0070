"""DBOS's workflow start rate on SQLite, for ``case_durable`` (run in DBOS's own venv).

    /tmp/dbos-venv/bin/python benchmarks/_dbos_start.py 30000

The same shape as taskguard's spawn case: 1,000 concurrent starters each
``await DBOS.start_workflow_async(wf, i)`` in a loop, on a fresh SQLite system
database; prints ``{"rate": starts per second}`` (starts returned, i.e. the
workflow's status row written).
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time

from dbos import DBOS, DBOSConfig

SPAWNERS = 1000


@DBOS.workflow()
async def wf(i: int) -> None:
    return None


async def main(n: int) -> float:
    each = max(1, n // SPAWNERS)

    async def one(base: int) -> None:
        for i in range(each):
            await DBOS.start_workflow_async(wf, base + i)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(s * each) for s in range(SPAWNERS)))
    return SPAWNERS * each / (time.perf_counter() - t0)


if __name__ == "__main__":
    db = f"sqlite:///{tempfile.mkdtemp(prefix='dbos-bench-')}/dbos.sqlite"
    config: DBOSConfig = {"name": "bench", "system_database_url": db, "log_level": "ERROR"}
    DBOS(config=config)
    DBOS.launch()
    try:
        rate = asyncio.run(main(int(sys.argv[1])))
    finally:
        DBOS.destroy(destroy_registry=True)
    print(json.dumps({"rate": rate}))
