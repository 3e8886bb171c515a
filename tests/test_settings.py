"""Server settings: one table, precedence default < environment < flag, and the README documents each."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest

from bgfn import defaults
from bgfn.errors import ConfigError
from bgfn.settings import SETTINGS, Settings
from tests.helpers import ROOT


def test_defaults_come_from_the_defaults_module() -> None:
    settings = Settings.load(environ={})
    assert settings == Settings()
    assert (settings.bind, settings.web_workers, settings.web_threads, settings.worker_processes) == (
        defaults.BIND, defaults.WEB_WORKERS, defaults.WEB_THREADS, defaults.WORKER_PROCESSES)
    assert (settings.queue, settings.sync_timeout, settings.background_timeout, settings.retry_delays) == (
        defaults.QUEUE, defaults.SYNC_TIMEOUT, defaults.BACKGROUND_TIMEOUT, defaults.RETRY_DELAYS)
    assert settings.log_level == defaults.LOG_LEVEL
    assert settings.redis_url is None
    assert settings.dev is False
    assert settings.trusted_proxies == ()


def test_the_table_covers_every_field_once() -> None:
    names = [s.name for s in SETTINGS]
    assert sorted(names) == sorted(Settings.__dataclass_fields__)
    envs = [s.env for s in SETTINGS]
    assert len(set(envs)) == len(envs)
    assert all(e == "REDIS_URL" or e.startswith("BGFN_") for e in envs)


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.env)
def test_every_example_is_valid_and_read_from_the_environment(setting: object) -> None:
    from bgfn.settings import Setting

    assert isinstance(setting, Setting)
    env, _, raw = setting.example.partition("=")
    assert env == setting.env
    loaded = Settings.load(environ={env: raw})
    assert getattr(loaded, setting.name) == setting.parse(raw)


def test_environment_values_are_parsed() -> None:
    settings = Settings.load(environ={
        "REDIS_URL": "redis://h:1/2", "BGFN_BIND": "0.0.0.0:9000", "BGFN_WEB_WORKERS": "3",
        "BGFN_SYNC_TIMEOUT": "2.5", "BGFN_RETRY_DELAYS": "1, 2,3", "BGFN_DEV": "Yes",
        "BGFN_TRUSTED_PROXIES": "127.0.0.1, 10.0.0.0/8", "BGFN_LOG_LEVEL": "debug", "BGFN_SITE": "some/site",
    })
    assert settings.redis_url == "redis://h:1/2"
    assert settings.bind == "0.0.0.0:9000"
    assert settings.web_workers == 3
    assert settings.sync_timeout == 2.5
    assert settings.retry_delays == (1, 2, 3)
    assert settings.dev is True
    assert settings.trusted_proxies == (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"))
    assert settings.log_level == "DEBUG"
    assert settings.site == Path("some/site")


def test_precedence_default_then_environment_then_flag() -> None:
    env = {"BGFN_BIND": "127.0.0.1:1111", "BGFN_QUEUE": "from-env", "BGFN_WEB_THREADS": "7"}
    settings = Settings.load({"bind": "127.0.0.1:2222", "web_threads": None, "web_workers": 5}, environ=env)
    assert settings.bind == "127.0.0.1:2222"  # flag beats environment
    assert settings.queue == "from-env"  # environment beats default
    assert settings.web_threads == 7  # a None flag is unset: the environment stays
    assert settings.web_workers == 5  # an already-typed flag is taken as is
    assert settings.worker_processes == defaults.WORKER_PROCESSES


def test_process_environment_is_read_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BGFN_QUEUE", "shell-queue")
    assert Settings.load().queue == "shell-queue"


def test_empty_environment_variable_is_unset_except_retry_delays() -> None:
    settings = Settings.load(environ={"BGFN_BIND": "", "BGFN_WEB_WORKERS": "  ", "BGFN_RETRY_DELAYS": ""})
    assert settings.bind == defaults.BIND
    assert settings.web_workers == defaults.WEB_WORKERS
    assert settings.retry_delays == ()  # empty means no retries


@pytest.mark.parametrize(("env", "raw", "message"), [
    ("BGFN_WEB_WORKERS", "0", "environment variable BGFN_WEB_WORKERS is '0': expected a whole number >= 1. "
                              "Fix it, e.g. BGFN_WEB_WORKERS=4"),
    ("BGFN_WEB_THREADS", "four", "environment variable BGFN_WEB_THREADS is 'four': expected a whole number >= 1. "
                                 "Fix it, e.g. BGFN_WEB_THREADS=4"),
    ("BGFN_SYNC_TIMEOUT", "-1", "environment variable BGFN_SYNC_TIMEOUT is '-1': expected a number of seconds > 0. "
                                "Fix it, e.g. BGFN_SYNC_TIMEOUT=30"),
    ("BGFN_SYNC_TIMEOUT", "nan", "environment variable BGFN_SYNC_TIMEOUT is 'nan': expected a number of seconds > 0. "
                                 "Fix it, e.g. BGFN_SYNC_TIMEOUT=30"),
    ("BGFN_SYNC_TIMEOUT", "inf", "environment variable BGFN_SYNC_TIMEOUT is 'inf': expected a number of seconds > 0. "
                                 "Fix it, e.g. BGFN_SYNC_TIMEOUT=30"),
    ("BGFN_BACKGROUND_TIMEOUT", "1.5", "environment variable BGFN_BACKGROUND_TIMEOUT is '1.5': expected a whole "
                                       "number of seconds >= 1. Fix it, e.g. BGFN_BACKGROUND_TIMEOUT=900"),
    ("BGFN_DEV", "maybe", "environment variable BGFN_DEV is 'maybe': expected true or false. "
                          "Fix it, e.g. BGFN_DEV=true"),
    ("BGFN_BIND", "8888", "environment variable BGFN_BIND is '8888': expected HOST:PORT. "
                          "Fix it, e.g. BGFN_BIND=127.0.0.1:8888"),
    ("BGFN_BIND", "localhost:99999", "environment variable BGFN_BIND is 'localhost:99999': expected HOST:PORT. "
                                     "Fix it, e.g. BGFN_BIND=127.0.0.1:8888"),
    ("BGFN_RETRY_DELAYS", "60,-1", "environment variable BGFN_RETRY_DELAYS is '60,-1': expected comma-separated "
                                   "whole seconds (or empty). Fix it, e.g. BGFN_RETRY_DELAYS=60,120"),
    ("BGFN_RETRY_DELAYS", "1m", "environment variable BGFN_RETRY_DELAYS is '1m': expected comma-separated "
                                "whole seconds (or empty). Fix it, e.g. BGFN_RETRY_DELAYS=60,120"),
    ("BGFN_TRUSTED_PROXIES", "10.0.0.300", "environment variable BGFN_TRUSTED_PROXIES is '10.0.0.300': expected "
                                           "comma-separated IPs or CIDRs. Fix it, e.g. "
                                           "BGFN_TRUSTED_PROXIES=127.0.0.1,10.0.0.0/8"),
    ("BGFN_LOG_LEVEL", "loud", "environment variable BGFN_LOG_LEVEL is 'loud': expected DEBUG, INFO, WARNING or "
                               "ERROR. Fix it, e.g. BGFN_LOG_LEVEL=INFO"),
])
def test_bad_environment_value_names_variable_value_expectation_and_fix(env: str, raw: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.load(environ={env: raw})
    assert str(info.value) == message


def test_bad_flag_value_names_the_option() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.load({"bind": "nowhere"}, environ={"BGFN_BIND": "127.0.0.1:1"})
    assert str(info.value) == "option --bind is 'nowhere': expected HOST:PORT. Fix it, e.g. BGFN_BIND=127.0.0.1:8888"


def test_as_environ_reproduces_the_settings_in_a_child() -> None:
    settings = Settings.load(environ={
        "BGFN_SITE": "/srv/site", "REDIS_URL": "redis://r:6379/1", "BGFN_BIND": "[::1]:8000", "BGFN_DEV": "true",
        "BGFN_RETRY_DELAYS": "5,10", "BGFN_TRUSTED_PROXIES": "10.0.0.0/8,::1", "BGFN_SYNC_TIMEOUT": "1.5",
        "BGFN_LOG_LEVEL": "warning",
    })
    assert Settings.load(environ=settings.as_environ()) == settings
    no_retries = Settings(retry_delays=(), redis_url=None)
    assert "REDIS_URL" not in no_retries.as_environ()
    assert Settings.load(environ=no_retries.as_environ()) == no_retries


# --- documentation --------------------------------------------------------------------------------


def test_every_setting_is_in_the_readme_settings_table() -> None:
    readme = ROOT / "README.md"
    assert readme.is_file(), "README.md is missing: it must document every setting"
    text = readme.read_text(encoding="utf-8")
    table_rows = [line for line in text.splitlines() if line.lstrip().startswith("|")]
    missing = [s.env for s in SETTINGS if not any(f"`{s.env}`" in row for row in table_rows)]
    assert missing == [], f"settings missing from README.md's settings table: {missing}"
    for setting in SETTINGS:
        if setting.flag is not None:
            row = next(row for row in table_rows if f"`{setting.env}`" in row)
            assert re.search(rf"`[^`]*{re.escape(setting.flag)}\b[^`]*`", row), (setting.env, setting.flag, row)


def test_every_flag_named_in_the_table_exists_on_the_cli() -> None:
    from click.testing import CliRunner

    from bgfn.cli import main

    helps = {name: CliRunner().invoke(main, [name, "--help"]).output for name in ("serve", "worker")}
    top = CliRunner().invoke(main, ["--help"]).output
    for setting in SETTINGS:
        if setting.flag is None:
            continue
        pattern = re.compile(rf"(^|[\s,]){re.escape(setting.flag)}\b", re.M)
        assert any(pattern.search(text) for text in (top, *helps.values())), setting.flag
