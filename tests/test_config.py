"""Site configuration: netlify.toml / netlify.yaml / netlify.yml and bgfn.toml (CONTRACT §1)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from bgfn.config import BGFN_TOML_KEYS, load_site
from bgfn.errors import ConfigError


def site(root: Path, files: dict[str, str], dirs: tuple[str, ...] = ()) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    for rel in dirs:
        (root / rel).mkdir(parents=True, exist_ok=True)
    return root


def error_of(root: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_site(root)
    return str(info.value)


# --- the functions directory ----------------------------------------------------------------------


def test_functions_directory_wins_over_build_functions(tmp_path: Path) -> None:
    root = site(tmp_path, {"netlify.toml": """
        [build]
        functions = "old"
        [functions]
        directory = "new"
    """}, dirs=("old", "new"))
    config = load_site(root)
    assert config.functions_dir == (root / "new").resolve()
    assert config.functions_dir_source == "[functions] directory in netlify.toml"


def test_build_functions_is_used_without_functions_directory(tmp_path: Path) -> None:
    root = site(tmp_path, {"netlify.toml": '[build]\nfunctions = "old"\n'}, dirs=("old", "netlify/functions"))
    config = load_site(root)
    assert config.functions_dir == (root / "old").resolve()
    assert config.functions_dir_source == "[build] functions in netlify.toml"


def test_default_directory_is_netlify_functions(tmp_path: Path) -> None:
    root = site(tmp_path, {"netlify.toml": '[build]\npublish = "dist"\n'}, dirs=("netlify/functions",))
    config = load_site(root)
    assert config.functions_dir == root.resolve() / "netlify" / "functions"
    assert config.functions_dir_source == "the default netlify/functions"


def test_no_directory_at_all_is_not_an_error(tmp_path: Path) -> None:
    root = site(tmp_path, {"netlify.toml": ""})
    config = load_site(root)
    assert config.functions_dir is None
    assert config.functions_dir_source == "none: set [functions] directory in netlify.toml"


def test_no_config_file_uses_defaults_with_a_warning(tmp_path: Path) -> None:
    root = site(tmp_path, {}, dirs=("netlify/functions",))
    config = load_site(root)
    assert config.config_file is None
    assert config.functions_dir == root.resolve() / "netlify" / "functions"
    assert config.warnings == (f"no netlify.toml in {root.resolve()}: using defaults",)


def test_directory_is_relative_to_the_files_folder_not_the_cwd(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    root = site(tmp_path / "site", {"netlify.toml": '[functions]\ndirectory = "fns"\n'}, dirs=("fns",))
    (tmp_path / "elsewhere" / "fns").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert load_site(root).functions_dir == (root / "fns").resolve()


def test_missing_directory_names_file_key_value_and_fix(tmp_path: Path) -> None:
    root = site(tmp_path, {"netlify.toml": '[functions]\ndirectory = "nope"\n'})
    assert error_of(root) == (
        f"netlify.toml: [functions] directory = 'nope': folder {str(root.resolve() / 'nope')!r} does not exist. "
        "Create it or correct the path (it is relative to the file's folder)."
    )


@pytest.mark.parametrize(("toml", "shown"), [
    ("[functions]\ndirectory = 5\n", "[functions] directory = 5"),
    ('[functions]\ndirectory = ""\n', "[functions] directory = ''"),
    ("[build]\nfunctions = true\n", "[build] functions = True"),
])
def test_directory_that_is_not_text_is_refused(tmp_path: Path, toml: str, shown: str) -> None:
    message = error_of(site(tmp_path, {"netlify.toml": toml}))
    key = shown.split()[1]
    assert message == f'netlify.toml: {shown}: expected a folder path as text, e.g. {key} = "netlify/functions".'


# --- file formats -----------------------------------------------------------------------------------

YAML = """
    functions:
      directory: fns
      "send-*":
        background: true
"""


@pytest.mark.parametrize("name", ["netlify.yaml", "netlify.yml"])
def test_yaml_has_the_same_keys_as_toml(tmp_path: Path, name: str) -> None:
    root = site(tmp_path, {name: YAML}, dirs=("fns",))
    config = load_site(root)
    assert config.config_file == root.resolve() / name
    assert config.functions_dir == (root / "fns").resolve()
    assert config.function_settings("send-mail") == {"background": True}
    assert config.function_settings("other") == {}


def test_netlify_toml_is_read_before_yaml(tmp_path: Path) -> None:
    root = site(tmp_path, {"netlify.toml": '[functions]\ndirectory = "a"\n',
                           "netlify.yaml": "functions:\n  directory: b\n"}, dirs=("a", "b"))
    config = load_site(root)
    assert config.config_file is not None and config.config_file.name == "netlify.toml"
    assert config.functions_dir == (root / "a").resolve()


def test_yaml_number_as_function_name_is_a_pattern(tmp_path: Path) -> None:
    # YAML reads `404:` as an int; it used to crash fnmatch with a TypeError.
    root = site(tmp_path, {"netlify.yaml": "functions:\n  404:\n    background: true\n"})
    config = load_site(root)
    assert config.function_settings("404") == {"background": True}


def test_empty_yaml_is_an_empty_config(tmp_path: Path) -> None:
    root = site(tmp_path, {"netlify.yml": ""})
    assert load_site(root).raw == {}


def test_invalid_toml_names_the_file_and_the_line(tmp_path: Path) -> None:
    root = site(tmp_path, {"netlify.toml": '[functions]\ndirectory = "fns\n'})
    message = error_of(root)
    assert message.startswith(f"{root.resolve() / 'netlify.toml'}: not valid TOML: ")
    assert "line 2" in message
    assert message.endswith("Fix the syntax at that line.")


def test_invalid_yaml_names_the_file_and_the_line(tmp_path: Path) -> None:
    root = site(tmp_path, {"netlify.yaml": "functions:\n  directory: [fns\n"})
    message = error_of(root)
    assert message.startswith(f"{root.resolve() / 'netlify.yaml'}: not valid YAML: ")
    assert "line" in message
    assert message.endswith("Fix the syntax at that line.")


def test_yaml_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    root = site(tmp_path, {"netlify.yaml": "- functions\n- build\n"})
    assert error_of(root) == (f"{root.resolve() / 'netlify.yaml'}: expected a mapping of sections at the top "
                              "level, found list.")


def test_section_that_is_not_a_table_is_refused(tmp_path: Path) -> None:
    root = site(tmp_path, {"netlify.yaml": "functions: fns\n"})
    assert error_of(root) == "netlify.yaml: [functions] must be a section (a table), found 'fns'."


def test_missing_site_folder_says_how_to_name_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    assert error_of(missing) == (f"site folder {str(missing)!r} does not exist: run bgfn from the folder "
                                 "holding netlify.toml, or name it with --site DIR.")


# --- server settings never under [functions] --------------------------------------------------------


@pytest.mark.parametrize(("line", "shown"), [
    ("timeout = 30", "timeout = 30"),
    ('redis_url = "redis://x"', "redis_url = 'redis://x'"),
    ("workers = 4", "workers = 4"),
])
def test_server_setting_under_functions_is_refused(tmp_path: Path, line: str, shown: str) -> None:
    root = site(tmp_path, {"netlify.toml": f'[functions]\ndirectory = "fns"\n{line}\n'}, dirs=("fns",))
    assert error_of(root) == (
        f"netlify.toml: [functions] {shown}: Netlify reads unknown keys under [functions] as function names, "
        "so this would break the site on Netlify. Server settings go in BGFN_* environment variables "
        "(see `bgfn --help`), per-function settings in bgfn.toml."
    )


def test_netlify_keys_under_functions_are_accepted(tmp_path: Path) -> None:
    root = site(tmp_path, {"netlify.toml": """
        [functions]
        directory = "fns"
        node_bundler = "esbuild"
        included_files = ["data/*"]
        external_node_modules = ["x"]
    """}, dirs=("fns",))
    config = load_site(root)
    assert config.rules == ()
    assert config.warnings == ()


# --- per-function sections --------------------------------------------------------------------------

SECTIONS = """
    [functions."*"]
    background = false
    [functions."send-*"]
    background = true
    [functions."send-sms"]
    background = false
    [functions."report-?"]
    schedule = "@daily"
"""


@pytest.mark.parametrize(("name", "expected"), [
    ("hello", {"background": False}),
    ("send-mail", {"background": True}),
    ("send-sms", {"background": False}),
    ("report-1", {"background": False, "schedule": "@daily"}),
    ("report-10", {"background": False}),
    ("Send-mail", {"background": False}),  # names are case-sensitive
])
def test_most_specific_section_wins(tmp_path: Path, name: str, expected: dict[str, object]) -> None:
    config = load_site(site(tmp_path, {"netlify.toml": SECTIONS}))
    assert config.function_settings(name) == expected


def test_longer_glob_beats_shorter_glob_whatever_the_order(tmp_path: Path) -> None:
    config = load_site(site(tmp_path, {"netlify.toml": """
        [functions."ab*"]
        background = true
        [functions."a*"]
        background = false
    """}))
    assert config.function_settings("abc") == {"background": True}
    assert config.function_settings("axe") == {"background": False}


@pytest.mark.parametrize(("line", "message"), [
    ('background = "yes"', "netlify.toml: [functions.\"x\"] background = 'yes': expected true or false."),
    ("background = 1", 'netlify.toml: [functions."x"] background = 1: expected true or false.'),
    ('schedule = ""', "netlify.toml: [functions.\"x\"] schedule = '': expected a cron expression, e.g. \"@hourly\"."),
])
def test_bad_value_in_a_section_names_file_key_and_expectation(tmp_path: Path, line: str, message: str) -> None:
    root = site(tmp_path, {"netlify.toml": f'[functions."x"]\n{line}\n'})
    assert error_of(root) == message


def test_bgfn_only_key_in_netlify_toml_is_ignored_with_a_pointer_to_bgfn_toml(tmp_path: Path) -> None:
    config = load_site(site(tmp_path, {"netlify.toml": '[functions."x"]\ntimeout = 5\nnode_bundler = "zisi"\n'
                                                       'colour = "red"\n'}))
    assert config.function_settings("x") == {}
    assert config.warnings == (
        'netlify.toml: [functions."x"] timeout: ignored here; bgfn reads it from bgfn.toml (beside netlify.toml), '
        'under [functions."x"]',
        'netlify.toml: [functions."x"] colour: not used by bgfn, ignored',
    )


# --- bgfn.toml --------------------------------------------------------------------------------------


def test_bgfn_toml_gives_timeouts_and_background(tmp_path: Path) -> None:
    config = load_site(site(tmp_path, {
        "netlify.toml": '[functions."slow"]\nbackground = false\n',
        "bgfn.toml": '[functions."slow"]\ntimeout = 90\n[functions."*"]\ntimeout = 10\nbackground = true\n',
    }))
    assert config.function_settings("slow") == {"background": False, "timeout": 90.0}
    assert config.function_settings("other") == {"background": True, "timeout": 10.0}


def test_bgfn_toml_beside_a_yaml_config(tmp_path: Path) -> None:
    config = load_site(site(tmp_path, {"netlify.yml": "build:\n  publish: dist\n",
                                       "bgfn.toml": '[functions."a"]\ntimeout = 2.5\n'}))
    assert config.function_settings("a") == {"timeout": 2.5}


@pytest.mark.parametrize(("text", "message"), [
    ('[functions."x"]\ntimeot = 5\n',
     f'bgfn.toml: [functions."x"] timeot: unknown key. Known keys: {", ".join(sorted(BGFN_TOML_KEYS))}.'),
    ('[functions."x"]\ntimeout = 0\n',
     'bgfn.toml: [functions."x"] timeout = 0: expected a number of seconds > 0, e.g. timeout = 30.'),
    ('[functions."x"]\ntimeout = "30"\n',
     "bgfn.toml: [functions.\"x\"] timeout = '30': expected a number of seconds > 0, e.g. timeout = 30."),
    ('[functions."x"]\ntimeout = true\n',
     'bgfn.toml: [functions."x"] timeout = True: expected a number of seconds > 0, e.g. timeout = 30.'),
    ('[server]\nbind = "0.0.0.0:80"\n',
     "bgfn.toml: unknown section [server]; it holds only [functions.\"PATTERN\"] sections with keys "
     f"{sorted(BGFN_TOML_KEYS)}."),
    ("[functions]\ntimeout = 5\n",
     "bgfn.toml: [functions] timeout = 5: expected a section [functions.\"timeout\"] with keys "
     f"{sorted(BGFN_TOML_KEYS)}."),
])
def test_bad_bgfn_toml_names_the_key_and_the_fix(tmp_path: Path, text: str, message: str) -> None:
    assert error_of(site(tmp_path, {"netlify.toml": "", "bgfn.toml": text})) == message


def test_invalid_bgfn_toml_names_the_file(tmp_path: Path) -> None:
    root = site(tmp_path, {"netlify.toml": "", "bgfn.toml": "[functions\n"})
    assert error_of(root).startswith(f"{root.resolve() / 'bgfn.toml'}: not valid TOML: ")
