import pytest
from sqlalchemy.engine import make_url

from runner.errors import DatabaseUnreachable
from runner.wait import wait_for_database

from .conftest import RUNNER_PASSWORD, RUNNER_ROLE
from .postgres import free_port


def url(text: str):
    return make_url(text).set(drivername="postgresql+psycopg")


def test_returns_the_server_version(postgres, database):
    version = wait_for_database(url(postgres.url(database, RUNNER_ROLE, RUNNER_PASSWORD)), timeout=5)
    assert 160000 <= version < 170000


def test_retries_with_jittered_backoff_capped_near_two_seconds_then_names_host_and_port():
    sleeps = []
    port = free_port()
    with pytest.raises(DatabaseUnreachable) as error:
        # tenacity's injectable sleep: record the waits instead of sleeping them.
        wait_for_database(url(f"postgresql://u:pw@127.0.0.1:{port}/db"), timeout=1.0, sleep=sleeps.append)
    assert f"127.0.0.1:{port}" in str(error.value) and "MIGRATE_WAIT_TIMEOUT" in str(error.value)
    assert len(sleeps) >= 10
    assert max(sleeps) <= 2.0 and len(set(sleeps)) > 1


@pytest.mark.parametrize("case, words", [("password", "authentication failed"), ("database", "does not exist"),
                                         ("role", "authentication failed")])
def test_refusals_are_not_retried(postgres, database, case, words):
    sleeps = []
    target = {"password": postgres.url(database, RUNNER_ROLE, "wrong"),
              "database": postgres.url("nope", RUNNER_ROLE, RUNNER_PASSWORD),
              "role": postgres.url(database, "nobody", "pw")}[case]
    with pytest.raises(DatabaseUnreachable) as error:
        wait_for_database(url(target), timeout=30, sleep=sleeps.append)
    assert sleeps == [] and words in str(error.value) and "refused" in str(error.value)
