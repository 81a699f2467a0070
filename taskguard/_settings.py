"""Loading a :class:`GuardConfig` from ``TASKGUARD_*`` environment variables."""

from __future__ import annotations

import os
from typing import Any

from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from ._config import GuardConfig

__all__ = ["load_env"]

# error_handler is a callable: it cannot come from the environment.
_ENV_FIELDS = frozenset(GuardConfig.model_fields) - {"error_handler"}
# The fields a nested variable (FIELD__KEY...) may go into: dicts of models.
_NESTED_FIELDS = frozenset({"groups"})


class _EnvGuardConfig(BaseSettings, GuardConfig):
    # BaseSettings first: its __init__ reads the environment, GuardConfig's
    # fields and validators then apply to what it read.
    model_config = SettingsConfigDict(
        env_nested_delimiter="__",
        case_sensitive=False,
        extra="forbid",
        frozen=True,
        title="GuardConfig (environment)",
    )


def load_env(prefix: str, overrides: dict[str, Any]) -> GuardConfig:
    """Read ``{prefix}*`` variables; unknown ones are an error, as unknown fields are."""
    unknown = [
        key
        for key in os.environ
        if key.upper().startswith(prefix.upper()) and not _known(key[len(prefix) :])
    ]
    if unknown:
        raise ValidationError.from_exception_data(
            "GuardConfig (environment)",
            [
                {"type": "extra_forbidden", "loc": (key,), "input": os.environ[key]}
                for key in sorted(unknown)
            ],
        )
    try:
        loaded = _EnvGuardConfig(_env_prefix=prefix, **overrides)
    except SettingsError as exc:
        # Unparsable JSON in a complex field (groups, exit_signals): pydantic-settings
        # raises its own error before validation; report it like any other bad value.
        field = _field_of(exc)
        raise ValidationError.from_exception_data(
            "GuardConfig (environment)",
            [
                {
                    "type": "value_error",
                    "loc": (field,),
                    "input": os.environ.get(f"{prefix}{field}".upper(), ""),
                    "ctx": {"error": ValueError(f"{exc}; expected JSON, e.g. '[\"TERM\"]'")},
                }
            ],
        ) from exc
    values = {name: getattr(loaded, name) for name in loaded.model_fields_set}
    return GuardConfig.model_validate(values)


def _known(name: str) -> bool:
    """Whether ``EXIT_WAIT_TIMEOUT`` / ``GROUPS__MAIL__LIMIT`` names a field (pydantic-
    settings would silently ignore a nested name under a plain field, or an empty one)."""
    field, *nested = name.lower().split("__")
    if field not in _ENV_FIELDS:
        return False
    return not nested or (field in _NESTED_FIELDS and all(nested))


def _field_of(exc: SettingsError) -> str:
    # 'error parsing value for field "groups" from source "EnvSettingsSource"'
    text = str(exc)
    start = text.find('field "')
    if start < 0:
        return "environment"
    start += len('field "')
    return text[start : text.find('"', start)]
