"""Bad input, generated: every rejected setting or URL is exit 2 and one line naming it, never a traceback or a password."""

from __future__ import annotations

import string
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import run_runner, runner_env
from .postgres import free_port

# Environment values cannot hold NUL, nor lone surrogates.
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30)

NOT_A_NUMBER = TEXT.filter(lambda s: not _parses(s, float) and s.strip() != "")
NEGATIVE = st.floats(max_value=-0.001, allow_nan=False, allow_infinity=False).map(repr)

INVALID = st.one_of(
    st.tuples(st.sampled_from(["MIGRATE_WAIT_TIMEOUT", "MIGRATE_LOCK_TIMEOUT", "MIGRATE_CONNECTION_CHECK_INTERVAL",
                               "MIGRATE_STATEMENT_TIMEOUT", "MIGRATE_DDL_LOCK_TIMEOUT"]),
              st.one_of(NOT_A_NUMBER, NEGATIVE)),
    st.tuples(st.sampled_from(["MIGRATE_LOCK_KEY", "MIGRATE_DDL_LOCK_RETRIES"]),
              st.one_of(TEXT.filter(lambda s: not _parses(s, int) and s.strip() != ""),
                        st.integers(min_value=2**63).map(str), st.integers(max_value=-(2**63) - 1).map(str))),
    st.tuples(st.just("MIGRATE_DDL_LOCK_RETRIES"), st.integers(min_value=101, max_value=10**6).map(str)),
    st.tuples(st.sampled_from(["MIGRATE_LOG_FORMAT", "MIGRATE_LOG_LEVEL", "MIGRATE_ALLOW_MULTIPLE_HEADS"]),
              TEXT.filter(lambda s: s.strip().lower() not in
                          {"", "text", "json", "debug", "info", "warning", "error", "true", "false", "1", "0",
                           "yes", "no", "on", "off", "t", "f", "y", "n"})),
    st.tuples(st.just("MIGRATE_APPLICATION_NAME"), st.text(string.ascii_letters, min_size=64, max_size=100)),
)


def _parses(value: str, kind) -> bool:
    try:
        kind(value.strip())
        return True
    except ValueError:
        return False


def _one_line(result, variable: str) -> None:
    assert "Traceback" not in result.output, result
    assert result.returncode == 2, result
    assert len(result.records) == 1, result
    assert variable in result.last["event"], result


PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPERTY
@given(INVALID)
def test_an_invalid_setting_is_exit_2_naming_it(project, case):
    variable, value = case
    # A closed port: any attempt to connect would show as exit 3, not 2.
    env = runner_env(f"postgresql://u:pw@127.0.0.1:{free_port()}/db", project, **{variable: value})
    _one_line(run_runner(env, timeout=30), variable)


PASSWORD = st.text(string.ascii_letters + string.digits + " %@:/#?&='\"!$", min_size=6, max_size=20).map(
    lambda s: "Pw" + s)


@st.composite
def broken_urls(draw):
    """A URL with a password, broken in one way that makes it unusable before any connection."""
    password = draw(PASSWORD)
    encoded = draw(st.sampled_from([quote(password, safe=""), password]))
    user = draw(st.sampled_from(["app", "runner", "u"]))
    database = draw(st.sampled_from(["app", "db1"]))
    port = free_port()
    flaw = draw(st.sampled_from(["scheme", "no database", "garbage", "empty", "port"]))
    if flaw == "scheme":
        scheme = draw(st.sampled_from(["mysql", "sqlite", "http", "postgresql+psycopg2x", "pg"]))
        url = f"{scheme}://{user}:{encoded}@127.0.0.1:{port}/{database}"
    elif flaw == "no database":
        url = f"postgresql://{user}:{quote(password, safe='')}@127.0.0.1:{port}" + draw(st.sampled_from(["", "/"]))
    elif flaw == "garbage":
        url = draw(st.sampled_from(["", "://", "postgresql:", "host=127.0.0.1 "])) + f"{user} {encoded} x"
    elif flaw == "empty":
        url = " "
    else:
        url = f"postgresql://{user}:{quote(password, safe='')}@127.0.0.1:" + draw(
            st.sampled_from(["port", "12ab", "1.5", "http"])) + f"/{database}"
    return url, password


@PROPERTY
@given(broken_urls())
def test_an_unusable_url_is_exit_2_naming_the_variable_and_never_the_password(project, case):
    url, password = case
    result = run_runner(runner_env(url, project, MIGRATE_WAIT_TIMEOUT="0"), timeout=30)
    _one_line(result, "DATABASE_URL")
    for form in {password, quote(password, safe=""), quote(password)}:
        assert form not in result.output, result


@pytest.mark.parametrize("port", ["-1", "70000", "99999999999"])
def test_an_out_of_range_port_is_a_configuration_error(project, port):
    url = f"postgresql://u:Pw-secret@127.0.0.1:{port}/db"
    _one_line(run_runner(runner_env(url, project, MIGRATE_WAIT_TIMEOUT="60"), timeout=30), "DATABASE_URL")


@pytest.mark.parametrize("port", ["-1", "70000", "99999999999"])
def test_an_out_of_range_port_is_refused_at_once(project, port):
    url = f"postgresql://u:Pw-secret@127.0.0.1:{port}/db"
    result = run_runner(runner_env(url, project, MIGRATE_WAIT_TIMEOUT="60"), timeout=30)
    assert result.returncode == 2 and "Traceback" not in result.output, result
    assert "port" in result.last["event"] or "DATABASE_URL" in result.last["event"], result
    assert "Pw-secret" not in result.output
