"""``taskguard journal ls | show ID | retry ID | drop ID --journal URL [--json]``.

``ls`` lists the journaled entries (acknowledged, not yet ended) and the dead
letters; ``show`` prints one with its arguments; ``retry`` moves a dead letter
back into the journal (attempt 1; a running guard picks it up within a second,
else the next start); ``drop`` deletes an entry or a dead letter for good.
The URL defaults to ``$TASKGUARD_JOURNAL``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from typing import Any

import anyio

from . import DeadEntry, Entry, Journal, JournalError, describe, open_journal

__all__ = ["add_journal_command"]


def add_journal_command(sub: Any) -> None:
    """Add the ``journal`` subcommand to the ``taskguard`` command's subparsers."""
    parser = sub.add_parser(
        "journal",
        help="list, show, retry or drop durable-task journal entries",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--journal",
        default=os.environ.get("TASKGUARD_JOURNAL"),
        help="journal URL, e.g. sqlite:///journal.db (default: $TASKGUARD_JOURNAL)",
    )
    common.add_argument("--json", action="store_true", help="print JSON")
    p_ls = actions.add_parser("ls", parents=[common], help="list entries and dead letters")
    p_ls.add_argument("--limit", type=int, default=1000, help="at most this many of each")
    for action, what in (
        ("show", "print one entry or dead letter"),
        ("retry", "move a dead letter back into the journal"),
        ("drop", "delete an entry or a dead letter"),
    ):
        p = actions.add_parser(action, parents=[common], help=what)
        p.add_argument("id", help="the entry id (from `ls`)")
    parser.set_defaults(func=run_journal_command)


def run_journal_command(args: argparse.Namespace) -> int:
    """Exit status: 0 done, 1 no such entry (or refused), 2 bad journal URL or unreachable."""
    if not args.journal:
        print("taskguard journal: give --journal URL (or set TASKGUARD_JOURNAL)", file=sys.stderr)
        return 2
    if args.journal.startswith("sqlite:"):
        from ._sqlite import sqlite_path

        try:
            path = sqlite_path(args.journal)[0]
        except ValueError as exc:
            print(f"taskguard journal: {exc}", file=sys.stderr)
            return 2
        if not os.path.exists(path):  # looking must not create one
            print(f"taskguard journal: no journal at {path}", file=sys.stderr)
            return 2
    try:
        return int(anyio.run(_run, args))
    except (JournalError, ValueError) as exc:
        print(f"taskguard journal: {exc}", file=sys.stderr)
        return 2


async def _run(args: argparse.Namespace) -> int:
    journal: Journal = open_journal(args.journal)
    await journal.open(None, 30.0)
    try:
        if args.action == "ls":
            live = await journal.entries(limit=args.limit)
            dead = await journal.dead_letters(limit=args.limit)
            if args.json:
                print(json.dumps({"entries": [describe(e) for e in live],
                                  "dead": [describe(d) for d in dead]}, indent=1))  # fmt: skip
            else:
                _print_table(live, dead)
            return 0
        if args.action == "show":
            found = await journal.get(args.id)
            if found is None:
                return _missing(args.id)
            print(json.dumps(_shown(found), indent=1) if args.json else _text(found))
            return 0
        if args.action == "retry":
            if not await journal.retry(args.id):
                return _missing(args.id, "dead letter")
            _done(args, "retry", args.id, "back in the journal as attempt 1")
            return 0
        if not await journal.drop(args.id):
            return _missing(args.id)
        _done(args, "drop", args.id, "dropped")
        return 0
    finally:
        await journal.close()


def _missing(entry_id: str, what: str = "entry or dead letter") -> int:
    print(f"taskguard journal: no {what} {entry_id!r}", file=sys.stderr)
    return 1


def _done(args: argparse.Namespace, action: str, entry_id: str, text: str) -> None:
    print(json.dumps({"action": action, "id": entry_id, "ok": True}) if args.json else
          f"{entry_id}: {text}")  # fmt: skip


def _when(ts: float) -> str:
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _print_table(live: list[Any], dead: list[Any]) -> None:
    print(f"{len(live)} journaled entr{'y' if len(live) == 1 else 'ies'}")
    for e in live:
        holder = f"held by {e.owner} until {_when(e.lease_until)}" if e.owner else "not held"
        key = f" key={e.key}" if e.key else ""
        print(f"  {e.id}  {e.name} ({e.group}) attempt {e.attempt}{key}, {holder}")
    print(f"{len(dead)} dead letter{'' if len(dead) == 1 else 's'}")
    for d in dead:
        key = f" key={d.key}" if d.key else ""
        print(f"  {d.id}  {d.name} ({d.group}) after {d.attempts} attempts{key}: {d.error}")


def _shown(found: Entry | DeadEntry) -> dict[str, Any]:
    data = describe(found)
    data["kind"] = "dead" if isinstance(found, DeadEntry) else "entry"
    data["arguments"] = json.loads(found.payload)
    return data


def _text(found: Entry | DeadEntry) -> str:
    data = _shown(found)
    width = max(map(len, data))
    lines = []
    for name, value in data.items():
        if name in ("created", "died", "lease_until", "not_before") and isinstance(value, float):
            value = _when(value)
        elif name == "arguments":
            value = json.dumps(value)
        lines.append(f"{name:<{width}}  {value}")
    return "\n".join(lines)
