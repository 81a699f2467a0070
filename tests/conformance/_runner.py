"""Run a peer's own test suite plain and with every app wrapped in TaskGuardMiddleware.

Steps: read the installed version of the peer (and of anyio, httpx, trio,
pytest, pydantic) from this interpreter; make (or reuse) a virtual environment
of its own with exactly those versions, taskguard from this checkout and the
peer's test dependencies (kept out of the project's environment: some of them
are pytest plugins that change every pytest run); download the peer's sdist
(``pip download --no-binary :all: --no-deps``) and unpack it; run its tests
twice (plain, and with ``wrap_testclient.py`` loaded); print the differences.

Known differences are listed by the peer's script with the reason each is an
artifact of the wrapping; any other difference makes the exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
#: pinned to the versions installed here, so both runs test what the project uses
PINNED = ("anyio", "httpx", "trio", "pytest", "pydantic", "pydantic-settings")
PASSING = {"passed", "xfailed", "skipped"}


@dataclass
class Peer:
    name: str  # the distribution on the package index
    test_dir: str  # inside the unpacked sdist
    test_deps: Sequence[str]  # beyond the peer and the pinned packages
    #: test id → why it differs wrapped: an artifact of the wrapping, not of the middleware
    known: Mapping[str, str] = field(default_factory=dict)
    pytest_args: Sequence[str] = ()


def main(peer: Peer, argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=f"Run {peer.name}'s suite plain and wrapped.")
    parser.add_argument(
        "--venv",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "taskguard-conformance"
        / f"{peer.name}-py{sys.version_info.major}.{sys.version_info.minor}",
        help="the virtual environment of the runs (made or updated as needed)",
    )
    parser.add_argument("--workdir", type=Path, help="where the sdist and logs go (default: temp)")
    parser.add_argument("--timeout", type=int, default=60, help="per test (pytest-timeout), s")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments, e.g. -k trailers")
    args = parser.parse_args(argv)
    version = metadata.version(peer.name)
    work = args.workdir or Path(tempfile.mkdtemp(prefix=f"conformance-{peer.name}-"))
    work.mkdir(parents=True, exist_ok=True)
    python = prepare_venv(args.venv, peer, version)
    root = unpack_sdist(python, peer.name, version, work)
    print(f"{peer.name} {version}: suite in {root}, logs in {work}", flush=True)
    common = [
        *(f"-p{p}" for p in ("no:cacheprovider", "no:taskguard", "record_outcomes")),
        f"--timeout={args.timeout}",
        "--continue-on-collection-errors",  # modules needing what is not installed: both runs
        *peer.pytest_args,
        *args.pytest_args,
        peer.test_dir,
    ]
    runs = {}
    for label, extra in (("plain", []), ("wrapped", ["-pwrap_testclient"])):
        runs[label] = run_suite(python, root, work, label, [*extra, *common])
    return report(peer, runs["plain"], runs["wrapped"])


def prepare_venv(venv: Path, peer: Peer, version: str) -> Path:
    python = venv / "bin" / "python"
    wanted = [
        f"{peer.name}=={version}",
        *(f"{name}=={metadata.version(name)}" for name in PINNED),
        *peer.test_deps,
        "pytest-timeout",
        "-e",
        str(REPO),
    ]
    stamp = venv / "conformance-requirements.json"
    if python.exists() and stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return python
    print(f"preparing {venv} ...", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-qq", *wanted], check=True)
    stamp.write_text(json.dumps(wanted))
    return python


def unpack_sdist(python: Path, name: str, version: str, work: Path) -> Path:
    download = work / "sdist"
    subprocess.run(
        [str(python), "-m", "pip", "download", "-qq", "--no-binary", ":all:", "--no-deps",
         f"{name}=={version}", "-d", str(download)],
        check=True,
    )  # fmt: skip
    (archive,) = download.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(work, filter="data")
    (root,) = (p for p in work.iterdir() if p.is_dir() and p.name.lower().startswith(name))
    return root


def run_suite(
    python: Path, root: Path, work: Path, label: str, args: Sequence[str]
) -> dict[str, str]:
    results, log = work / f"{label}.json", work / f"{label}.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE), str(root)]),
        "CONFORMANCE_RESULTS": str(results),
    }
    for name in ("PYTEST_ADDOPTS", "PYTEST_DISABLE_PLUGIN_AUTOLOAD", "PYTEST_PLUGINS"):
        env.pop(name, None)
    started = time.monotonic()
    with log.open("w") as out:
        subprocess.run(
            [str(python), "-m", "pytest", "-q", *args], cwd=root, env=env, stdout=out, stderr=out
        )
    outcomes: dict[str, str] = json.loads(results.read_text()) if results.exists() else {}
    counts = Counter(outcomes.values())
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    print(f"  {label:8} {summary}  ({time.monotonic() - started:.0f} s, {log})", flush=True)
    return outcomes


def report(peer: Peer, plain: Mapping[str, str], wrapped: Mapping[str, str]) -> int:
    differ = sorted(
        test
        for test in plain.keys() | wrapped.keys()
        if plain.get(test, "not run") != wrapped.get(test, "not run")
    )
    explained = [t for t in differ if t in peer.known]
    unexplained = [t for t in differ if t not in peer.known]
    print(f"differences: {len(differ)} ({len(explained)} known artifacts of the wrapping)")
    for title, tests in (("known artifacts", explained), ("UNEXPLAINED", unexplained)):
        if tests:
            print(f"  {title}:")
        for test in tests:
            print(f"    {test}: plain {plain.get(test, 'not run')}, "
                  f"wrapped {wrapped.get(test, 'not run')}")  # fmt: skip
            if test in peer.known:
                print(f"      why: {peer.known[test]}")
    stale = sorted(set(peer.known) - set(differ))
    if stale:
        print(f"  listed as known but not different now: {', '.join(stale)}")
    failing_both = [t for t in plain if plain[t] not in PASSING and plain[t] == wrapped.get(t)]
    print(f"failing or not collected in both runs (not differences): {len(failing_both)}")
    return 1 if unexplained else 0
