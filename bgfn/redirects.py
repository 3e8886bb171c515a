"""Rewrites to functions: `[[redirects]]` rules with `status = 200` whose `to` is under
`/.netlify/functions/` (CONTRACT §2).

Rules are compiled once at start-up. `from` may end in `*` (its match is `:splat`) and may hold
`:name` placeholders; `to` names the function (placeholders may pick it). The function sees the
original path and the original query string; the query of `to` is not added. bgfn serves no static
files, so `force` changes nothing: every rewrite applies. Rules with `conditions` (country,
language, role) or `query` matching are not applied, and every rule that is not a rewrite to a
function (redirects, proxies, rewrites to pages) is reported once at start-up as ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from bgfn.errors import ConfigError

FUNCTIONS_PREFIX = "/.netlify/functions/"


@dataclass(frozen=True)
class Rewrite:
    """One compiled rewrite rule."""

    source: str
    to: str
    pattern: re.Pattern[str]

    def target(self, path: str) -> str | None:
        """The `to` path with placeholders filled, if `path` matches; the query of `to` dropped."""
        found = self.pattern.fullmatch(path)
        if found is None:
            return None
        values = {k: v for k, v in found.groupdict().items() if v is not None}
        target = self.to.split("?", 1)[0]
        return re.sub(r":(\w+)", lambda m: values.get(m.group(1), m.group(0)), target)


def _compile(source: str) -> re.Pattern[str]:
    pattern = ""
    rest = source.rstrip("/") or "/"
    splat = rest.endswith("*")
    if splat:
        rest = rest[:-1]
    for part in re.split(r"(:\w+)", rest):
        if part.startswith(":") and len(part) > 1:
            pattern += f"(?P<{part[1:]}>[^/]+)"
        else:
            pattern += re.escape(part)
    if splat:
        pattern += "(?P<splat>.*)"
    else:
        pattern += "/?"
    return re.compile(pattern)


def load_rewrites(config: dict[str, Any], file: str) -> tuple[list[Rewrite], list[str]]:
    """The rewrites to functions among the `[[redirects]]` of `config`, and notes on the rules ignored."""
    rules = config.get("redirects", [])
    if not isinstance(rules, list):
        raise ConfigError(f"{file}: redirects must be a list of [[redirects]] tables, found {rules!r}.")
    rewrites: list[Rewrite] = []
    ignored: list[str] = []
    for index, rule in enumerate(rules, 1):
        if not isinstance(rule, dict) or not isinstance(rule.get("from"), str) or not isinstance(rule.get("to"), str):
            raise ConfigError(f"{file}: [[redirects]] rule {index} needs `from` and `to` as text, found {rule!r}.")
        source, to = rule["from"], rule["to"]
        status = rule.get("status", 301)
        where = f"[[redirects]] {source} -> {to}"
        if status != 200 or not to.startswith(FUNCTIONS_PREFIX):
            ignored.append(f"{where} (status {status}): not a rewrite to a function, ignored (bgfn serves only "
                           "functions)")
            continue
        if rule.get("conditions") or rule.get("query"):
            ignored.append(f"{where}: has conditions or query matching, which bgfn does not evaluate; ignored")
            continue
        if not source.startswith("/"):
            ignored.append(f"{where}: `from` is not a path on this site, ignored")
            continue
        rewrites.append(Rewrite(source=source, to=to, pattern=_compile(source)))
    return rewrites, ignored


def match(rewrites: list[Rewrite], path: str) -> str | None:
    """The function path the first matching rule rewrites `path` to."""
    for rewrite in rewrites:
        target = rewrite.target(path)
        if target is not None:
            return target
    return None
