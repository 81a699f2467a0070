"""`import taskguard` stays light: no pydantic model is built until it is used,
and every public name still imports.

Checked in a fresh interpreter (what a CLI or a server start pays). The time it
saves is measured, not asserted: ``python -X importtime -c 'import taskguard'``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import taskguard

CHECK = """
import taskguard
from taskguard import _config, _report, _stream_registry

models = [_config.GroupConfig, _config.GuardConfig, _stream_registry.StreamResult] + [
    m for m in vars(_report).values()
    if isinstance(m, type) and issubclass(m, _report._Model) and m is not _report._Model
]
built = [m.__name__ for m in models if m.__pydantic_complete__]
print("built:", built)
"""


def _fresh(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return proc.stdout


def test_import_builds_no_model() -> None:
    out = _fresh(CHECK)
    assert "built: []" in out, out


def test_every_public_name_imports() -> None:
    names = ", ".join(n for n in taskguard.__all__)
    out = _fresh(f"from taskguard import {names}\nfrom taskguard import *\nprint('ok')")
    assert out.strip() == "ok"
    for name in taskguard.__all__:
        assert getattr(taskguard, name) is not None


def test_deferred_models_validate_as_before() -> None:
    out = _fresh(
        """
        from pydantic import ValidationError
        import taskguard
        try:
            taskguard.GuardConfig(groups={"g": {"timeout": -1}})
        except ValidationError as exc:
            print(exc.errors()[0]["loc"])
        print(taskguard.GuardConfig().group("x"))
        """
    )
    assert "('groups', 'g', 'timeout')" in out, out
    assert "on_shutdown='drain'" in out, out
