"""The SIGKILL soak of durable tasks: real processes acknowledging tasks, killed at random.

    python -m benchmarks.durable_soak --cycles 200                  # SQLite, one process
    python -m benchmarks.durable_soak --cycles 200 --procs 3 --journal postgresql://...

Each cycle picks a worker (``benchmarks/_durable_worker.py``), lets it acknowledge
durable tasks for a random moment, SIGKILLs it and starts a new one in its place
(with several workers, the live ones rescue the dead one's entries meanwhile).
At the end, non-spawning workers finish what is journaled. Checked:

- ``lost``: acknowledged keys whose effect never happened: must be 0;
- ``reruns`` (runs beyond the first per key) never more than ``rerun_bound``,
  the sum over kills of the entries journaled at that kill (the tasks in flight);
- ``duplicate_effects``: effects applied twice for one key: must be 0.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import anyio

from taskguard._journal import open_journal

ROOT = Path(__file__).resolve().parent.parent


def ack_of(line: str) -> str | None:
    """The key a worker's output line acknowledges, or None.

    Only a whole line counts: a SIGKILL can land in the middle of one (an
    unbuffered ``print`` writes each piece with its own ``write()``), and ``"ACK "``
    cut before its key once counted as an acknowledged key ``""`` that was lost.
    """
    if line.startswith("ACK ") and line.endswith("\n") and len(line) > 5:
        return line[4:-1]
    return None


class Worker:
    def __init__(
        self,
        args: argparse.Namespace,
        effects: Path,
        tag: str,
        spawn: bool,
        env: dict[str, str] | None = None,
    ) -> None:
        cmd = [
            sys.executable,
            "-m",
            "benchmarks._durable_worker",
            "--journal",
            args.journal,
            "--effects",
            str(effects),
            "--tag",
            tag,
            "--hold",
            str(args.hold),
            "--lease",
            str(args.lease),
        ]
        if not spawn:
            cmd.append("--no-spawn")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
        # each worker's log (retries, dead letters, rescue errors) is kept beside
        # the effects database: the first thing to read when a soak loses a task
        with open(effects.parent / f"{tag}.log", "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT, env=env
            )
        self.acked: list[str] = []
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            key = ack_of(line)
            if key is not None:
                self.acked.append(key)
            elif line.startswith("READY"):
                self.ready.set()

    def kill(self) -> None:
        self.end(signal.SIGKILL)

    def stop(self) -> int:
        return self.end(signal.SIGTERM)

    def end(self, sig: int) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(60)
        self._reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return rc


def journaled(url: str, dead: bool = False) -> int:
    """How many entries (or dead letters) the journal holds."""

    async def count() -> int:
        journal = open_journal(url)
        await journal.open(None, 30.0)
        try:
            if dead:
                return len(await journal.dead_letters(limit=10**9))
            return len(await journal.entries(limit=10**9))
        finally:
            await journal.close()

    return int(anyio.run(count))


def soak(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="taskguard-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.journal is None:
        args.journal = f"sqlite:///{work / 'journal.db'}"
    from benchmarks._durable_worker import init_effects

    effects = work / "effects.db"
    init_effects(str(effects))
    started = time.monotonic()
    workers = [Worker(args, effects, f"c0p{j}", True) for j in range(args.procs)]
    acked: list[str] = []
    rerun_bound = 0
    try:
        for cycle in range(1, args.cycles + 1):
            j = rng.randrange(len(workers))
            victim = workers[j]
            if not victim.ready.wait(60):
                raise RuntimeError(f"worker {j} did not start")
            time.sleep(rng.uniform(0.02, args.max_run))
            victim.kill()
            acked += victim.acked
            rerun_bound += journaled(args.journal)
            workers[j] = Worker(args, effects, f"c{cycle}p{j}", True)
            if args.verbose:
                print(f"cycle {cycle}: killed {j}, acked {len(acked)}", flush=True)
        for w in workers:
            w.ready.wait(60)
            w.kill()
            acked += w.acked
            rerun_bound += journaled(args.journal)
        finishers = [Worker(args, effects, "finish", False) for _ in range(args.procs)]
        deadline = time.monotonic() + 120
        while journaled(args.journal) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = journaled(args.journal)
        for w in finishers:
            w.stop()
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.kill()
    conn = sqlite3.connect(effects)
    runs = conn.execute("SELECT COUNT(*), COUNT(DISTINCT key) FROM runs").fetchone()
    effect_rows, effect_keys = conn.execute(
        "SELECT COUNT(*), COUNT(DISTINCT key) FROM effects"
    ).fetchone()
    done = {k for (k,) in conn.execute("SELECT key FROM effects")}
    conn.close()
    lost = sorted(set(acked) - done)
    return {
        "journal": args.journal.split("://")[0],
        "procs": args.procs,
        "cycles": args.cycles,
        "acked": len(acked),
        "ran_keys": runs[1],
        "runs": runs[0],
        "reruns": runs[0] - runs[1],
        "rerun_bound": rerun_bound,
        "lost": len(lost),
        "lost_keys": lost[:20],
        "duplicate_effects": effect_rows - effect_keys,
        "left_in_journal": left,
        "dead_letters": journaled(args.journal, dead=True),
        "elapsed_s": round(time.monotonic() - started, 1),
        "ok": not lost and runs[0] - runs[1] <= rerun_bound and effect_rows == effect_keys,
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.durable_soak", description=__doc__)
    parser.add_argument("--journal", help="journal URL (default: a SQLite file in --workdir)")
    parser.add_argument("--procs", type=int, default=1, help="workers running at once")
    parser.add_argument("--cycles", type=int, default=200, help="SIGKILLs")
    parser.add_argument("--max-run", type=float, default=0.5, help="longest a worker lives (s)")
    parser.add_argument("--hold", type=float, default=0.2, help="longest a task waits (s)")
    parser.add_argument("--lease", type=float, default=30.0, help="lease_timeout (s)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--workdir")
    parser.add_argument("--verbose", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    result = soak(parse(argv))
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
