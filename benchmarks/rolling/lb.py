"""HAProxy in front of the backends: its config, its log, and its view of each server.

The config is HAProxy's defaults plus what a deploy behind a health-checked
load balancer needs (see ``CONFIG``):

- ``option httpchk`` on ``/healthz/ready`` every ``inter`` (1 s), a server
  taken out after ``fall`` (2) failed checks and back in after ``rise`` (2)
  good ones. So a backend whose readiness turns 503 gets no new requests at
  most about ``inter x fall`` (+ one check's duration) later: that is the time
  ``drain_delay`` must cover (3 s against 2 s here);
- ``retries 3`` to the same server on a failed connection (HAProxy's default)
  and no ``option redispatch``: a backend that refuses connections while it is
  still in the pool shows up as failed requests, instead of being hidden by
  the balancer retrying elsewhere.

With ``deregister_first`` the harness takes a backend out of the pool
through the runtime API (``set server app/sN state maint``) before it sends
SIGTERM, as a preStop hook or a deploy script would; this is the control that
shows what is left when the load balancer is told first.

Each request is logged as ``REQ <accept date> <handshake ms> <idle ms>
<status> <termination state> <server> <retries> <active ms> <method> <uri>``.
The termination state tells who ended the request and when: ``SC`` the
server refused the connection, ``SH`` it closed it before the response
headers, ``SD`` during the body, ``--`` a normal end.
"""

from __future__ import annotations

import datetime
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

CONFIG = """\
global
    log stdout format rfc5424 local0 info
    stats socket ipv4@127.0.0.1:{stats_port} level admin
    nbthread 1
    maxconn 4000

defaults
    mode http
    log global
    option log-health-checks
    log-format "REQ %Ts.%ms %Th %Ti %ST %ts %s %rc %Ta %HM %HU"
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    timeout tunnel 1h
    timeout check 1s
    retries 3

frontend fe
    bind 127.0.0.1:{port}
    default_backend app

backend app
    balance roundrobin
    option httpchk
    http-check send meth GET uri /healthz/ready ver HTTP/1.1 hdr Host lb
    http-check expect status 200
    default-server check inter {inter_ms}ms fall {fall} rise {rise}
{servers}
"""

_LINE = re.compile(r"^<\d+>1 (\S+) \S+ \S+ \d+ - - (.*)$")
_REQUEST = re.compile(
    r"^REQ (\d+\.\d+) (-?\d+) (-?\d+) (-?\d+) (\S\S) (\S+) (\+?\d+) (-?\d+) (\S+) (\S+)"
)
_STATE = re.compile(r"^Server app/(s\d+) is (?:going )?(UP|DOWN)")


class Haproxy:
    """One HAProxy process on ``port``; server ``s<i>`` is ``127.0.0.1:<backends[i]>``.

    Its log goes to its stdout in RFC 5424 format, so every line carries
    HAProxy's own timestamp (microseconds): on a busy machine a reader's
    clock would be late by as much as the reader is. Times are converted to
    ``time.monotonic()``, the clock of the harness and the load generator.
    """

    def __init__(
        self,
        backends: Sequence[int],
        workdir: Path,
        port: int,
        stats_port: int,
        *,
        inter: float = 1.0,
        fall: int = 2,
        rise: int = 2,
    ) -> None:
        program = shutil.which("haproxy")
        if program is None:
            raise RuntimeError("haproxy is not installed (Debian: apt-get install -y haproxy)")
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        # a TCP socket: a unix socket's path is limited to 97 characters
        self.stats_port = stats_port
        self.log_file = workdir / "haproxy.log"
        self.config = workdir / "haproxy.cfg"
        servers = "\n".join(f"    server s{i} 127.0.0.1:{p}" for i, p in enumerate(backends))
        self.config.write_text(
            CONFIG.format(
                stats_port=stats_port,
                port=port,
                inter_ms=round(inter * 1000),
                fall=fall,
                rise=rise,
                servers=servers,
            )
        )
        #: epoch time minus monotonic time: HAProxy's timestamps on our clock
        self._epoch = time.time() - time.monotonic()
        #: (time, message) of every log line
        self.log: list[tuple[float, str]] = []
        self.stderr = workdir / "haproxy.stderr"
        self._stderr = self.stderr.open("wb")
        self.proc = subprocess.Popen(
            [program, "-f", str(self.config), "-db"],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()

    def _read_log(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            m = _LINE.match(line)
            if m is None:
                self.log.append((time.monotonic(), line))
                continue
            when = datetime.datetime.fromisoformat(m[1]).timestamp() - self._epoch
            self.log.append((when, m[2]))

    def command(self, line: str) -> str:
        """One command on the stats socket (runtime API); its answer."""
        with socket.create_connection(("127.0.0.1", self.stats_port), timeout=2) as conn:
            conn.sendall(line.encode() + b"\n")
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
        return data.decode()

    def stats(self) -> dict[str, str]:
        """Each server's status from the stats socket (``show stat``)."""
        answer = self.command("show stat")
        lines = answer.splitlines()
        if not lines or not lines[0].startswith("# "):
            raise OSError(f"unexpected stats answer: {answer[:200]!r}")
        header = lines[0][2:].split(",")
        name, sv, st = header.index("pxname"), header.index("svname"), header.index("status")
        rows = [line.split(",") for line in lines[1:] if line]
        return {r[sv]: r[st] for r in rows if r[name] == "app" and r[sv] != "BACKEND"}

    def wait_status(self, server: str, status: str, timeout: float) -> float:
        """Wait until ``server``'s status is ``status`` (e.g. "UP"); when it was seen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited ({self.proc.returncode}): {self.tail()}")
            try:
                if self.stats().get(server) == status:
                    return time.monotonic()
            except OSError:
                pass  # not listening yet
            time.sleep(0.05)
        raise RuntimeError(f"haproxy: {server} not {status} within {timeout:g} s:\n{self.tail()}")

    def changes(self, server: str, after: float) -> list[tuple[float, str]]:
        """When HAProxy took ``server`` out of the pool ("DOWN": failed checks, or
        maintenance) or put it back ("UP") after ``after``, from its log."""
        out = []
        for when, message in self.log:
            m = _STATE.match(message)
            if m and m[1] == server and when >= after:
                out.append((when, m[2]))
        return out

    def requests(self) -> list[tuple[float, int, str, str, int, int, str, str]]:
        """The request log: (accepted, status, termination, server, retries, ms, method, uri).

        ``accepted`` is when the request's first byte reached HAProxy: for a
        keep-alive connection HAProxy's "accept date" is when the connection
        became idle, so the handshake (``%Th``) and idle (``%Ti``) times are
        added. The status is -1 where HAProxy sent none (it closed the
        client's connection).
        """
        out = []
        for _, message in self.log:
            m = _REQUEST.match(message)
            if m:
                accept, th, ti, status, ts, server, retries, ms, method, uri = m.groups()
                when = float(accept) + (max(int(th), 0) + max(int(ti), 0)) / 1000 - self._epoch
                out.append((when, int(status), ts, server, int(retries), int(ms), method, uri))
        return out

    def tail(self, lines: int = 20) -> str:
        """The end of its log and of its stderr (where a config error goes)."""
        self._stderr.flush()
        err = self.stderr.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join([*(line for _, line in self.log[-lines:]), *err])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        self._stderr.close()
        self.log_file.write_text("".join(f"{t:.3f} {line}\n" for t, line in self.log))
