"""Finding and importing function modules (CONTRACT §1).

Only direct children of the functions directory count: `NAME.py`, or a folder `NAME/` holding
`NAME.py` or `index.py` (a folder wins over a file of the same name). Names starting with `_` or
`.` are helpers, never functions. Each module is imported once per process.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import sys
import traceback
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bgfn.config import LIMIT_KEYS, SiteConfig, overlay, validate_function_setting
from bgfn.errors import ConfigError, FunctionLoadError, FunctionNotFound
from bgfn.retry import RETRY_KEYS, RetryPolicy, default_policy, policy_from_settings
from bgfn.settings import Settings

NAME_RULE = re.compile(r"^[A-Za-z0-9_-]+$")
BACKGROUND_SUFFIX = "-background"
MODULE_PREFIX = "bgfn_functions"
CODE_CONFIG_KEYS = frozenset({"background", "schedule", "timeout"}) | RETRY_KEYS | LIMIT_KEYS


@dataclass(frozen=True)
class FunctionSource:
    """A function found on disk, not imported yet."""

    name: str
    path: Path


@dataclass(frozen=True)
class Function:
    """A loaded function, ready to invoke."""

    name: str
    path: Path
    handler: Callable[..., Any]
    is_async: bool
    background: bool
    timeout: float
    settings: dict[str, Any] = field(default_factory=dict)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    conflicts: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return "background" if self.background else "sync"


@dataclass
class Registry:
    """Every function of a site, by name."""

    functions: dict[str, Function] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def get(self, name: str) -> Function:
        try:
            return self.functions[name]
        except KeyError:
            raise FunctionNotFound(f"no function named {name!r}: `bgfn list` shows this site's functions "
                                   "(names are case-sensitive).") from None

    def __contains__(self, name: object) -> bool:
        return name in self.functions

    def __iter__(self) -> Iterator[Function]:
        return iter(sorted(self.functions.values(), key=lambda f: f.name))

    def __len__(self) -> int:
        return len(self.functions)


def find_functions(functions_dir: Path) -> tuple[list[FunctionSource], list[str]]:
    """List the functions in `functions_dir` (not imported) and notes on entries skipped."""
    found: dict[str, FunctionSource] = {}
    notes: list[str] = []
    entries = sorted(functions_dir.iterdir(), key=lambda p: (p.is_dir(), p.name))
    for entry in entries:  # files first, so a folder of the same name replaces the file
        if entry.name.startswith(("_", ".")):
            continue
        if entry.is_dir():
            name = entry.name
            module = next((entry / c for c in (f"{name}.py", "index.py") if (entry / c).is_file()), None)
            if module is None:
                notes.append(f"{entry.name}/: holds neither {name}.py nor index.py, skipped")
                continue
        elif entry.suffix == ".py":
            name, module = entry.stem, entry
        else:
            if entry.is_file():
                notes.append(f"{entry.name}: not a Python file, skipped")
            continue
        if not NAME_RULE.match(name):
            notes.append(f"{entry.name}: {name!r} is not a valid function name (letters, digits, '-' and '_' "
                         "only), skipped; rename it to serve it")
            continue
        found[name] = FunctionSource(name=name, path=module)
    return sorted(found.values(), key=lambda s: s.name), notes


def load_registry(site: SiteConfig, settings: Settings, *, collect: bool = False) -> tuple[Registry, list[str]]:
    """Import every function of the site.

    Problems (a module that cannot be imported, a missing handler, a bad `config`) raise one
    :class:`FunctionLoadError` listing all of them, unless `collect` is true: then they are returned.
    """
    registry = Registry(warnings=list(site.warnings))
    problems: list[str] = []
    if site.functions_dir is None:
        registry.warnings.append(f"no functions directory ({site.functions_dir_source})")
        return registry, problems
    sources, notes = find_functions(site.functions_dir)
    registry.warnings.extend(notes)
    _ensure_import_path(site.functions_dir)
    for source in sources:
        try:
            function = load_function(source, site, settings)
            registry.functions[source.name] = function
            registry.warnings.extend(function.conflicts)
        except FunctionLoadError as exc:
            problems.extend(exc.problems)
    if problems and not collect:
        raise FunctionLoadError(problems)
    return registry, problems


def load_function(source: FunctionSource, site: SiteConfig, settings: Settings) -> Function:
    """Import one function module and resolve its settings."""
    shown = shown_path(source.path, site.site_dir)
    module = _import(source, shown)
    handler = getattr(module, "handler", None)
    if handler is None:
        raise FunctionLoadError([f"{shown}: defines no `handler`. A function module must define "
                                 "`def handler(event, context):` (or `async def`)."])
    if not callable(handler):
        raise FunctionLoadError([f"{shown}: `handler` is a {type(handler).__name__}, not a function. "
                                 "Define `def handler(event, context):`."])
    try:
        conflicts: list[str] = []
        merged = _merge_settings(source.name, getattr(module, "config", None), shown, site, conflicts)
        retry = policy_from_settings(merged, default_policy(settings.retry_delays))
    except ConfigError as exc:
        raise FunctionLoadError([f"{shown}: {exc}" if not str(exc).startswith(shown) else str(exc)]) from None
    background = source.name.endswith(BACKGROUND_SUFFIX) or bool(merged.get("background", False))
    if background:
        timeout = min(float(merged.get("timeout", settings.background_timeout)), settings.background_timeout)
    else:
        timeout = float(merged.get("timeout", settings.sync_timeout))
    return Function(name=source.name, path=source.path, handler=handler,
                    is_async=inspect.iscoroutinefunction(handler), background=background,
                    timeout=timeout, settings=merged, retry=retry, conflicts=tuple(conflicts))


def _merge_settings(name: str, code_config: object, shown: str, site: SiteConfig,
                    conflicts: list[str]) -> dict[str, Any]:
    """The module's `config` dict first, then the site's files on top (the files win)."""
    merged: dict[str, Any] = {}
    if code_config is not None:
        if not isinstance(code_config, dict):
            raise ConfigError(f"{shown}: `config` must be a dict, e.g. config = {{\"background\": True}}; "
                              f"found {type(code_config).__name__}.")
        for key, value in code_config.items():
            if key in CODE_CONFIG_KEYS:
                merged[key] = validate_function_setting(key, value, f"{shown}: config[{key!r}]")
    from_files = site.function_settings(name)
    for key in sorted(set(merged) & set(from_files)):
        if merged[key] != from_files[key]:
            conflicts.append(f"{shown}: config[{key!r}] = {merged[key]!r} is overridden by the site's "
                             f"configuration ({key} = {from_files[key]!r}); the configuration file wins")
    return overlay(merged, from_files)


def _import(source: FunctionSource, shown: str) -> types.ModuleType:
    if MODULE_PREFIX not in sys.modules:
        root = types.ModuleType(MODULE_PREFIX)
        root.__path__ = []
        sys.modules[MODULE_PREFIX] = root
    # The name as is: replacing "-" by "_" would give `a-b` and `a_b` one module (and one helper cache).
    safe = source.name
    if source.path.parent.name == source.name and source.path.parent != source.path:
        # A folder function: make the folder a package so `from . import helper` works.
        package_name = f"{MODULE_PREFIX}.{safe}"
        package = types.ModuleType(package_name)
        package.__path__ = [str(source.path.parent)]
        sys.modules[package_name] = package
        module_name = f"{package_name}.{source.path.stem}"
    else:
        module_name = f"{MODULE_PREFIX}.{safe}"
    spec = importlib.util.spec_from_file_location(module_name, source.path)
    if spec is None or spec.loader is None:
        raise FunctionLoadError([f"{shown}: cannot be imported as a Python module."])
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        sys.modules.pop(module_name, None)
        where = f"line {exc.lineno}" + (f" of {exc.filename}" if exc.filename != str(source.path) else "")
        raise FunctionLoadError([f"{shown}: syntax error at {where}: {exc.msg}. Fix the code."]) from None
    except BaseException as exc:  # noqa: B036 - a module calling sys.exit() must not stop the server
        if isinstance(exc, KeyboardInterrupt):
            raise
        sys.modules.pop(module_name, None)
        frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        where = f" (at {frame.filename}:{frame.lineno})" if frame else ""
        hint = ("install the missing package" if isinstance(exc, ImportError)
                else "fix the code that runs at import time")
        raise FunctionLoadError([f"{shown}: importing it raised {type(exc).__name__}: {exc}{where}; {hint}."]
                                ) from None
    return module


_active_dirs: list[str] = []


def _ensure_import_path(functions_dir: Path) -> None:
    """Put the functions directory first on sys.path so `_`-prefixed helpers are importable.

    Loading another site in the same process (tests, an embedding application) forgets the helper
    modules of the one before, so `_shared` always means this site's `_shared`.
    """
    entry = str(functions_dir)
    for old in [d for d in _active_dirs if d != entry]:
        _active_dirs.remove(old)
        while old in sys.path:
            sys.path.remove(old)
        prefix = old + os.sep
        for name, module in list(sys.modules.items()):
            if (getattr(module, "__file__", None) or "").startswith(prefix) or any(
                    p.startswith(prefix) or p == old for p in getattr(module, "__path__", None) or []):
                del sys.modules[name]
    if entry in sys.path:
        sys.path.remove(entry)
    sys.path.insert(0, entry)
    if entry not in _active_dirs:
        _active_dirs.append(entry)


def shown_path(path: Path, base: Path) -> str:
    """`path` relative to `base` when it is inside it, else absolute: how files are named to users."""
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)
