"""Netlify parity: rewrites to functions and the site's environment (CONTRACT §2, §9)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from bgfn.config import load_site
from bgfn.discovery import load_registry
from bgfn.environment import apply, site_environment
from bgfn.errors import ConfigError
from bgfn.redirects import load_rewrites, match
from bgfn.settings import Settings
from tests.conftest import run_worker_burst
from tests.helpers import bgfn_command, bgfn_env, http

RULES = {"redirects": [
    {"from": "/api/*", "to": "/.netlify/functions/api/:splat", "status": 200},
    {"from": "/items/:id/:action", "to": "/.netlify/functions/:action", "status": 200, "force": True},
    {"from": "/old", "to": "/new", "status": 301},
    {"from": "/proxy/*", "to": "https://example.com/:splat", "status": 200},
    {"from": "/geo", "to": "/.netlify/functions/geo", "status": 200, "conditions": {"Country": ["US"]}},
    {"from": "/q", "to": "/.netlify/functions/q", "status": 200, "query": {"id": ":id"}},
]}


def test_rewrite_rules_compile_and_match() -> None:
    rewrites, ignored = load_rewrites(RULES, "netlify.toml")
    assert [r.source for r in rewrites] == ["/api/*", "/items/:id/:action"]
    assert match(rewrites, "/api/a/b") == "/.netlify/functions/api/a/b"
    assert match(rewrites, "/api/") == "/.netlify/functions/api/"
    assert match(rewrites, "/items/7/archive") == "/.netlify/functions/archive"
    assert match(rewrites, "/items/7/archive/") == "/.netlify/functions/archive"
    assert match(rewrites, "/items/7") is None
    assert match(rewrites, "/elsewhere") is None
    assert len(ignored) == 4
    assert "[[redirects]] /old -> /new (status 301): not a rewrite to a function, ignored" in ignored[0]
    assert "conditions or query" in ignored[2] and "conditions or query" in ignored[3]


def test_a_malformed_rule_names_the_file_and_the_rule() -> None:
    with pytest.raises(ConfigError, match=r"netlify.toml: \[\[redirects\]\] rule 1 needs `from` and `to`"):
        load_rewrites({"redirects": [{"from": "/a"}]}, "netlify.toml")


TOML = """
    [functions]
    directory = "functions"

    [build.environment]
    SHARED = "from-build"
    ONLY_BUILD = "build"
    NUMBER = 3

    [context.production.environment]
    SHARED = "from-production"

    [context.dev.environment]
    SHARED = "from-dev"

    [[redirects]]
    from = "/env/*"
    to = "/.netlify/functions/env"
    status = 200
"""

ENV_FUNCTIONS = {
    "functions/env.py": """
        import json, os
        AT_IMPORT = os.environ.get("SHARED")
        def handler(event, context):
            names = ("SHARED", "ONLY_BUILD", "NUMBER", "FROM_PROCESS")
            return {"statusCode": 200, "body": json.dumps(
                {"at_import": AT_IMPORT, **{n: os.environ.get(n) for n in names}, "path": event["path"]})}
    """,
    "functions/env-background.py": """
        import json, os, pathlib
        def handler(event, context):
            pathlib.Path(os.environ["MARK_DIR"], "env.json").write_text(
                json.dumps({n: os.environ.get(n) for n in ("SHARED", "ONLY_BUILD", "FROM_PROCESS")}))
    """,
}


def test_environment_layers_build_then_context_and_the_process_wins(tmp_path: Path) -> None:
    (tmp_path / "functions").mkdir()
    (tmp_path / "netlify.toml").write_text(TOML.replace("\n    ", "\n"))
    raw = load_site(tmp_path).raw
    assert site_environment(raw, "production", "netlify.toml") == {
        "SHARED": "from-production", "ONLY_BUILD": "build", "NUMBER": "3"}
    assert site_environment(raw, "dev", "netlify.toml")["SHARED"] == "from-dev"
    assert site_environment(raw, "deploy-preview", "netlify.toml")["SHARED"] == "from-build"
    environ = {"SHARED": "from-process"}
    assert apply(site_environment(raw, "production", "netlify.toml"), environ) == ["ONLY_BUILD", "NUMBER"]
    assert environ["SHARED"] == "from-process"
    with pytest.raises(ConfigError, match=r"\[build.environment\] BAD = \{'a': 1\}: expected text"):
        site_environment({"build": {"environment": {"BAD": {"a": 1}}}}, "production", "netlify.toml")


def test_web_and_worker_processes_see_the_site_environment(make_site: Callable[..., Path],
                                                           start_server: Callable[..., str], redis_url: str,
                                                           marks: Path) -> None:
    site = make_site(ENV_FUNCTIONS, TOML)
    base = start_server(site, FROM_PROCESS="process", ONLY_BUILD="process-wins")
    answer = http(base, "GET", "/env/anything?x=1")  # through the rewrite
    assert answer.status == 200, answer.text
    seen = json.loads(answer.body)
    assert seen == {"at_import": "from-production", "SHARED": "from-production", "ONLY_BUILD": "process-wins",
                    "NUMBER": "3", "FROM_PROCESS": "process", "path": "/env/anything"}

    assert http(base, "POST", "/.netlify/functions/env-background").status == 202
    run_worker_burst(site, redis_url, MARK_DIR=str(marks), BGFN_CONTEXT="dev")
    assert json.loads((marks / "env.json").read_text()) == {"SHARED": "from-dev", "ONLY_BUILD": "build",
                                                             "FROM_PROCESS": None}


def test_check_reports_rewrites_environment_and_ignored_rules(make_site: Callable[..., Path]) -> None:
    toml = TOML + '\n[[redirects]]\nfrom = "/old"\nto = "/new"\nstatus = 301\n'
    site = make_site(ENV_FUNCTIONS, toml)
    done = subprocess.run(bgfn_command(site, "check"), env=bgfn_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "rewrite: /env/* -> /.netlify/functions/env" in done.stdout
    assert "context: production; environment set from the site: SHARED, ONLY_BUILD, NUMBER" in done.stdout
    assert "warning: [[redirects]] /old -> /new (status 301): not a rewrite to a function, ignored" in done.stdout


def test_in_code_config_yields_to_the_files_and_check_reports_the_conflict(make_site: Callable[..., Path]) -> None:
    site = make_site({
        "functions/sync-background.py": """
            config = {"retry_backoff": {"base": 5}, "timeout": 10, "background": True}
            def handler(event, context):
                pass
        """,
        "bgfn.toml": """
            [functions."sync-*"]
            retry_delays = [1, 2]
            [functions."sync-background"]
            timeout = 20
        """,
    })
    done = subprocess.run(bgfn_command(site, "check"), env=bgfn_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok: sync-background (background, timeout 20 s)" in done.stdout
    assert ("warning: functions/sync-background.py: config['timeout'] = 10.0 is overridden by the site's "
            "configuration (timeout = 20.0); the configuration file wins") in done.stdout
    registry, _ = load_registry(load_site(site), Settings(site=site))
    policy = registry.get("sync-background").retry
    assert (policy.backoff, policy.job_delays()) == (None, [1, 2])  # the file's choice replaced the module's
