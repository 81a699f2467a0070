"""Soak: a real server, real clients, SIGTERM at a random moment, restart; 50 times.

tests/soak_app.py acknowledges a job only after it spawned it into a drain
group; the job's side effect is a row in SQLite. Clients submit jobs over TCP
on 127.0.0.1 without pause; the process gets SIGTERM at a random moment and is
restarted, alternating asyncio and trio. At the end, every acknowledged job
has exactly one row, no job has two, and every process exited 0 (a clean
report: nothing cut, nothing stuck).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import sqlite3
import sys
import threading
import time
from pathlib import Path

import pytest
from children import Child
from helpers_reliability import REPO

ITERATIONS = 50
CLIENTS = 3
APP = Path(__file__).with_name("soak_app.py")


def _client(port: int, ids: list[int], acked: list[int], refused: list[int]) -> None:
    """Submit jobs one by one until the server goes away; record what it acknowledged."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            reader = sock.makefile("rb")
            for job_id in ids:
                sock.sendall(f"JOB {job_id}\n".encode())
                line = reader.readline()
                if not line:
                    return  # closed before answering: not acknowledged
                word, answered = line.decode().split()
                assert int(answered) == job_id
                (acked if word == "ACK" else refused).append(job_id)
    except OSError:
        return  # refused, reset or timed out: whatever was not acknowledged does not count


def _start(db: Path, backend: str, err: Path) -> Child:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env = {k: v for k, v in env.items() if not k.startswith("TASKGUARD_")}
    return Child([sys.executable, str(APP), str(db), backend], env=env, stderr=err)


@pytest.mark.slow
def test_soak_sigterm_at_random_moments(tmp_path: Path) -> None:
    rng = random.Random(os.environ.get("SOAK_SEED", "7"))
    db = tmp_path / "soak.db"
    err = tmp_path / "stderr.log"
    acked: list[int] = []
    refused: list[int] = []
    submitted: set[int] = set()
    next_id = 0
    exit_codes: list[int] = []
    started = time.monotonic()
    for iteration in range(ITERATIONS):
        backend = ("asyncio", "trio")[iteration % 2]
        with _start(db, backend, err) as proc:
            port = int(proc.wait_line("PORT ", timeout=30).split()[1])
            threads = []
            for _ in range(CLIENTS):
                ids = list(range(next_id, next_id + 10_000))
                next_id += 10_000
                thread = threading.Thread(target=_client, args=(port, ids, acked, refused))
                threads.append(thread)
                thread.start()
            time.sleep(rng.uniform(0.0, 0.4))
            before = len(acked)
            proc.signal(signal.SIGTERM)
            rc = proc.wait(5 + 1 + 2 + 10)  # exit wait + cancel grace + hard-deadline slack
            for thread in threads:
                thread.join(10)
            exit_codes.append(rc)
            assert rc == 0, (iteration, backend, rc, proc.stderr()[-3000:])
            assert proc.lines[1:] == ["CLEAN"]
            assert len(acked) >= before
        submitted.update(range(next_id - CLIENTS * 10_000, next_id))
    took = time.monotonic() - started

    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT job, COUNT(*) FROM done GROUP BY job").fetchall()
    counts = dict(rows)
    missing = [j for j in acked if j not in counts]
    doubled = {j: n for j, n in counts.items() if n != 1}
    assert missing == [], f"{len(missing)} acknowledged jobs lost, e.g. {missing[:10]}"
    assert doubled == {}, f"jobs done more than once: {list(doubled.items())[:10]}"
    assert set(counts) <= submitted
    assert set(acked).isdisjoint(refused)
    # The soak did real work: many jobs per run, in every run.
    assert len(acked) > ITERATIONS * 10, len(acked)
    assert exit_codes == [0] * ITERATIONS
    print(
        f"soak: {ITERATIONS} runs in {took:.1f}s, {len(acked)} jobs acknowledged, "
        f"{len(refused)} refused, {len(counts) - len(acked)} done but unacknowledged"
    )
