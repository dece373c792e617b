import os

from sqlalchemy.engine import make_url

from runner import database


def test_libpq_defaults_do_not_override_the_users_choices():
    url = database.with_defaults(make_url("postgresql+psycopg://u@h/db?connect_timeout=3&sslmode=require"))
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


def test_one_engine_per_url_and_options_set_later_reach_its_next_connection(database_url, monkeypatch):
    # The engine is shared by the wait, the lock and the migration: options set
    # after its first connection (once the server version is known) must still
    # reach every later one, because libpq reads them at each connect.
    monkeypatch.setenv("PGAPPNAME", "")
    monkeypatch.setenv("PGOPTIONS", "")
    url = make_url(database_url).set(drivername="postgresql+psycopg")
    engine = database.engine(url)
    assert database.engine(url) is engine
    assert database.engine(url.set(database="other")) is not engine
    with engine.connect() as connection:
        before = connection.exec_driver_sql("SHOW statement_timeout").scalar_one()
    database.set_session_options("engine-test", statement_timeout=4321)
    with engine.connect() as connection:
        after = connection.exec_driver_sql("SELECT current_setting('statement_timeout'), "
                                           "current_setting('application_name')").one()
    assert before == "0" and tuple(after) == ("4321ms", "engine-test")
