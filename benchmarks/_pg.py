"""A throwaway PostgreSQL cluster (``initdb``, ``pg_ctl``) on a free port: tests, benchmarks.

The binaries are found with ``pg_config --bindir``, on PATH, or under
``/usr/lib/postgresql/*/bin`` (Debian). As root, the server runs as the
``postgres`` user (``initdb`` refuses root), in a directory handed to it.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

__all__ = ["Cluster", "find_bindir"]


def find_bindir() -> str | None:
    """Where ``initdb`` and ``pg_ctl`` are, or None."""
    candidates: list[str] = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        candidates.append(out.stdout.strip())
    if shutil.which("initdb"):
        candidates.append(str(Path(shutil.which("initdb") or "").parent))
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for path in candidates:
        if path and os.access(os.path.join(path, "initdb"), os.X_OK):
            return path
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Cluster:
    """``with Cluster(bindir) as url:`` a fresh cluster; ``fsync=False`` for fast tests."""

    def __init__(self, bindir: str, fsync: bool = True) -> None:
        self.bindir = bindir
        self.fsync = fsync
        self.dir = Path(tempfile.mkdtemp(prefix="taskguard-pg-"))
        self.port = _free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._user: list[str] = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self._user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *cmd: str) -> None:
        out = subprocess.run([*self._user, *cmd], capture_output=True, text=True, timeout=120)
        if out.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed: {out.stdout}{out.stderr}")

    def start(self) -> str:
        data = self.dir / "data"
        self._run(f"{self.bindir}/initdb", "-D", str(data), "-U", "postgres", "--auth=trust",
                  "-E", "UTF8", "--no-sync")  # fmt: skip
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
        if not self.fsync:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run(f"{self.bindir}/pg_ctl", "-D", str(data), "-l", str(self.dir / "log"),
                  "-o", options, "-w", "start")  # fmt: skip
        return self.url

    def stop(self) -> None:
        try:
            self._run(
                f"{self.bindir}/pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "stop"
            )
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
