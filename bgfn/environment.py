"""The site's environment (CONTRACT §9): `[build.environment]`, then
`[context.<context>.environment]` on top, and the process environment winning over both. Applied
once per process, before functions are imported, so module-level reads see it too."""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from typing import Any

from bgfn.errors import ConfigError


def site_environment(config: dict[str, Any], context: str, file: str) -> dict[str, str]:
    """The variables the site's configuration sets for `context`."""
    def table(value: Any) -> dict[str, Any]:
        return value if isinstance(value, dict) else {}

    merged: dict[str, str] = {}
    sections = [("[build.environment]", table(config.get("build")).get("environment", {})),
                (f"[context.{context}.environment]",
                 table(table(config.get("context")).get(context)).get("environment", {}))]
    for where, values in sections:
        if not isinstance(values, dict):
            raise ConfigError(f"{file}: {where} must be a table of NAME = \"value\", found {values!r}.")
        for name, value in values.items():
            if isinstance(value, dict | list) or value is None:
                raise ConfigError(f"{file}: {where} {name} = {value!r}: expected text, a number or a boolean.")
            merged[str(name)] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return merged


def apply(variables: dict[str, str], environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Set each variable the process does not set already; returns the names set."""
    target = os.environ if environ is None else environ
    applied = []
    for name, value in variables.items():
        if name not in target:
            target[name] = value
            applied.append(name)
    return applied
