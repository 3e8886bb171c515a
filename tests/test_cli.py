"""The `bgfn` command line: CliRunner for the commands, real processes where start-up matters."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from bgfn.cli import EXIT_CODES, main
from bgfn.errors import ConfigError, FunctionLoadError, FunctionNotFound
from bgfn.redis_server import free_port
from bgfn.settings import SETTINGS
from tests.helpers import ROOT, bgfn_command, bgfn_env, http

ECHO = """
import json
def handler(event, context):
    return {"statusCode": 201, "headers": {"X-Echo": "yes", "Content-Type": "application/json"},
            "body": json.dumps({k: event[k] for k in ("httpMethod", "path", "headers", "body",
                                                      "isBase64Encoded", "rawQuery",
                                                      "queryStringParameters")}, sort_keys=True)}
"""

SITE = {
    "functions/echo.py": ECHO,
    "functions/mail-background.py": "def handler(event, context):\n    return {'sent': True}\n",
    "functions/folder/index.py": "def handler(event, context):\n    return {'statusCode': 204}\n",
    "functions/_shared/util.py": "X = 1\n",
}

BROKEN = {
    "functions/fine.py": "def handler(event, context):\n    return {'statusCode': 200}\n",
    "functions/broken.py": "import bgfn_no_such_package_xyz\n",
    "functions/nohandler.py": "X = 1\n",
}
BROKEN_CAUSE = "importing it raised ModuleNotFoundError: No module named 'bgfn_no_such_package_xyz'"


@pytest.fixture(autouse=True)
def _isolated_imports() -> Iterator[None]:
    """CliRunner runs in this process: drop function modules and helper paths after each test."""
    modules, path = set(sys.modules), list(sys.path)
    yield
    for name in set(sys.modules) - modules:
        del sys.modules[name]
    sys.path[:] = path


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


@pytest.fixture
def site(make_site: Callable[..., Path]) -> Path:
    return make_site(SITE)


@pytest.fixture
def broken(make_site: Callable[..., Path]) -> Path:
    return make_site(BROKEN)


class FakeServer:
    """Stands in for gunicorn: records what `bgfn serve` would have served."""

    started: list[FakeServer] = []

    def __init__(self, settings: Any, registry: Any, rewrites: Any = None) -> None:
        self.settings, self.registry, self.rewrites = settings, registry, rewrites

    def run(self) -> None:
        FakeServer.started.append(self)


@pytest.fixture
def fake_server(monkeypatch: pytest.MonkeyPatch) -> list[FakeServer]:
    import bgfn.server

    FakeServer.started = []
    monkeypatch.setattr(bgfn.server, "GunicornServer", FakeServer)
    return FakeServer.started


@pytest.fixture
def fake_workers(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, Any, bool]]:
    import bgfn.queue
    import bgfn.worker

    calls: list[tuple[Any, Any, bool]] = []

    def run_workers(settings: Any, registry: Any, connection: Any, *, burst: bool = False) -> None:
        calls.append((settings, registry, burst))

    monkeypatch.setattr(bgfn.queue, "connect", lambda url: object())
    monkeypatch.setattr(bgfn.worker, "run_workers", run_workers)
    return calls


def test_exit_codes() -> None:
    assert EXIT_CODES[ConfigError] == 2
    assert EXIT_CODES[FunctionNotFound] == 2
    assert EXIT_CODES[FunctionLoadError] == 3


# --- list and check ------------------------------------------------------------------------------------

LIST = """\
NAME             KIND        FILE
echo             sync        functions/echo.py
folder           sync        functions/folder/index.py
mail-background  background  functions/mail-background.py
"""


def test_list_shows_name_kind_and_file(site: Path) -> None:
    result = run("--site", str(site), "list")
    assert result.exit_code == 0, result.output
    assert result.stdout == LIST


def test_list_from_the_site_folder(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(site)
    result = run("list")
    assert result.exit_code == 0, result.output
    assert result.stdout == LIST


def test_site_flag_beats_bgfn_site(site: Path, make_site: Callable[..., Path]) -> None:
    other = make_site({"functions/other.py": "def handler(e, c):\n    return {'statusCode': 200}\n"})
    from_env = run("list", env={"BGFN_SITE": str(other)})
    assert from_env.stdout.splitlines()[1:] == ["other  sync        functions/other.py"]
    from_flag = run("--site", str(site), "list", env={"BGFN_SITE": str(other)})
    assert from_flag.stdout == LIST


def test_list_with_functions_outside_the_site(tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "netlify.toml").write_text('[functions]\ndirectory = "../fns"\n')
    (tmp_path / "fns").mkdir()
    (tmp_path / "fns" / "hi.py").write_text("def handler(e, c):\n    return {'statusCode': 200}\n")
    result = run("--site", str(tmp_path / "site"), "list")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[1] == f"hi    sync        {(tmp_path / 'fns' / 'hi.py').resolve()}"


def test_list_refuses_a_broken_site(broken: Path) -> None:
    result = run("--site", str(broken), "list")
    assert result.exit_code == 3
    assert f"functions/broken.py: {BROKEN_CAUSE}" in result.stderr


def test_check_reports_a_good_site(site: Path) -> None:
    (site / "functions" / "notes.txt").write_text("")
    result = run("--site", str(site), "check")
    assert result.exit_code == 0, result.output
    root = site.resolve()
    assert result.stdout == (
        f"config: {root / 'netlify.toml'}\n"
        f"functions directory: {root / 'functions'} ([functions] directory in netlify.toml)\n"
        "context: production; environment set from the site: (none)\n"
        "ok: echo (sync, timeout 30 s)\n"
        "ok: folder (sync, timeout 30 s)\n"
        "ok: mail-background (background, timeout 900 s)\n"
        "warning: notes.txt: not a Python file, skipped\n"
        "3 functions ok\n"
    )


def test_check_lists_every_problem_and_exits_3(broken: Path) -> None:
    result = run("--site", str(broken), "check")
    assert result.exit_code == 3
    errors = [line for line in result.stdout.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2
    assert errors[0].startswith(f"error: functions/broken.py: {BROKEN_CAUSE}")
    assert errors[1] == ("error: functions/nohandler.py: defines no `handler`. A function module must define "
                         "`def handler(event, context):` (or `async def`).")
    assert "ok: fine (sync, timeout 30 s)" in result.stdout
    assert "2 functions could not be loaded" in result.stderr


def test_check_config_error_exits_2_with_the_message(make_site: Callable[..., Path]) -> None:
    root = make_site({}, netlify_toml='[functions]\ndirectory = "functions"\nredis_url = "redis://x"\n')
    result = run("--site", str(root), "check")
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: netlify.toml: [functions] redis_url = 'redis://x': Netlify reads "
                                    "unknown keys under [functions] as function names")


def test_missing_site_folder_exits_2(tmp_path: Path) -> None:
    result = run("--site", str(tmp_path / "nope"), "check")
    assert result.exit_code == 2
    assert result.stderr == (f"Error: site folder {str(tmp_path / 'nope')!r} does not exist: run bgfn from the "
                             "folder holding netlify.toml, or name it with --site DIR.\n")


def test_bad_environment_setting_exits_2(site: Path) -> None:
    result = run("--site", str(site), "check", env={"BGFN_SYNC_TIMEOUT": "soon"})
    assert result.exit_code == 2
    assert result.stderr == ("Error: environment variable BGFN_SYNC_TIMEOUT is 'soon': expected a number of "
                             "seconds > 0. Fix it, e.g. BGFN_SYNC_TIMEOUT=30\n")


def test_help_lists_every_setting() -> None:
    result = run("--help")
    assert result.exit_code == 0
    for setting in SETTINGS:
        assert setting.env in result.output
    for command in ("serve", "worker", "dev", "check", "list", "invoke"):
        assert command in result.output


# --- invoke --------------------------------------------------------------------------------------------


def invoke_json(site: Path, *args: str) -> tuple[list[str], dict[str, Any]]:
    result = run("--site", str(site), "invoke", *args)
    assert result.exit_code == 0, result.output
    head, _, body = result.stdout.partition("\n\n")
    return head.splitlines(), json.loads(body)


def test_invoke_get_prints_status_headers_and_body(site: Path) -> None:
    head, event = invoke_json(site, "echo")
    assert head[0] == "HTTP 201 CREATED"
    assert "X-Echo: yes" in head and "Content-Type: application/json" in head
    assert event["httpMethod"] == "GET"
    assert event["path"] == "/.netlify/functions/echo"
    assert event["body"] is None
    assert event["queryStringParameters"] == {}


def test_invoke_data_makes_a_text_post(site: Path) -> None:
    _, event = invoke_json(site, "echo", "-d", "hello")
    assert (event["httpMethod"], event["body"], event["isBase64Encoded"]) == ("POST", "hello", False)
    assert event["headers"]["content-type"] == "text/plain"


def test_invoke_method_headers_path_and_query(site: Path) -> None:
    _, event = invoke_json(site, "echo", "-X", "put", "-H", "Content-Type: application/json", "-H", "X-A: 1",
                           "-H", "x-a: 2", "-d", '{"a": 1}', "--path", "items/7", "--query", "?a=1&a=2&b=")
    assert event["httpMethod"] == "PUT"
    assert event["path"] == "/.netlify/functions/echo/items/7"
    assert event["body"] == '{"a": 1}'
    assert event["headers"]["content-type"] == "application/json"
    assert event["headers"]["x-a"] == "1, 2"
    assert event["rawQuery"] == "a=1&a=2&b="
    assert event["queryStringParameters"] == {"a": "1, 2", "b": ""}


def test_invoke_data_from_a_file(site: Path, tmp_path: Path) -> None:
    payload = tmp_path / "payload.bin"
    payload.write_bytes(b"\x00\x01binary")
    _, event = invoke_json(site, "echo", "-d", f"@{payload}", "-H", "content-type: application/octet-stream")
    assert event["isBase64Encoded"] is True
    assert event["body"] == "AAFiaW5hcnk="


def test_invoke_unreadable_data_file_exits_2(site: Path, tmp_path: Path) -> None:
    result = run("--site", str(site), "invoke", "echo", "-d", f"@{tmp_path / 'nope'}")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"Error: --data '@{tmp_path / 'nope'}': cannot read the file (")


def test_invoke_bad_header_exits_2(site: Path) -> None:
    result = run("--site", str(site), "invoke", "echo", "-H", "no-colon")
    assert result.exit_code == 2
    assert result.stderr == "Error: --header 'no-colon': expected 'Name: value'.\n"


def test_invoke_unknown_function_exits_2(site: Path) -> None:
    result = run("--site", str(site), "invoke", "Echo")
    assert result.exit_code == 2
    assert result.stderr == ("Error: no function named 'Echo': `bgfn list` shows this site's functions "
                             "(names are case-sensitive).\n")


def test_invoke_no_body_status(site: Path) -> None:
    result = run("--site", str(site), "invoke", "folder")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "HTTP 204 NO CONTENT"


def test_invoke_background_function_prints_its_return_value(site: Path) -> None:
    result = run("--site", str(site), "invoke", "mail-background", "-d", "{}")
    assert result.exit_code == 0, result.output
    assert result.stdout == 'background function mail-background returned: {"sent": true}\n'


def test_invoke_handler_error_exits_1_with_json(make_site: Callable[..., Path]) -> None:
    root = make_site({"functions/boom.py": "def handler(e, c):\n    raise ValueError('bad input')\n",
                      "functions/bad.py": "def handler(e, c):\n    return {'statusCode': 'abc'}\n"})
    boom = run("--site", str(root), "invoke", "boom")
    assert boom.exit_code == 1
    assert json.loads(boom.stdout) == {"errorType": "ValueError", "errorMessage": "bad input"}
    assert "Traceback" in boom.stderr
    bad = run("--site", str(root), "invoke", "bad")
    assert bad.exit_code == 1
    assert json.loads(bad.stdout)["errorType"] == "InvalidResponse"
    assert "numerical statusCode" in json.loads(bad.stdout)["errorMessage"]


def test_invoke_imports_the_module_once(make_site: Callable[..., Path], tmp_path: Path) -> None:
    marker = tmp_path / "imports.log"
    root = make_site({"functions/once.py": f"with open({str(marker)!r}, 'a') as f:\n    f.write('x')\n"
                                           "def handler(e, c):\n    return {'statusCode': 200}\n"})
    assert run("--site", str(root), "invoke", "once").exit_code == 0
    assert marker.read_text() == "x"


# --- serve, worker, dev: start-up (the long-running part replaced) --------------------------------------


def test_serve_settings_flag_beats_environment(site: Path, fake_server: list[FakeServer]) -> None:
    result = run("--site", str(site), "serve", "--bind", "127.0.0.1:7001", "--threads", "3", "--log-level", "error",
                 env={"BGFN_BIND": "127.0.0.1:7000", "BGFN_WEB_WORKERS": "5", "BGFN_WEB_THREADS": "9",
                      "REDIS_URL": "redis://127.0.0.1:1/0"})
    assert result.exit_code == 0, result.output
    [server] = fake_server
    settings = server.settings
    assert (settings.bind, settings.web_workers, settings.web_threads, settings.log_level) == (
        "127.0.0.1:7001", 5, 3, "ERROR")
    assert settings.redis_url == "redis://127.0.0.1:1/0"
    assert [f.name for f in server.registry] == ["echo", "folder", "mail-background"]


def test_serve_needs_redis_for_background_functions(site: Path, fake_server: list[FakeServer]) -> None:
    result = run("--site", str(site), "serve")
    assert result.exit_code == 2
    assert result.stderr == ("Error: REDIS_URL is not set, but background functions need Redis (mail-background). "
                             "Set REDIS_URL=redis://HOST:PORT/0, or run `bgfn dev`, which starts an embedded "
                             "Redis.\n")
    assert fake_server == []


def test_serve_without_background_functions_needs_no_redis(make_site: Callable[..., Path],
                                                           fake_server: list[FakeServer]) -> None:
    root = make_site({"functions/echo.py": ECHO})
    result = run("--site", str(root), "serve")
    assert result.exit_code == 0, result.output
    assert len(fake_server) == 1


@pytest.mark.parametrize(("args", "message"), [
    (["--workers", "0"], "Error: option --workers is 0: expected a whole number >= 1.\n"),
    (["--threads", "-2"], "Error: option --threads is -2: expected a whole number >= 1.\n"),
    (["--bind", "8080"], "Error: option --bind is '8080': expected HOST:PORT. Fix it, e.g. BGFN_BIND=127.0.0.1:8888\n"),
    (["--log-level", "loud"], "Error: option --log-level is 'loud': expected DEBUG, INFO, WARNING or ERROR. "
                              "Fix it, e.g. BGFN_LOG_LEVEL=INFO\n"),
])
def test_serve_bad_flag_exits_2(site: Path, fake_server: list[FakeServer], args: list[str], message: str) -> None:
    result = run("--site", str(site), "serve", *args, env={"REDIS_URL": "redis://127.0.0.1:1/0"})
    assert result.exit_code == 2
    assert result.stderr == message
    assert fake_server == []


def test_serve_refuses_a_broken_function(broken: Path, fake_server: list[FakeServer]) -> None:
    result = run("--site", str(broken), "serve")
    assert result.exit_code == 3
    assert f"functions/broken.py: {BROKEN_CAUSE}" in result.stderr
    assert fake_server == []


def test_worker_needs_redis_url(site: Path, fake_workers: list[Any]) -> None:
    result = run("--site", str(site), "worker")
    assert result.exit_code == 2
    assert result.stderr == ("Error: REDIS_URL is not set: workers take jobs from Redis. Set "
                             "REDIS_URL=redis://HOST:PORT/0 (the same as the web server's).\n")
    assert fake_workers == []


def test_worker_settings_and_burst(site: Path, fake_workers: list[Any]) -> None:
    result = run("--site", str(site), "worker", "--burst", "-n", "2", "--queue", "q2",
                 env={"REDIS_URL": "redis://127.0.0.1:1/0", "BGFN_QUEUE": "q1", "BGFN_WORKER_PROCESSES": "4"})
    assert result.exit_code == 0, result.output
    [(settings, registry, burst)] = fake_workers
    assert (settings.worker_processes, settings.queue, burst) == (2, "q2", True)
    assert "mail-background" in registry


def test_worker_refuses_a_broken_function(broken: Path, fake_workers: list[Any]) -> None:
    result = run("--site", str(broken), "worker", env={"REDIS_URL": "redis://127.0.0.1:1/0"})
    assert result.exit_code == 3
    assert f"functions/broken.py: {BROKEN_CAUSE}" in result.stderr
    assert fake_workers == []


def test_dev_refuses_a_broken_function_before_starting_anything(broken: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import bgfn.dev

    started: list[object] = []
    monkeypatch.setattr(bgfn.dev, "DevSupervisor", lambda settings, site: started.append(settings))
    result = run("--site", str(broken), "dev")
    assert result.exit_code == 3
    assert f"functions/broken.py: {BROKEN_CAUSE}" in result.stderr
    assert started == []


# --- real processes --------------------------------------------------------------------------------------


def test_python_m_bgfn_check(site: Path, broken: Path) -> None:
    good = subprocess.run(bgfn_command(site, "check"), env=bgfn_env(), capture_output=True, text=True, timeout=60)
    assert good.returncode == 0, good.stderr
    assert good.stdout.endswith("3 functions ok\n")
    bad = subprocess.run(bgfn_command(broken, "check"), env=bgfn_env(), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 3
    assert f"error: functions/broken.py: {BROKEN_CAUSE}" in bad.stdout
    assert "error: functions/nohandler.py: defines no `handler`" in bad.stdout


def test_python_m_bgfn_names_itself_bgfn() -> None:
    done = subprocess.run([sys.executable, "-m", "bgfn", "--help"], env=bgfn_env(), capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert done.returncode == 0
    assert done.stdout.startswith("Usage: bgfn [OPTIONS] COMMAND [ARGS]...")


def test_real_serve_exits_before_binding_on_a_broken_function(broken: Path) -> None:
    port = free_port()
    done = subprocess.run(bgfn_command(broken, "serve", "--bind", f"127.0.0.1:{port}"),
                          env=bgfn_env(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stdout + done.stderr
    assert f"functions/broken.py: {BROKEN_CAUSE}" in done.stderr
    assert "functions/nohandler.py: defines no `handler`" in done.stderr
    assert "Listening at" not in done.stdout + done.stderr  # gunicorn never started


def test_real_worker_exits_on_a_broken_function(broken: Path) -> None:
    done = subprocess.run(bgfn_command(broken, "worker"), env=bgfn_env(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stdout + done.stderr
    assert f"functions/broken.py: {BROKEN_CAUSE}" in done.stderr


def test_real_serve_imports_each_module_once_per_process(make_site: Callable[..., Path], tmp_path: Path,
                                                         start_server: Callable[..., str]) -> None:
    marker = tmp_path / "imports.log"
    root = make_site({"functions/pid.py": f"""
        import os
        with open({str(marker)!r}, "a") as log:
            log.write(f"{{os.getpid()}}\\n")
        def handler(event, context):
            return {{"statusCode": 200, "body": str(os.getpid())}}
    """})
    base = start_server(root, "--workers", "2")
    first = marker.read_text().split()
    answers = {http(base, "GET", "/.netlify/functions/pid").text for _ in range(8)}
    imports = marker.read_text().split()
    assert imports == first  # no import per request
    assert len(imports) == len(set(imports)) >= 1  # at most once in any process
    assert answers and all(a.isdigit() for a in answers)
