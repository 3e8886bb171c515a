"""Finding and importing functions (CONTRACT §1)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bgfn.app import create_app
from bgfn.config import load_site
from bgfn.discovery import Registry, find_functions, load_registry
from bgfn.errors import FunctionLoadError, FunctionNotFound
from bgfn.invoke import Invoker
from bgfn.settings import Settings

OK = """
def handler(event, context):
    return {"statusCode": 200, "body": __name__}
"""


@pytest.fixture(autouse=True)
def _isolated_imports() -> Iterator[None]:
    """Function modules and `_` helpers go into sys.modules / sys.path: drop them after each test
    (and helpers another test file may have left, so `_shared` is this test's own)."""
    for name in [m for m in sys.modules if m.split(".")[0] in ("_shared", "_single", "_broken")]:
        del sys.modules[name]
    modules, path = set(sys.modules), list(sys.path)
    yield
    for name in set(sys.modules) - modules:
        del sys.modules[name]
    sys.path[:] = path


def load(root: Path, *, collect: bool = False, **settings: Any) -> tuple[Registry, list[str]]:
    return load_registry(load_site(root), Settings(site=root, **settings), collect=collect)


def names(root: Path) -> list[str]:
    return [s.name for s in find_functions(root / "functions")[0]]


def call(registry: Registry, name: str) -> object:
    outcome = Invoker().invoke(registry.get(name), {"httpMethod": "GET", "path": "/"}, "req-1")
    assert outcome.ok, (outcome.error_type, outcome.error_message)
    return outcome.value


# --- what is a function -----------------------------------------------------------------------------


def test_file_and_folder_layouts(make_site: Callable[..., Path]) -> None:
    root = make_site({
        "functions/plain.py": OK,
        "functions/named/named.py": OK,
        "functions/indexed/index.py": OK,
        "functions/indexed/helper.py": OK,
    })
    sources, notes = find_functions(root / "functions")
    assert [(s.name, s.path.relative_to(root).as_posix()) for s in sources] == [
        ("indexed", "functions/indexed/index.py"),
        ("named", "functions/named/named.py"),
        ("plain", "functions/plain.py"),
    ]
    assert notes == []


def test_name_py_wins_over_index_py_in_a_folder(make_site: Callable[..., Path]) -> None:
    root = make_site({"functions/both/both.py": OK, "functions/both/index.py": OK})
    sources, _ = find_functions(root / "functions")
    assert [s.path.name for s in sources] == ["both.py"]


def test_folder_wins_over_a_file_of_the_same_name(make_site: Callable[..., Path]) -> None:
    root = make_site({"functions/same.py": OK, "functions/same/index.py": OK})
    sources, _ = find_functions(root / "functions")
    assert [(s.name, s.path.relative_to(root).as_posix()) for s in sources] == [("same", "functions/same/index.py")]


def test_underscore_and_dot_entries_are_never_functions(make_site: Callable[..., Path]) -> None:
    root = make_site({
        "functions/_private.py": OK,
        "functions/.hidden.py": OK,
        "functions/_shared/_shared.py": OK,
        "functions/_shared/index.py": OK,
        "functions/.git/.git.py": OK,
        "functions/__pycache__/index.py": OK,
        "functions/real.py": OK,
    })
    sources, notes = find_functions(root / "functions")
    assert [s.name for s in sources] == ["real"]
    assert notes == []


def test_only_direct_children_are_looked_at(make_site: Callable[..., Path]) -> None:
    root = make_site({"functions/group/deeper/deeper.py": OK, "functions/group/other.py": OK})
    sources, notes = find_functions(root / "functions")
    assert sources == []
    assert notes == ["group/: holds neither group.py nor index.py, skipped"]


def test_names_are_case_sensitive_and_may_hold_dash_and_underscore(make_site: Callable[..., Path]) -> None:
    root = make_site({"functions/Hello.py": OK, "functions/hello.py": OK, "functions/a-b_C9.py": OK})
    assert names(root) == ["Hello", "a-b_C9", "hello"]


@pytest.mark.parametrize(("entry", "name"), [
    ("my func.py", "my func"),
    ("foo.bar.py", "foo.bar"),
    ("été.py", "été"),
    ("a+b/index.py", "a+b"),
])
def test_bad_names_are_skipped_with_a_note_saying_the_fix(make_site: Callable[..., Path], entry: str,
                                                          name: str) -> None:
    root = make_site({f"functions/{entry}": OK, "functions/good.py": OK})
    sources, notes = find_functions(root / "functions")
    assert [s.name for s in sources] == ["good"]
    shown = entry.split("/")[0]
    assert notes == [f"{shown}: {name!r} is not a valid function name (letters, digits, '-' and '_' only), "
                     "skipped; rename it to serve it"]


def test_non_python_files_are_noted(make_site: Callable[..., Path]) -> None:
    root = make_site({"functions/README.md": "# hi", "functions/hello.js": "", "functions/ok.py": OK})
    registry, problems = load(root)
    assert [f.name for f in registry] == ["ok"]
    assert problems == []
    assert "README.md: not a Python file, skipped" in registry.warnings
    assert "hello.js: not a Python file, skipped" in registry.warnings


def test_no_functions_directory_is_a_warning_not_an_error(make_site: Callable[..., Path]) -> None:
    root = make_site({}, netlify_toml="")
    (root / "functions").rmdir()
    registry, problems = load(root)
    assert len(registry) == 0 and problems == []
    assert registry.warnings == ["no functions directory (none: set [functions] directory in netlify.toml)"]


# --- background, timeouts, settings -----------------------------------------------------------------


def test_background_by_suffix_by_file_config_or_by_module_config(make_site: Callable[..., Path]) -> None:
    root = make_site({
        "functions/mail-background.py": OK,
        "functions/by-toml.py": OK,
        "functions/by-code.py": 'config = {"background": True}\n' + OK,
        "functions/plain.py": OK,
    }, netlify_toml='[functions]\ndirectory = "functions"\n[functions."by-toml"]\nbackground = true\n')
    registry, _ = load(root)
    assert {f.name: f.kind for f in registry} == {
        "by-code": "background", "by-toml": "background", "mail-background": "background", "plain": "sync"}


def test_background_suffix_cannot_be_turned_off(make_site: Callable[..., Path]) -> None:
    root = make_site({"functions/job-background.py": 'config = {"background": False}\n' + OK},
                     netlify_toml='[functions]\ndirectory = "functions"\n[functions."*"]\nbackground = false\n')
    registry, _ = load(root)
    assert registry.get("job-background").background is True


def test_files_win_over_the_module_config(make_site: Callable[..., Path]) -> None:
    code = 'config = {"background": True, "timeout": 5}\n' + OK
    root = make_site({"functions/a.py": code, "functions/b.py": code, "functions/c.py": code},
                     netlify_toml='[functions]\ndirectory = "functions"\n[functions."a"]\nbackground = false\n')
    (root / "bgfn.toml").write_text('[functions."b"]\ntimeout = 7\nbackground = false\n')
    registry, _ = load(root)
    a, b, c = registry.get("a"), registry.get("b"), registry.get("c")
    assert (a.background, a.timeout) == (False, 5.0)  # netlify.toml beats config["background"]
    assert (b.background, b.timeout) == (False, 7.0)  # bgfn.toml beats both of config's keys
    assert (c.background, c.timeout) == (True, 5.0)  # no file section: the module's config
    assert c.settings == {"background": True, "timeout": 5.0}


def test_timeouts_default_from_settings_and_background_is_capped(make_site: Callable[..., Path]) -> None:
    root = make_site({"functions/s.py": OK, "functions/long-background.py": 'config = {"timeout": 5000}\n' + OK,
                      "functions/short-background.py": 'config = {"timeout": 3}\n' + OK})
    registry, _ = load(root, sync_timeout=12.0, background_timeout=600)
    assert registry.get("s").timeout == 12.0
    assert registry.get("long-background").timeout == 600.0
    assert registry.get("short-background").timeout == 3.0


def test_async_handler_is_recognised(make_site: Callable[..., Path]) -> None:
    root = make_site({"functions/a.py": "async def handler(event, context):\n    return {'statusCode': 200}\n",
                      "functions/s.py": OK})
    registry, _ = load(root)
    assert registry.get("a").is_async is True
    assert registry.get("s").is_async is False
    assert call(registry, "a") == {"statusCode": 200}


def test_unknown_function_says_how_to_list_them(make_site: Callable[..., Path]) -> None:
    registry, _ = load(make_site({"functions/hello.py": OK}))
    assert "hello" in registry and "Hello" not in registry
    with pytest.raises(FunctionNotFound) as info:
        registry.get("Hello")
    assert str(info.value) == ("no function named 'Hello': `bgfn list` shows this site's functions "
                               "(names are case-sensitive).")


# --- imports: helpers, relative imports, once per process --------------------------------------------


def test_underscore_helpers_are_importable_by_functions(make_site: Callable[..., Path]) -> None:
    root = make_site({
        "functions/_shared/__init__.py": "GREETING = 'hi from package'\n",
        "functions/_shared/util.py": "WORD = 'util'\n",
        "functions/_single.py": "VALUE = 'single'\n",
        "functions/uses.py": """
            from _shared import GREETING
            from _shared.util import WORD
            import _single
            def handler(event, context):
                return {"statusCode": 200, "body": " ".join([GREETING, WORD, _single.VALUE])}
        """,
        "functions/folder/index.py": """
            from _shared.util import WORD
            def handler(event, context):
                return {"statusCode": 200, "body": WORD}
        """,
    })
    registry, problems = load(root)
    assert problems == []
    assert call(registry, "uses") == {"statusCode": 200, "body": "hi from package util single"}
    assert call(registry, "folder") == {"statusCode": 200, "body": "util"}


def test_folder_function_uses_relative_imports(make_site: Callable[..., Path]) -> None:
    root = make_site({
        "functions/rel/rel.py": """
            from . import helper
            from .lib.deep import DEEP
            def handler(event, context):
                from .late import LATE  # an import inside the handler, at request time
                return {"statusCode": 200, "body": helper.WHO + DEEP + LATE}
        """,
        "functions/rel/helper.py": "WHO = 'helper,'\n",
        "functions/rel/lib/__init__.py": "",
        "functions/rel/lib/deep.py": "DEEP = 'deep,'\n",
        "functions/rel/late.py": "LATE = 'late'\n",
    })
    registry, _ = load(root)
    assert call(registry, "rel") == {"statusCode": 200, "body": "helper,deep,late"}


def test_dash_and_underscore_twins_keep_their_own_helpers(make_site: Callable[..., Path]) -> None:
    # `a-b` and `a_b` used to share one module name, so `a_b` got `a-b`'s helper.py.
    body = """
        from . import helper
        def handler(event, context):
            from . import late
            return {"statusCode": 200, "body": helper.WHO + "/" + late.WHO}
    """
    root = make_site({
        "functions/a-b/index.py": body, "functions/a-b/helper.py": "WHO = 'dash'\n",
        "functions/a-b/late.py": "WHO = 'dash-late'\n",
        "functions/a_b/index.py": body, "functions/a_b/helper.py": "WHO = 'underscore'\n",
        "functions/a_b/late.py": "WHO = 'underscore-late'\n",
    })
    registry, _ = load(root)
    assert call(registry, "a-b") == {"statusCode": 200, "body": "dash/dash-late"}
    assert call(registry, "a_b") == {"statusCode": 200, "body": "underscore/underscore-late"}


def test_each_module_is_imported_once_not_per_request(make_site: Callable[..., Path], tmp_path: Path) -> None:
    marker = tmp_path / "imports.log"
    root = make_site({"functions/count.py": f"""
        from pathlib import Path
        with open({str(marker)!r}, "a") as log:
            log.write("imported\\n")
        CALLS = 0
        def handler(event, context):
            global CALLS
            CALLS += 1
            return {{"statusCode": 200, "body": str(CALLS)}}
    """})
    resolved = Settings(site=root)
    registry, _ = load_registry(load_site(root), resolved)
    client = create_app(resolved, registry).test_client()
    bodies = [client.get("/.netlify/functions/count").get_data(as_text=True) for _ in range(3)]
    bodies.append(client.post("/.netlify/functions/count/sub", data="x").get_data(as_text=True))
    assert bodies == ["1", "2", "3", "4"]
    assert marker.read_text() == "imported\n"


# --- functions that cannot be loaded ------------------------------------------------------------------

BROKEN = {
    "functions/syntax.py": "def handler(event, context)\n    return 1\n",
    "functions/missing.py": "import bgfn_no_such_package_xyz\ndef handler(event, context):\n    pass\n",
    "functions/nohandler.py": "HANDLER = None\n",
    "functions/notcallable.py": "handler = 'hello'\n",
    "functions/exits.py": "import sys\nsys.exit(3)\n",
    "functions/raises.py": "x = 1\nraise RuntimeError('no database')\n",
    "functions/badconfig.py": "config = ['background']\ndef handler(event, context):\n    pass\n",
    "functions/badtimeout.py": "config = {'timeout': 0}\ndef handler(event, context):\n    pass\n",
    "functions/helper-syntax.py": "from _broken import x\ndef handler(event, context):\n    pass\n",
    "functions/_broken.py": "x = (\n",
}


def expected_problems(root: Path) -> dict[str, str]:
    fns = root.resolve() / "functions"
    return {
        "badconfig": 'functions/badconfig.py: `config` must be a dict, e.g. config = {"background": True}; found list.',
        "badtimeout": "functions/badtimeout.py: config['timeout'] timeout = 0: expected a number of seconds > 0, "
                      "e.g. timeout = 30.",
        "exits": f"functions/exits.py: importing it raised SystemExit: 3 (at {fns / 'exits.py'}:2); "
                 "fix the code that runs at import time.",
        "helper-syntax": f"functions/helper-syntax.py: syntax error at line 1 of {fns / '_broken.py'}: "
                         "'(' was never closed. Fix the code.",
        "missing": "functions/missing.py: importing it raised ModuleNotFoundError: No module named "
                   f"'bgfn_no_such_package_xyz' (at {fns / 'missing.py'}:1); install the missing package.",
        "nohandler": "functions/nohandler.py: defines no `handler`. A function module must define "
                     "`def handler(event, context):` (or `async def`).",
        "notcallable": "functions/notcallable.py: `handler` is a str, not a function. "
                       "Define `def handler(event, context):`.",
        "raises": f"functions/raises.py: importing it raised RuntimeError: no database (at {fns / 'raises.py'}:2); "
                  "fix the code that runs at import time.",
        "syntax": "functions/syntax.py: syntax error at line 1: expected ':'. Fix the code.",
    }


@pytest.mark.parametrize("name", sorted(expected_problems(Path("/x"))))
def test_each_broken_function_stops_loading_with_file_and_cause(make_site: Callable[..., Path], name: str) -> None:
    files = {k: v for k, v in BROKEN.items() if f"/{name}.py" in k or k.endswith("_broken.py")}
    root = make_site({**files, "functions/fine.py": OK})
    with pytest.raises(FunctionLoadError) as info:
        load(root)
    problem = expected_problems(root)[name]
    assert info.value.problems == [problem]
    assert str(info.value) == f"1 function could not be loaded:\n  - {problem}"


def test_collect_returns_every_problem_and_the_good_functions(make_site: Callable[..., Path]) -> None:
    root = make_site({**BROKEN, "functions/fine.py": OK})
    registry, problems = load(root, collect=True)
    assert [f.name for f in registry] == ["fine"]
    assert problems == [expected_problems(root)[n] for n in sorted(expected_problems(root))]


def test_without_collect_one_error_lists_every_problem(make_site: Callable[..., Path]) -> None:
    root = make_site({**BROKEN, "functions/fine.py": OK})
    with pytest.raises(FunctionLoadError) as info:
        load(root)
    assert len(info.value.problems) == 9
    assert str(info.value).startswith("9 functions could not be loaded:\n  - functions/badconfig.py: ")


def test_a_failed_import_leaves_no_half_module_behind(make_site: Callable[..., Path]) -> None:
    root = make_site({"functions/raises.py": BROKEN["functions/raises.py"]})
    load(root, collect=True)
    assert not [m for m in sys.modules if m.startswith("bgfn_functions.raises")]
