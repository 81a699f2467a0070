"""A pytest plugin of this suite: failure reports stay sendable between xdist processes.

The fuzz tests feed lone surrogates (``"\\udc80"``) to every call, so a failure's
text can carry one. pytest-xdist sends each report from its worker as UTF-8,
which a lone surrogate cannot be: the worker died with an INTERNALERROR and the
failure itself was never shown ("no tests ran"). Such text is escaped here
(``\\udc80``), in the worker, before the report leaves it.
"""

from __future__ import annotations

from collections.abc import Generator

import pytest


def _escaped(text: str) -> str | None:
    """``text`` with lone surrogates escaped, or None if it encodes as it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.longrepr is not None:
        escaped = _escaped(str(report.longrepr))
        if escaped is not None:
            report.longrepr = escaped
    report.sections = [(title, _escaped(content) or content) for title, content in report.sections]
    return report
