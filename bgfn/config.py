"""The site's configuration: netlify.toml (or netlify.yaml/.yml) and bgfn.toml.

:func:`load_site` reads the files once, validates every key bgfn uses and returns a
:class:`SiteConfig`. Errors name the file, the key, what was expected and how to fix it.
"""

from __future__ import annotations

import fnmatch
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bgfn import defaults
from bgfn.errors import ConfigError
from bgfn.redirects import Rewrite, load_rewrites
from bgfn.retry import RETRY_KEYS, validate_retry_setting

# Keys Netlify itself reads under [functions] (for every function) or [functions."NAME"].
NETLIFY_FUNCTION_KEYS = frozenset(
    {"directory", "node_bundler", "external_node_modules", "ignored_node_modules", "included_files",
     "deno_import_map", "schedule"}
)
# Keys bgfn reads for a function, and where each may be set.
NETLIFY_TOML_KEYS = frozenset({"background", "schedule"})
LIMIT_KEYS = frozenset({"max_queued", "concurrency", "sync_concurrency"})
BGFN_TOML_KEYS = frozenset({"background", "timeout"}) | RETRY_KEYS | LIMIT_KEYS


@dataclass(frozen=True)
class FunctionRule:
    """One `[functions."PATTERN"]` section."""

    pattern: str
    settings: dict[str, Any]
    source: str

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern)

    @property
    def specificity(self) -> tuple[int, int]:
        """Exact names beat globs; among globs, more literal characters win."""
        wild = sum(self.pattern.count(c) for c in "*?[")
        literal = len(self.pattern) - wild
        return (1 if wild == 0 else 0, literal)


@dataclass(frozen=True)
class SiteConfig:
    """Everything bgfn uses from a site's configuration files."""

    site_dir: Path
    config_file: Path | None
    functions_dir: Path | None
    functions_dir_source: str
    rules: tuple[FunctionRule, ...] = ()
    rewrites: tuple[Rewrite, ...] = ()
    warnings: tuple[str, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict)

    def function_settings(self, name: str) -> dict[str, Any]:
        """Settings for function `name`: matching sections merged, the most specific winning."""
        merged: dict[str, Any] = {}
        for rule in sorted((r for r in self.rules if r.matches(name)), key=lambda r: r.specificity):
            overlay(merged, rule.settings)
        return merged


EXCLUSIVE = (frozenset({"retry_delays", "retry_backoff"}),)
"""Keys that are one choice: a source that sets one of them replaces the others from weaker sources."""


def overlay(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Put `top`'s settings over `base` (in place), one choice of each exclusive group winning whole."""
    for group in EXCLUSIVE:
        if group & set(top):
            for key in group:
                base.pop(key, None)
    base.update(top)
    return base


def find_config_file(site_dir: Path) -> Path | None:
    for candidate in defaults.CONFIG_FILES:
        path = site_dir / candidate
        if path.is_file():
            return path
    return None


def read_file(path: Path) -> dict[str, Any]:
    """Parse a TOML or YAML configuration file into a dict; errors name the file and the fix."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read ({exc}). Check that it exists and is UTF-8 text.") from None
    if path.suffix == ".toml":
        try:
            data: Any = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}. Fix the syntax at that line.") from None
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}. Fix the syntax at that line.") from None
        if data is None:
            data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, found {type(data).__name__}.")
    return data


def load_site(site_dir: Path) -> SiteConfig:
    """Read the site's configuration files from `site_dir`."""
    site_dir = site_dir.resolve()
    if not site_dir.is_dir():
        raise ConfigError(f"site folder {str(site_dir)!r} does not exist: run bgfn from the folder "
                          "holding netlify.toml, or name it with --site DIR.")
    warnings: list[str] = []
    config_file = find_config_file(site_dir)
    data = read_file(config_file) if config_file else {}
    if config_file is None:
        warnings.append(f"no netlify.toml in {site_dir}: using defaults")
    name = config_file.name if config_file else "netlify.toml"

    functions = _section(data, "functions", name)
    build = _section(data, "build", name)
    rules: list[FunctionRule] = []
    for key, value in functions.items():
        if isinstance(value, dict):
            # str(): YAML reads `404:` as a number, but a pattern is always a name.
            rules.append(_rule(str(key), value, name, NETLIFY_TOML_KEYS, strict=False, warnings=warnings))
        elif key not in NETLIFY_FUNCTION_KEYS:
            raise ConfigError(
                f"{name}: [functions] {key} = {value!r}: Netlify reads unknown keys under [functions] as "
                f"function names, so this would break the site on Netlify. Server settings go in BGFN_* "
                f"environment variables (see `bgfn --help`), per-function settings in "
                f"{defaults.BGFN_CONFIG_FILE}."
            )

    functions_dir, source = _functions_dir(site_dir, functions, build, name)

    bgfn_file = site_dir / defaults.BGFN_CONFIG_FILE
    if bgfn_file.is_file():
        bgfn_data = read_file(bgfn_file)
        for key in bgfn_data:
            if key != "functions":
                raise ConfigError(f"{bgfn_file.name}: unknown section [{key}]; it holds only "
                                  f'[functions."PATTERN"] sections with keys {sorted(BGFN_TOML_KEYS)}.')
        for key, value in _section(bgfn_data, "functions", bgfn_file.name).items():
            if not isinstance(value, dict):
                raise ConfigError(f'{bgfn_file.name}: [functions] {key} = {value!r}: expected a section '
                                  f'[functions."{key}"] with keys {sorted(BGFN_TOML_KEYS)}.')
            rules.append(_rule(key, value, bgfn_file.name, BGFN_TOML_KEYS, strict=True, warnings=warnings))

    rewrites, ignored = load_rewrites(data, name)
    warnings.extend(ignored)
    return SiteConfig(site_dir=site_dir, config_file=config_file, functions_dir=functions_dir,
                      functions_dir_source=source, rules=tuple(rules), rewrites=tuple(rewrites),
                      warnings=tuple(warnings), raw=data)


def _section(data: dict[str, Any], key: str, file: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{file}: [{key}] must be a section (a table), found {value!r}.")
    return value


def _functions_dir(site_dir: Path, functions: dict[str, Any], build: dict[str, Any],
                   file: str) -> tuple[Path | None, str]:
    for section, key, value in (("functions", "directory", functions.get("directory")),
                                ("build", "functions", build.get("functions"))):
        if value is None:
            continue
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f'{file}: [{section}] {key} = {value!r}: expected a folder path as text, '
                              f'e.g. {key} = "netlify/functions".')
        path = (site_dir / value).resolve()
        if not path.is_dir():
            raise ConfigError(f"{file}: [{section}] {key} = {value!r}: folder {str(path)!r} does not exist. "
                              "Create it or correct the path (it is relative to the file's folder).")
        return path, f"[{section}] {key} in {file}"
    default = site_dir / defaults.FUNCTIONS_DIR
    if default.is_dir():
        return default, f"the default {defaults.FUNCTIONS_DIR}"
    return None, f"none: set [functions] directory in {file}"


def _rule(pattern: str, values: dict[str, Any], file: str, known: frozenset[str], *, strict: bool,
          warnings: list[str]) -> FunctionRule:
    where = f'{file}: [functions."{pattern}"]'
    settings: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            if strict:
                raise ConfigError(f"{where} {key}: unknown key. Known keys: {', '.join(sorted(known))}.")
            if key in BGFN_TOML_KEYS:
                warnings.append(f"{where} {key}: ignored here; bgfn reads it from {defaults.BGFN_CONFIG_FILE} "
                                f'(beside {file}), under [functions."{pattern}"]')
            elif key not in NETLIFY_FUNCTION_KEYS:
                warnings.append(f"{where} {key}: not used by bgfn, ignored")
            continue
        settings[key] = validate_function_setting(key, value, where)
    return FunctionRule(pattern=pattern, settings=settings, source=where)


SCHEDULE_ALIASES = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")


def validate_schedule(expression: str, where: str) -> str:
    """Five cron fields in UTC or an @ shortcut (CONTRACT §8); the error quotes it and says the form."""
    from croniter import croniter

    text = expression.strip()
    if text.startswith("@"):
        if text not in SCHEDULE_ALIASES:
            raise ConfigError(f'{where} schedule = "{expression}": unknown shortcut; use one of '
                              f'{", ".join(SCHEDULE_ALIASES)}.')
        return text
    if len(text.split()) != 5 or not croniter.is_valid(text):
        raise ConfigError(f'{where} schedule = "{expression}": expected five cron fields in UTC (minute hour '
                          'day-of-month month day-of-week), e.g. "*/15 * * * *", or a shortcut like "@hourly".')
    return text


def validate_function_setting(key: str, value: Any, where: str) -> Any:
    """Check one per-function setting's type; shared by config files and a module's `config`."""
    if key == "background":
        if not isinstance(value, bool):
            raise ConfigError(f"{where} background = {value!r}: expected true or false.")
        return value
    if key == "timeout":
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ConfigError(f"{where} timeout = {value!r}: expected a number of seconds > 0, e.g. timeout = 30.")
        return float(value)
    if key in RETRY_KEYS:
        return validate_retry_setting(key, value, where)
    if key in LIMIT_KEYS:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where} {key} = {value!r}: expected a whole number >= 1, e.g. {key} = 10.")
        return value
    if key == "schedule":
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f'{where} schedule = {value!r}: expected a cron expression, e.g. "@hourly".')
        return validate_schedule(value, where)
    return value
