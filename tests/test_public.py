"""The package's surface: what it exports, what it types, what it imports."""

from __future__ import annotations

import subprocess
import sys
import typing

import taskguard
from taskguard import GuardConfig, GuardOptions


def test_every_public_name_imports_and_all_is_complete() -> None:
    # ("@py_builtins" and "@pytest_ar": pytest's assertion rewriting of the plugin's package)
    public = {name for name in dir(taskguard) if not name.startswith(("_", "@"))}
    modules = {"testing", "asgi", "grpc"}  # submodules show up once imported elsewhere
    assert public - modules - {"annotations"} <= set(taskguard.__all__)
    for name in taskguard.__all__:  # the durable names resolve on first access
        assert getattr(taskguard, name) is not None
    public = {name for name in dir(taskguard) if not name.startswith(("_", "@"))}
    assert public - modules - {"annotations"} == set(taskguard.__all__) - {"__version__"}


def test_the_keyword_options_are_the_config_fields() -> None:
    # TaskGuard(**options) and taskguard.run(**options) are typed by GuardOptions:
    # a field added to the config must be added there too.
    assert set(typing.get_type_hints(GuardOptions)) == set(GuardConfig.model_fields)


def test_the_core_imports_no_integration_and_no_demo() -> None:
    code = (
        "import sys, taskguard\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('grpc', 'starlette', 'fastapi', 'uvicorn', 'hypercorn', 'httpx', 'trio', 'pytest')"
        " or m.startswith(('taskguard.asgi', 'taskguard.grpc', 'taskguard.testing', "
        "'taskguard._demo', 'taskguard._example', 'taskguard._pytest_plugin'))]\n"
        "print(sorted(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "[]"


def test_no_module_outside_the_backends_branches_on_the_backend() -> None:
    """The asyncio/trio differences live in ``taskguard/_backends/`` (one owner):
    elsewhere nothing compares a backend's name, nor calls the running asyncio
    loop's low-level API (``get_running_loop``, ``add_reader``). The gRPC modules
    are exempt: grpc.aio runs on asyncio only, that is the framework, not a branch."""
    import ast
    from pathlib import Path

    package = Path(taskguard.__file__).parent
    exempt = {"_backends", "grpc.py", "_grpc_stream.py", "_grpc_health.py"}
    found = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        if rel.parts[0] in exempt:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(
                isinstance(c, ast.Constant) and c.value in ("asyncio", "trio")
                for c in node.comparators
            ):
                found.append(f"{rel}:{node.lineno}: compares with a backend name")
            if isinstance(node, ast.Attribute) and node.attr in ("get_running_loop", "add_reader"):
                found.append(f"{rel}:{node.lineno}: asyncio's loop API ({node.attr})")
    assert not found, "\n".join(found)
