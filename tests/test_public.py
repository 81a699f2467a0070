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
