"""End-to-end: `verify` compares the database with env.py's target_metadata (as `alembic check`) and finds invalid
indexes, on a real PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from .conftest import run_runner, runner_env, version_rows
from .projects import Rev, make_project, write_env

REVISIONS = [
    Rev("a0001", None, ["CREATE TABLE accounts (id serial PRIMARY KEY, email text NOT NULL)"], message="accounts"),
    Rev("a0002", "a0001", ["CREATE TABLE orders (id serial PRIMARY KEY, "
                           "account_id integer NOT NULL REFERENCES accounts (id), "
                           "total numeric(10, 2) NOT NULL, note text)",
                           "CREATE INDEX ix_orders_account ON orders (account_id)"], message="orders"),
]

MODELS = '''
import sqlalchemy as sa
target_metadata = sa.MetaData()
accounts = sa.Table("accounts", target_metadata, sa.Column("id", sa.Integer, primary_key=True),
                    sa.Column("email", sa.Text, nullable=False))
orders = sa.Table("orders", target_metadata, sa.Column("id", sa.Integer, primary_key=True),
                  sa.Column("account_id", sa.Integer, sa.ForeignKey("accounts.id"), nullable=False),
                  sa.Column("total", sa.Numeric(10, 2), nullable=False), sa.Column("note", sa.Text),
                  sa.Index("ix_orders_account", "account_id"))
'''


def project(root: Path, revisions=REVISIONS, models: str | None = MODELS, configure: str = "") -> Path:
    """The project with env.py from `alembic init`, its target_metadata the models (None: left as None) and
    `configure` added to context.configure() in online mode."""
    ini = make_project(root, revisions)
    env = (root / "migrations" / "env.py").read_text()
    if models is not None:
        env = env.replace("target_metadata = None", models)
    if configure:
        online = "connection=connection, target_metadata=target_metadata"
        assert online in env
        env = env.replace(online, online + ", " + configure)
    write_env(root, env)
    return ini


def sql(url: str, *statements: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


@pytest.fixture
def migrated(database_url, tmp_path) -> Path:
    """The project, its database upgraded to the heads by the runner."""
    ini = project(tmp_path / "p")
    upgraded = run_runner(runner_env(database_url, ini))
    assert upgraded.returncode == 0, upgraded
    return ini


def drifts(result) -> list[str]:
    return [r["difference"] for r in result.records if "difference" in r]


def test_a_database_matching_the_models_verifies(database_url, migrated):
    result = run_runner(runner_env(database_url, migrated), "verify")
    assert result.returncode == 0, result
    assert result.last["outcome"] == "verified" and result.last["to_revision"] == ["a0002"], result
    assert drifts(result) == []
    assert version_rows(database_url) == ["a0002"]


def test_a_column_added_by_hand_is_drift(database_url, migrated):
    sql(database_url, "ALTER TABLE orders ADD COLUMN coupon text")
    result = run_runner(runner_env(database_url, migrated), "verify")
    assert result.returncode == 10 and result.last["outcome"] == "SchemaDrift", result
    assert drifts(result) == ["column orders.coupon: in the database, not in the models"], result
    assert "column orders.coupon: in the database, not in the models" in result.last["event"]
    # Said once, in the runner's words: not again by autogenerate's own logger (a child of alembic.autogenerate).
    assert not [r for r in result.records if r.get("logger", "").startswith("alembic.autogenerate")], result


def test_a_dropped_index_and_a_changed_type_are_drift_each_on_its_own_line(database_url, migrated):
    sql(database_url, "DROP INDEX ix_orders_account", "ALTER TABLE orders ALTER COLUMN total TYPE integer")
    result = run_runner(runner_env(database_url, migrated), "verify")
    assert result.returncode == 10, result
    assert sorted(drifts(result)) == [
        "index ix_orders_account on orders (account_id): in the models, not in the database",
        "type of orders.total: INTEGER in the database, NUMERIC(10, 2) in the models",
    ], result
    assert "2 findings" in result.last["event"] and "ix_orders_account" in result.last["event"]


def test_a_table_created_by_hand_and_one_the_models_lack_are_drift(database_url, tmp_path):
    models = MODELS + 'sa.Table("refunds", target_metadata, sa.Column("id", sa.Integer, primary_key=True))\n'
    ini = project(tmp_path / "p", models=models)
    assert run_runner(runner_env(database_url, ini)).returncode == 0
    sql(database_url, "CREATE TABLE scratch (id int)")
    result = run_runner(runner_env(database_url, ini), "verify")
    assert result.returncode == 10, result
    assert sorted(drifts(result)) == ["table refunds: in the models, not in the database",
                                      "table scratch: in the database, not in the models"], result


def test_an_invalid_index_left_by_a_failed_concurrent_build_is_drift(database_url, tmp_path):
    # The models have the unique index: only its being invalid is wrong.
    models = MODELS + 'sa.Index("ix_accounts_email", accounts.c.email, unique=True)\n'
    ini = project(tmp_path / "p", models=models)
    assert run_runner(runner_env(database_url, ini)).returncode == 0
    sql(database_url, "INSERT INTO accounts (email) VALUES ('a@example.com'), ('a@example.com')")
    with pytest.raises(psycopg.errors.UniqueViolation):
        sql(database_url, "CREATE UNIQUE INDEX CONCURRENTLY ix_accounts_email ON accounts (email)")
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                            "WHERE c.relname = 'ix_accounts_email'").fetchone() == (False,)
    result = run_runner(runner_env(database_url, ini), "verify")
    assert result.returncode == 10, result
    assert [r["invalid_index"] for r in result.records if "invalid_index" in r] == \
        ["public.ix_accounts_email on public.accounts"], result
    assert "invalid index public.ix_accounts_email on public.accounts" in result.last["event"]
    assert drifts(result) == [], result  # as alembic check sees it, the index is there

    sql(database_url, "DROP INDEX ix_accounts_email", "DELETE FROM accounts",
        "CREATE UNIQUE INDEX CONCURRENTLY ix_accounts_email ON accounts (email)")
    assert run_runner(runner_env(database_url, ini), "verify").returncode == 0


def test_without_target_metadata_verify_exits_2_saying_so(database_url, tmp_path):
    ini = project(tmp_path / "p", models=None)
    assert run_runner(runner_env(database_url, ini)).returncode == 0
    result = run_runner(runner_env(database_url, ini), "verify")
    assert result.returncode == 2 and result.last["outcome"] == "ConfigError", result
    assert "no target_metadata" in result.last["event"], result


def test_env_pys_include_object_and_compare_type_apply(database_url, tmp_path):
    exclude = '''
def include_object(obj, name, type_, reflected, compare_to):
    return not (type_ == "table" and name == "orders")
'''
    ini = project(tmp_path / "p", models=MODELS + exclude, configure="include_object=include_object")
    assert run_runner(runner_env(database_url, ini)).returncode == 0
    sql(database_url, "ALTER TABLE orders ADD COLUMN coupon text", "DROP INDEX ix_orders_account",
        "ALTER TABLE accounts ALTER COLUMN email TYPE varchar(200)")
    result = run_runner(runner_env(database_url, ini), "verify")
    # orders is excluded; the type of accounts.email is still compared.
    assert result.returncode == 10, result
    assert drifts(result) == ["type of accounts.email: VARCHAR(200) in the database, TEXT in the models"], result

    not_typed = project(tmp_path / "q", models=MODELS + exclude,
                        configure="include_object=include_object, compare_type=False")
    result = run_runner(runner_env(database_url, not_typed), "verify")
    assert result.returncode == 0 and drifts(result) == [], result


def test_pending_legacy_and_ahead_are_judged_as_check_does(database_url, tmp_path):
    with psycopg.connect(database_url) as conn:
        conn.execute("CREATE TABLE accounts (id int)")
    ini = project(tmp_path / "p")
    legacy = run_runner(runner_env(database_url, ini), "verify")
    assert legacy.returncode == 9 and "no version table" in legacy.last["event"], legacy
    sql(database_url, "DROP TABLE accounts")

    older = project(tmp_path / "older", revisions=REVISIONS[:1])
    assert run_runner(runner_env(database_url, older)).returncode == 0
    pending = run_runner(runner_env(database_url, ini), "verify")
    assert pending.returncode == 9 and pending.last["pending"] == ["a0002"], pending
    assert drifts(pending) == []

    assert run_runner(runner_env(database_url, ini)).returncode == 0
    refused = run_runner(runner_env(database_url, older, MIGRATE_ALLOW_AHEAD="never"), "verify")
    assert refused.returncode == 8 and "a0002" in refused.last["event"], refused
    let_through = run_runner(runner_env(database_url, older), "verify")
    assert let_through.returncode == 0 and let_through.last["outcome"] == "ahead", let_through
    assert "schema not compared" in let_through.last["event"], let_through
    assert version_rows(database_url) == ["a0002"]


def test_a_schema_of_its_own_with_include_schemas(postgres, database, database_url, tmp_path):
    revisions = [Rev("s0001", None, ["CREATE SCHEMA shop",
                                     "CREATE TABLE shop.orders (id serial PRIMARY KEY, note text)"])]
    models = '''
import sqlalchemy as sa
target_metadata = sa.MetaData()
sa.Table("orders", target_metadata, sa.Column("id", sa.Integer, primary_key=True), sa.Column("note", sa.Text),
         schema="shop")

def include_name(name, type_, parent_names):
    return name in (None, "shop") if type_ == "schema" else True
'''
    ini = project(tmp_path / "p", revisions, models=models, configure="include_schemas=True, include_name=include_name")
    assert run_runner(runner_env(database_url, ini)).returncode == 0
    assert run_runner(runner_env(database_url, ini), "verify").returncode == 0
    sql(database_url, "ALTER TABLE shop.orders DROP COLUMN note", "CREATE INDEX ix_shop_id ON shop.orders (id)")
    # Invalid as a failed concurrent build leaves it (only a superuser may write pg_index).
    postgres.execute("UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'shop.ix_shop_id'::regclass",
                     database=database)
    result = run_runner(runner_env(database_url, ini), "verify")
    assert result.returncode == 10, result
    assert sorted(drifts(result)) == ["column shop.orders.note: in the models, not in the database",
                                      "index ix_shop_id on shop.orders: in the database, not in the models"], result
    assert "invalid index shop.ix_shop_id on shop.orders" in result.last["event"], result
