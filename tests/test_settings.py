import os
import subprocess
import sys
from pathlib import Path

import pytest

from runner.errors import ConfigError
from runner.settings import Settings, parse_url, quit_urls_from_env, variables


def settings(monkeypatch, **env) -> Settings:
    for name, _, _ in variables():
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings.from_env()


def test_defaults(monkeypatch):
    s = settings(monkeypatch, DATABASE_URL="postgresql://u:p@h/db")
    assert (s.wait_timeout, s.lock_timeout, s.lock_key, s.allow_multiple_heads) == (60, 300, None, False)
    assert s.alembic_config == Path("alembic.ini") and s.log_level == "INFO" and s.log_format is None
    assert s.application_name == "migration-runner" and s.version_table == "alembic_version"


def test_values_are_read_from_their_variables(monkeypatch):
    s = settings(monkeypatch, DATABASE_URL="postgresql://u:p@h/db", MIGRATE_WAIT_TIMEOUT="2.5",
                 MIGRATE_LOCK_KEY="-9223372036854775808", MIGRATE_ALLOW_MULTIPLE_HEADS="yes",
                 MIGRATE_LOG_LEVEL="debug", MIGRATE_LOG_FORMAT="JSON", MIGRATE_BASELINE_REVISION="abc")
    assert (s.wait_timeout, s.lock_key, s.allow_multiple_heads) == (2.5, -2**63, True)
    assert (s.log_level, s.log_format, s.baseline_revision) == ("DEBUG", "json", "abc")


def test_empty_variables_count_as_unset(monkeypatch):
    s = settings(monkeypatch, DATABASE_URL="postgresql://u:p@h/db", MIGRATE_LOCK_KEY="", MIGRATE_WAIT_TIMEOUT="")
    assert s.lock_key is None and s.wait_timeout == 60


@pytest.mark.parametrize("name, value", [
    ("MIGRATE_WAIT_TIMEOUT", "-3"), ("MIGRATE_LOCK_KEY", "1.5"), ("MIGRATE_LOG_LEVEL", "loud"),
    ("MIGRATE_APPLICATION_NAME", "x" * 64), ("MIGRATE_DDL_LOCK_RETRIES", "-1"), ("MIGRATE_STATEMENT_TIMEOUT", "0"),
])
def test_invalid_values_name_the_variable_in_one_line(monkeypatch, name, value):
    with pytest.raises(ConfigError) as error:
        settings(monkeypatch, DATABASE_URL="postgresql://u:p@h/db", **{name: value})
    assert str(error.value).startswith(name) and "\n" not in str(error.value)


def test_exactly_one_url_source(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="both set"):
        settings(monkeypatch, DATABASE_URL="postgresql://u:p@h/db", DATABASE_URL_FILE=str(tmp_path / "f")).url()
    # Commands that need no database (heads) run without either.
    without = settings(monkeypatch)
    with pytest.raises(ConfigError, match="set DATABASE_URL or DATABASE_URL_FILE"):
        without.url()


def test_url_file_is_stripped(monkeypatch, tmp_path):
    (tmp_path / "url").write_text("postgres://u:p%40ss@h:6543/db\n")
    url = settings(monkeypatch, DATABASE_URL_FILE=str(tmp_path / "url")).url()
    assert (url.drivername, url.password, url.port, url.database) == ("postgresql+psycopg", "p@ss", 6543, "db")


@pytest.mark.parametrize("raw, words", [
    ("", "empty"), ("mysql://u:topsecret@h/db", "unsupported scheme"), ("postgresql://u:topsecret@h", "no database"),
    ("::::topsecret", "not a PostgreSQL URL"),
])
def test_bad_urls_never_echo_the_password(raw, words):
    with pytest.raises(ConfigError) as error:
        parse_url(raw)
    assert words in str(error.value) and "topsecret" not in str(error.value)


def test_every_variable_has_a_description():
    rows = variables()
    assert len({name for name, _, _ in rows}) == len(rows)
    assert all(meaning for _, _, meaning in rows)


def test_quit_urls_are_split_on_whitespace_and_commas(monkeypatch):
    s = settings(monkeypatch, MIGRATE_QUIT_URLS=" http://127.0.0.1:15020/quitquitquit,\nHTTPS://[::1]:9091/q , ")
    assert s.quit_url_list() == ["http://127.0.0.1:15020/quitquitquit", "HTTPS://[::1]:9091/q"]
    assert settings(monkeypatch).quit_url_list() == []


@pytest.mark.parametrize("raw", [
    "ftp://u:topsecret@h/quit", "127.0.0.1:15020/quitquitquit", "http://u:topsecret@/quit",
    "http://u:topsecret@h:99999/quit", "http://u:topsecret@h:0/quit", "u:topsecret@h:15020",
])
def test_a_quit_url_that_is_not_http_exits_2_without_echoing_it(monkeypatch, raw):
    with pytest.raises(ConfigError) as error:
        settings(monkeypatch, MIGRATE_QUIT_URLS=f"http://h/ok {raw}")
    message = str(error.value)
    assert message.startswith("MIGRATE_QUIT_URLS: URL 2 ") and "topsecret" not in message and "\n" not in message


def test_quit_urls_are_read_on_their_own_when_the_settings_are_invalid(monkeypatch):
    monkeypatch.setenv("MIGRATE_QUIT_URLS", "http://h:1/a ftp://h/b,https://h/c")
    assert quit_urls_from_env() == ["http://h:1/a", "https://h/c"]
    monkeypatch.delenv("MIGRATE_QUIT_URLS")
    assert quit_urls_from_env() == []


def test_an_ipv6_address_in_a_multi_host_list_is_a_config_error_not_a_crash():
    with pytest.raises(ConfigError, match="IPv6") as caught:
        parse_url("postgresql://u:secret-pw@/d?host=[::1]:5432&host=[::2]:5433")
    assert "secret-pw" not in str(caught.value)


@pytest.mark.parametrize("given", [None, "logfire"])
def test_pydantic_plugins_are_left_for_the_projects_models(given):
    # The runner builds its settings without looking pydantic's plugins up (a scan of every installed
    # distribution), and leaves PYDANTIC_DISABLE_PLUGINS as it was: the project's first model looks them up.
    code = """if True:
        import os, runner.settings
        import pydantic.plugin._loader as loader
        print(os.environ.get("PYDANTIC_DISABLE_PLUGINS"), loader._plugins)
        from pydantic import BaseModel
        class Project(BaseModel):
            name: str
        print(loader._plugins is not None or os.environ.get("PYDANTIC_DISABLE_PLUGINS") is not None)
    """
    env = {k: v for k, v in os.environ.items() if k != "PYDANTIC_DISABLE_PLUGINS"}
    if given:
        env["PYDANTIC_DISABLE_PLUGINS"] = given
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == [f"{given} None", "True"], out
