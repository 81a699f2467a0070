"""The ``taskguard`` command: ``taskguard run module:function``, ``demo``, ``journal``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]


def _load(target: str) -> Any:
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"taskguard run: expected 'package.module:function', got {target!r}")
    sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SystemExit(f"taskguard run: cannot import {module_name!r}: {exc}") from None
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise SystemExit(f"taskguard run: {module_name!r} has no {attr!r}") from None
    return obj


def _cmd_run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from ._config import GuardConfig
    from ._runner import run

    main = _load(args.target)
    try:
        config = GuardConfig.from_env(handle_signals=True)
    except ValidationError as exc:
        print(f"taskguard run: bad TASKGUARD_* configuration: {exc}", file=sys.stderr)
        return 2
    try:
        report = run(main, config=config, backend=args.backend)
    except Exception:
        logging.getLogger("taskguard").exception("main raised")
        return 1
    if args.json:
        print(report.model_dump_json(indent=2))
    return 0 if report.clean else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import demo

    return demo(quick=args.quick)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="taskguard", description="Graceful shutdown for background work in async servers."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser(
        "run",
        help="run `async def main(guard)` with signal handling and graceful shutdown",
        description="Configure with TASKGUARD_* environment variables "
        "(e.g. TASKGUARD_EXIT_WAIT_TIMEOUT=20). Exit status: 0 when the shutdown "
        "report is clean, 1 when it is not or main raised, 2 for a bad configuration, "
        "3 when the hard deadline ended the process, 128+N after a third exit signal N.",
    )
    p_run.add_argument("target", help="package.module:function")
    p_run.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    p_run.add_argument("--json", action="store_true", help="print the report as JSON at the end")
    p_run.set_defaults(func=_cmd_run)
    p_demo = sub.add_parser(
        "demo", help="the example RPC server going through a graceful shutdown, vs. a plain one"
    )
    p_demo.add_argument("--quick", action="store_true", help="skip the plain-server comparison")
    p_demo.set_defaults(func=_cmd_demo)
    from ._journal._cli import add_journal_command  # durable: `taskguard journal ...`

    add_journal_command(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
