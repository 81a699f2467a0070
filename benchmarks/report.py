"""Render a results JSON as the markdown tables of docs/benchmarks.md.

python -m benchmarks.report [benchmarks/results/latest.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from benchmarks._core import fmt

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"


def _target_row(t: dict[str, Any]) -> str:
    if t["unit"] == "x":
        value, limit = f"{t['value']:.2f}x", f"{t['limit']:g}x"
    elif t["unit"] == "bool":
        value, limit = ("yes" if t["value"] else "no"), "yes"
    else:
        value, limit = fmt(t["value"], t["unit"]), fmt(t["limit"], t["unit"])
    verdict = "**met**" if t["met"] else "**missed**"
    return (
        f"| {t['case']} | {t['variant']} | {t['what']} | {value} | {t['op']} {limit} | {verdict} |"
    )


def render(data: dict[str, Any]) -> str:
    m = data["machine"]
    pkgs = ", ".join(f"{k} {v}" for k, v in m["packages"].items() if v)
    lines = [
        f"Command: `{data['command']}` — {data['date']} — {m['cores']} cores, "
        f"{m['implementation']} {m['python']}, {m['platform']} — {pkgs} — "
        f"load average {m['loadavg'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end "
        f"({data['repeats']} repeats, {data['elapsed_s']:.0f} s).",
        "",
        "| case | variant | implementation | median | min … max | ratio |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in data["measurements"]:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        spread = f"{fmt(r['min'], r['unit'])} … {fmt(r['max'], r['unit'])}"
        lines.append(
            f"| {r['case']} | {r['variant']} | {r['impl']} | {fmt(r['median'], r['unit'])} "
            f"| {spread} | {ratio} |"
        )
    notes = [r for r in data["measurements"] if r.get("note")]
    if notes:
        lines.append("")
        lines += [f"- {r['case']} / {r['impl']}: {r['note']}" for r in notes]
    lines += [
        "",
        "| case | variant | target | measured | limit | |",
        "|---|---|---|---:|---:|---|",
    ]
    lines += [_target_row(t) for t in data["targets"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else RESULTS
    print(render(json.loads(path.read_text())), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
