"""A worker process of the durable soak (``benchmarks/durable_soak.py``).

It acknowledges durable tasks as fast as it can pace them, printing
``ACK <key>`` once ``spawn`` has returned (the entry is committed), until it is
killed. Each task waits a little, then applies its effect in the effects
database: a run is always recorded (``runs``), the effect itself only once per
key (``effects``, checked and written in one transaction: the task uses its key).
With ``--no-spawn`` it only resumes and rescues, until SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import sys

import anyio
import anyio.to_thread

import taskguard
from taskguard import TaskGuard, durable_context

EFFECTS = ""


def init_effects(path: str) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE IF NOT EXISTS runs (key TEXT NOT NULL, pid INTEGER NOT NULL)")
    conn.execute("CREATE TABLE IF NOT EXISTS effects (key TEXT NOT NULL)")
    conn.commit()
    conn.close()


def _apply_effect(key: str) -> None:
    conn = sqlite3.connect(EFFECTS, timeout=60, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO runs (key, pid) VALUES (?, ?)", (key, os.getpid()))
        if conn.execute("SELECT 1 FROM effects WHERE key = ?", (key,)).fetchone() is None:
            conn.execute("INSERT INTO effects (key) VALUES (?)", (key,))
        conn.execute("COMMIT")
    finally:
        conn.close()


@taskguard.durable(name="soak.work")
async def work(n: int, hold: float) -> None:
    if os.environ.get("SOAK_STALL"):  # this process never finishes a task (the rescue test)
        await anyio.sleep_forever()
    await anyio.sleep(hold)
    key = durable_context().key
    assert key is not None
    await anyio.to_thread.run_sync(_apply_effect, key)


async def main(args: argparse.Namespace) -> None:
    guard = TaskGuard(
        journal=args.journal, lease_timeout=args.lease, exit_wait_timeout=5, handle_signals=True
    )
    async with guard:
        print("READY", os.getpid(), flush=True)
        i = 0
        while args.spawn and guard.ready:
            key = f"{args.tag}-{i}"
            await work.spawn(i, random.uniform(0, args.hold), key=key)
            # one write() per line: a kill cannot cut it between "ACK" and the key
            sys.stdout.write(f"ACK {key}\n")
            sys.stdout.flush()
            i += 1
            await anyio.sleep(random.uniform(0, args.pace))
        await guard.wait_for_shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--journal", required=True)
    parser.add_argument("--effects", required=True)
    parser.add_argument("--tag", default="w")
    parser.add_argument("--hold", type=float, default=0.2)
    parser.add_argument("--pace", type=float, default=0.01)
    parser.add_argument("--lease", type=float, default=30.0)
    parser.add_argument("--no-spawn", dest="spawn", action="store_false")
    parsed = parser.parse_args()
    EFFECTS = parsed.effects
    anyio.run(main, parsed)
    sys.exit(0)
