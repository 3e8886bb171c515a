"""Domain exceptions. Core code raises these; only the CLI turns them into exit codes."""

from __future__ import annotations


class BgfnError(Exception):
    """Base of every error bgfn raises on purpose."""


class ConfigError(BgfnError):
    """A configuration file or setting is wrong; the message names it and says the fix."""


class FunctionLoadError(BgfnError):
    """One or more functions cannot be loaded; `problems` lists every one."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        count = len(self.problems)
        head = f"{count} function{'s' if count != 1 else ''} could not be loaded:"
        super().__init__("\n".join([head, *(f"  - {p}" for p in self.problems)]))


class FunctionNotFound(BgfnError):
    """No function of that name exists."""


class QueueUnavailable(BgfnError):
    """Redis could not take or give a job (down, unreachable, out of memory, read-only)."""


class RedisServerError(BgfnError):
    """An embedded Redis server could not be started."""
