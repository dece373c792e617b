import os

from sqlalchemy.engine import make_url

from runner import database, sessions


def test_libpq_defaults_do_not_override_the_users_choices():
    url = sessions.with_defaults(make_url("postgresql+psycopg://u@h/db?connect_timeout=3&sslmode=require"))
    assert url.query["connect_timeout"] == "3" and url.query["sslmode"] == "require"
    assert url.query["keepalives"] == "1" and url.query["tcp_user_timeout"] == "30000"


def test_endpoint_names_host_and_port_without_credentials():
    assert database.endpoint(make_url("postgresql://u:secret@db.internal:6543/x")) == "db.internal:6543"
    assert database.endpoint(make_url("postgresql://u:secret@/x?host=/run/pg")) == "/run/pg:5432"


def test_session_options_reach_libpq_through_the_environment(monkeypatch):
    # setenv records the original (absent) value, so teardown removes what the code sets.
    monkeypatch.setenv("PGAPPNAME", "")
    monkeypatch.setenv("PGOPTIONS", "")
    monkeypatch.setattr(database, "_USER_PGOPTIONS", "-c search_path=app")
    database.set_session_options("my-app", statement_timeout=1500, lock_timeout=None)
    assert os.environ["PGAPPNAME"] == "my-app"
    assert os.environ["PGOPTIONS"] == "-c search_path=app -c statement_timeout=1500"


def test_options_set_later_reach_the_runners_next_session(database_url, monkeypatch):
    # Options set after the first session (once the server version is known) must reach every
    # later one, because libpq reads them at each connect.
    monkeypatch.setenv("PGAPPNAME", "")
    monkeypatch.setenv("PGOPTIONS", "")
    url = sessions.runner_url(make_url(database_url))
    with sessions.connect(url) as session:
        before = session.execute("SHOW statement_timeout").fetchone()[0]
    database.set_session_options("session-test", statement_timeout=4321)
    with sessions.connect(url) as session:
        after = session.execute("SELECT current_setting('statement_timeout'), "
                                "current_setting('application_name')").fetchone()
        # Our libpq defaults, which the server does not see: libpq's own record of them.
        keepalive = session.info.get_parameters().get("tcp_user_timeout")
    assert before == "0" and tuple(after) == ("4321ms", "session-test") and keepalive == "30000"
