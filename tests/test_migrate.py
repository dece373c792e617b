import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from runner.errors import ConfigError, DatabaseUnreachable, RevisionFailed
from runner.envpy import EarlyExit
from runner.migrate import Progress, explain_failure

from .envs import DEFAULT_DRIVER

# Also run on SQLAlchemy 1.4 (python3 dev.py test-sa14).
pytestmark = pytest.mark.core


def sa_url(database_url):
    return make_url(database_url).set(drivername=f"postgresql+{DEFAULT_DRIVER}")


class FakeScript:
    """Stands in for an alembic Script: only its id and message are read."""

    revision, doc = "r0002", "add things"


def real_error(database_url, sql) -> DBAPIError:
    engine = create_engine(sa_url(database_url))
    try:
        with engine.connect() as conn:
            conn.execute(text(sql))
    except DBAPIError as e:
        return e
    finally:
        engine.dispose()
    raise AssertionError("the statement should have failed")


def test_a_database_error_names_revision_sqlstate_and_where_the_database_is(database_url):
    error = real_error(database_url, "SELECT 1/0")
    result = explain_failure(error, Progress(running=FakeScript()), lambda: ("r0001",))
    assert isinstance(result, RevisionFailed)
    assert str(result) == ("revision r0002 (add things) failed: SQLSTATE 22012: division by zero; "
                           "the database is at r0001")


def test_a_python_error_in_a_revision_is_a_failed_revision():
    result = explain_failure(ValueError("bad data"), Progress(running=FakeScript()), lambda: ())
    assert isinstance(result, RevisionFailed) and "ValueError: bad data" in str(result)
    assert "the database is at base (no revision)" in str(result)


def test_an_env_py_error_before_any_revision_is_a_configuration_error():
    result = explain_failure(ImportError("No module named 'myapp'"), Progress(), lambda: ())
    assert isinstance(result, ConfigError) and "env.py failed" in str(result)


def test_a_lost_connection_is_unreachable_not_a_failed_revision(database_url, postgres):
    engine = create_engine(sa_url(database_url))
    with engine.connect() as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        postgres.execute("SELECT pg_terminate_backend(%s)", params=(pid,))
        with pytest.raises(DBAPIError) as raised:
            conn.execute(text("SELECT 1"))
    engine.dispose()
    result = explain_failure(raised.value, Progress(running=FakeScript()), lambda: ("r0001",))
    assert isinstance(result, DatabaseUnreachable) and "lost the database during revision r0002" in str(result)


def test_sys_exit_inside_a_revision_is_that_revision_failing():
    result = explain_failure(EarlyExit(3), Progress(running=FakeScript(), raised_inside=True), lambda: ("r0001",))
    assert isinstance(result, RevisionFailed)
    assert str(result) == ("revision r0002 (add things) called sys.exit(3): its transaction was rolled back; "
                           "the database is at r0001")


def test_sys_exit_in_env_py_is_a_configuration_error_naming_where_the_database_is():
    # Even after revisions ran: env.py, not a revision, exited (say, after run_migrations returned).
    result = explain_failure(EarlyExit("no migrations today"), Progress(running=FakeScript()), lambda: ("r0002",))
    assert isinstance(result, ConfigError)
    assert "env.py exited (SystemExit('no migrations today'))" in str(result) and "at r0002" in str(result)


def test_an_invalid_connection_option_is_a_configuration_error_not_a_lost_database(database_url):
    engine = create_engine(sa_url(database_url), connect_args={"timeout": 5})
    with pytest.raises(DBAPIError) as raised:
        engine.connect()
    result = explain_failure(raised.value, Progress(), lambda: ())
    assert isinstance(result, ConfigError) and 'invalid connection option "timeout"' in str(result)
