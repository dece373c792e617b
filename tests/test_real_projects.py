"""Real applications' migration histories, installed from PyPI, run differentially.

Each test takes the Alembic environment a released package ships inside its wheel
(alembic.ini, env.py, versions/), runs plain `alembic upgrade heads` on one twin
database and the runner on the other (tests/fidelity.py), compares pg_dump
--schema-only and the version rows, then runs the runner again and expects a no-op.

The packages' env.py files are theirs, unchanged: their own logging setup
(`fileConfig` of the ini's logging sections), their own engine from
`sqlalchemy.url`, `render_as_batch`, data migrations through ORM sessions, and
reuse of `config.attributes["connection"]`. Only alembic.ini is copied (the
harness writes a sibling ini next to it, and site-packages is not ours), with
`script_location` made absolute: the shipped value is relative to the working
directory and each package sets it itself at run time the same way.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from pgserver._commands import POSTGRES_BIN_PATH

from .conftest import Result, advisory_locks, run_runner, runner_env, summary
from .fidelity import Twins, run_alembic, schema_dump, sqlalchemy_url, version_table_rows
from .postgres import SUPERUSER, SUPERUSER_PASSWORD


# -- helpers ----------------------------------------------------------------------------------
def package_path(module: str) -> Path:
    """Directory of an installed (sub)package; skips the test when its distribution is not installed.

    Found without importing it in pytest's process (mlflow's import alone sets up its own logging).
    """
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)  # a top-level name is found without running its __init__
    if spec is None:
        pytest.skip(f"{top} is not installed (the test extra has it)")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*rest)
    assert (path / "__init__.py").is_file(), path
    return path


def copied_ini(tmp_path: Path, shipped: Path, script_location: Path) -> Path:
    """The shipped alembic.ini, copied to tmp_path with an absolute script_location; nothing else changed."""
    text = shipped.read_text()
    text, n = re.subn(r"(?m)^script_location\s*=.*$", lambda _: f"script_location = {script_location}", text,
                      count=1)
    assert n == 1, shipped
    ini = tmp_path / "alembic.ini"
    ini.write_text(text)
    return ini


def revision_files(script_location: Path) -> int:
    """How many revisions the package ships (one file each in versions/)."""
    return len([p for p in (script_location / "versions").glob("*.py") if p.name != "__init__.py"])


def data_dump(twins: Twins, database: str) -> str:
    """pg_dump --data-only (COPY blocks), comments dropped: the rows the migrations left."""
    proc = subprocess.run(
        [str(POSTGRES_BIN_PATH / "pg_dump"), "--data-only", "--no-owner", "--no-privileges",
         "-h", twins.postgres.host, "-p", str(twins.postgres.port), "-U", SUPERUSER, database],
        env={**os.environ, "PGPASSWORD": SUPERUSER_PASSWORD}, capture_output=True, text=True, timeout=60,
        check=True)
    return "\n".join(line for line in proc.stdout.splitlines()
                     if line.strip() and not line.startswith(("--", "\\restrict", "\\unrestrict")))




def assert_same(twins: Twins) -> None:
    """twins.assert_same(), failing with the first lines of the dumps' difference."""
    assert version_table_rows(twins.postgres, twins.plain) == version_table_rows(twins.postgres, twins.runner)
    plain, runner = schema_dump(twins.postgres, twins.plain), schema_dump(twins.postgres, twins.runner)
    diff = list(difflib.unified_diff(plain.splitlines(), runner.splitlines(), "alembic", "runner", lineterm=""))
    assert not diff, "\n".join(diff[:60])


def not_json(result: Result) -> list[str]:
    """Output lines that are not JSON objects (README: in JSON mode every line is one)."""
    bad = []
    for line in result.output.splitlines():
        if not line.strip():
            continue
        try:
            if not isinstance(json.loads(line), dict):
                bad.append(line)
        except ValueError:
            bad.append(line)
    return bad


def differential(twins: Twins, ini: Path, revisions: int, env: dict | None = None,
                 runner_extra: dict | None = None) -> Result:
    """Plain alembic on one twin, the runner on the other, both from the ini's directory; same result."""
    env = env or {}
    plain = twins.run_alembic(ini, env=env)
    assert plain.returncode == 0, plain
    runner = run_runner(runner_env(twins.url("runner"), ini, **env, **(runner_extra or {})), cwd=ini.parent)
    assert runner.returncode == 0, summary(runner)
    assert summary(runner)["outcome"] == "upgraded", summary(runner)
    assert len(summary(runner)["applied"]) == revisions, summary(runner)
    assert_same(twins)
    assert advisory_locks(twins.postgres, twins.runner) == []
    assert not_json(runner) == [], not_json(runner)[:5]

    again = run_runner(runner_env(twins.url("runner"), ini, **env, **(runner_extra or {})), cwd=ini.parent)
    assert again.returncode == 0, summary(again)
    assert summary(again)["outcome"] == "current", summary(again)
    assert summary(again)["applied"] == [], summary(again)
    assert_same(twins)
    return runner


# -- optuna: the RDB storage's history ---------------------------------------------------------
def test_optuna_storage_history(postgres, tmp_path):
    """optuna's RDBStorage migrations (optuna/storages/_rdb/alembic): 10 revisions from an empty
    database, with batch ops (`render_as_batch=True`) and data migrations through ORM sessions
    (v1.3.0.a, v2.4.0.a, v3.0.0.a-d rewrite rows). env.py calls `fileConfig` on the ini's
    logging sections unless the root logger already has a handler, and builds its own engine
    from `sqlalchemy.url` (NullPool), ignoring `config.attributes["connection"]`.

    Config beyond a user's: none; optuna itself sets script_location to this directory.
    """
    rdb = package_path("optuna.storages._rdb")
    ini = copied_ini(tmp_path, rdb / "alembic.ini", rdb / "alembic")
    twins = Twins.create(postgres)
    assert revision_files(rdb / "alembic") >= 10
    differential(twins, ini, revisions=revision_files(rdb / "alembic"))


# Rows as optuna 2.4-2.9 wrote them (schema v2.4.0.a); each later data migration rewrites some.
OPTUNA_2_4_ROWS = [
    "INSERT INTO studies VALUES (1, 'minimize me'), (2, 'two objectives')",
    "INSERT INTO study_directions VALUES (1, 'MINIMIZE', 1, 0), (2, 'MAXIMIZE', 2, 0), (3, 'MINIMIZE', 2, 1)",
    "INSERT INTO study_user_attributes VALUES (1, 1, 'owner', '\"ana\"')",
    "INSERT INTO study_system_attributes VALUES (1, 2, 'note', '[1, 2]')",
    "INSERT INTO trials VALUES (1, 1, 'COMPLETE', '2021-03-01 10:00', '2021-03-01 10:01', 0),"
    " (2, 1, 'PRUNED', '2021-03-01 10:02', '2021-03-01 10:03', 1),"
    " (3, 2, 'COMPLETE', '2021-03-01 10:04', '2021-03-01 10:05', 0),"
    " (4, 2, 'FAIL', '2021-03-01 10:06', NULL, 1),"
    " (5, 2, 'RUNNING', '2021-03-01 10:07', NULL, 2)",
    "INSERT INTO trial_user_attributes VALUES (1, 3, 'seed', '42')",
    "INSERT INTO trial_system_attributes VALUES (1, 4, 'fail_reason', '\"oom\"')",
    # v3.0.0.b deletes NULL values of unfinished trials; v3.0.0.d types +-inf (stored as +-1e308 or inf).
    "INSERT INTO trial_values VALUES (1, 1, 0.25, 0), (2, 3, 'Infinity', 0), (3, 3, -1.7976931348623157e308, 1),"
    " (4, 4, NULL, 0), (5, 5, NULL, 0)",
    # v3.0.0.c types NaN and +-inf intermediate values.
    "INSERT INTO trial_intermediate_values VALUES (1, 1, 0, 1.5), (2, 1, 1, 'NaN'), (3, 2, 0, 'Infinity'),"
    " (4, 2, 1, '-Infinity'), (5, 2, 2, 0.75)",
    # v3.0.0.a rewrites the old distribution names as the new ones.
    "INSERT INTO trial_params VALUES"
    " (1, 1, 'x', 0.3, '{\"name\": \"UniformDistribution\", \"attributes\": {\"low\": 0.0, \"high\": 1.0}}'),"
    " (2, 1, 'lr', 0.01, '{\"name\": \"LogUniformDistribution\", \"attributes\": {\"low\": 1e-05, \"high\": 1.0}}'),"
    " (3, 2, 'n', 3, '{\"name\": \"IntUniformDistribution\", \"attributes\": {\"low\": 1, \"high\": 10, \"step\": 1}}'),"
    " (4, 3, 'c', 1, '{\"name\": \"CategoricalDistribution\", \"attributes\": {\"choices\": [\"a\", \"b\"]}}'),"
    " (5, 3, 'q', 0.5, '{\"name\": \"DiscreteUniformDistribution\", \"attributes\": {\"low\": 0.0, \"high\": 1.0, \"q\": 0.5}}')",
]


def test_optuna_data_migrations_from_2_4(postgres, tmp_path):
    """The same history on a database optuna 2.4 left with rows in it: both twins are brought to
    v2.4.0.a by plain alembic and filled alike, then plain alembic and the runner apply the 6
    pending revisions, whose ORM-session data migrations (v3.0.0.a-d) rewrite, retype and delete
    those rows between batch ops. Schema, version rows and every row afterwards are the same.

    (Starting earlier is not possible on PostgreSQL with plain alembic either: from v0.9.0.a,
    v1.2.0.a or v1.3.0.a, run as a separate `alembic upgrade`, v2.4.0.a fails with
    DuplicateObject: type "studydirection" already exists. Only a single run from base works.)
    """
    rdb = package_path("optuna.storages._rdb")
    ini = copied_ini(tmp_path, rdb / "alembic.ini", rdb / "alembic")
    twins = Twins.create(postgres)
    for which in ("plain", "runner"):
        setup = run_alembic(ini, sqlalchemy_url(twins.url(which)), "upgrade", "v2.4.0.a")
        assert setup.returncode == 0, setup
        with psycopg.connect(twins.url(which)) as conn:
            for statement in OPTUNA_2_4_ROWS:
                conn.execute(statement)
    assert data_dump(twins, twins.plain) == data_dump(twins, twins.runner)
    differential(twins, ini, revisions=revision_files(rdb / "alembic") - 4)  # v0.9.0.a..v2.4.0.a applied
    migrated = data_dump(twins, twins.plain)
    assert "IntDistribution" in migrated and "INF_POS" in migrated and "NAN" in migrated, migrated
    assert migrated == data_dump(twins, twins.runner)


# -- mlflow: the tracking store's history ------------------------------------------------------
MLFLOW_INITIAL_TABLES = """
import sys
from sqlalchemy import create_engine
from mlflow.store.tracking.dbmodels.initial_models import Base
engine = create_engine(sys.argv[1])
Base.metadata.create_all(engine)
engine.dispose()
"""

# Rows as an MLflow 1.0 server left them; the data migrations move, recompute and retype them
# (latest_metrics is computed from metrics, NaN and +-inf metrics get is_nan, user ids move to tags).
MLFLOW_1_0_ROWS = [
    "INSERT INTO experiments (experiment_id, name, artifact_location, lifecycle_stage) VALUES"
    " (0, 'Default', '/mlruns/0', 'active'), (1, 'exp one', 's3://bucket/1', 'deleted')",
    "INSERT INTO runs (run_uuid, name, source_type, source_name, entry_point_name, user_id, status, start_time,"
    " end_time, source_version, lifecycle_stage, artifact_uri, experiment_id) VALUES"
    " ('aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa', 'run a', 'LOCAL', 'train.py', 'main', 'ana', 'FINISHED',"
    "  1550000000000, 1550000001000, 'abc123', 'active', '/mlruns/0/a', 0),"
    " ('bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb', 'run b', 'PROJECT', 'proj', 'main', 'bo', 'RUNNING',"
    "  1550000002000, NULL, NULL, 'deleted', 's3://bucket/1/b', 1)",
    "INSERT INTO tags (key, value, run_uuid) VALUES ('mlflow.user', 'ana', 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'),"
    " ('note', 'long note', 'bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb')",
    "INSERT INTO metrics (key, value, timestamp, run_uuid) VALUES"
    " ('loss', 0.5, 1550000000100, 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'),"
    " ('loss', 0.25, 1550000000200, 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'),"
    " ('acc', 'NaN', 1550000000300, 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'),"
    " ('acc', 'Infinity', 1550000000400, 'bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb'),"
    " ('gap', '-Infinity', 1550000000500, 'bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb')",
    "INSERT INTO params (key, value, run_uuid) VALUES ('lr', '0.01', 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'),"
    " ('batch', '32', 'bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb')",
]


def test_mlflow_tracking_history(postgres, tmp_path):
    """mlflow's tracking-store migrations (mlflow/store/db_migrations): dozens of revisions with
    batch ops, enum and constraint changes and data migrations. mlflow builds a new database
    the way every one of its servers did: `initial_models.Base.metadata.create_all` (the
    pre-Alembic schema) and then `upgrade heads` from base, with no version table in between.
    env.py reuses `config.attributes["connection"].engine` when given one (opening a new
    connection from that engine), otherwise its own engine from `sqlalchemy.url`.

    For the runner that database is legacy (tables, no version table): the schema matches
    base, so the user sets MIGRATE_BASELINE_REVISION=base, the only config beyond the URL.
    Its `sqlalchemy.url = ""` is replaced by each run's URL.
    """
    migrations = package_path("mlflow.store.db_migrations")
    ini = copied_ini(tmp_path, migrations / "alembic.ini", migrations)
    revisions = revision_files(migrations)
    twins = Twins.create(postgres)
    for which in ("plain", "runner"):
        subprocess.run([sys.executable, "-c", MLFLOW_INITIAL_TABLES, sqlalchemy_url(twins.url(which))],
                       check=True, timeout=60, capture_output=True)
        with psycopg.connect(twins.url(which)) as conn:
            for statement in MLFLOW_1_0_ROWS:
                conn.execute(statement)
    assert_same(twins)
    assert data_dump(twins, twins.plain) == data_dump(twins, twins.runner)
    differential(twins, ini, revisions=revisions, runner_extra={"MIGRATE_BASELINE_REVISION": "base"})
    migrated = data_dump(twins, twins.plain)
    with psycopg.connect(twins.url("plain")) as conn:  # the data migrations ran
        assert conn.execute("SELECT count(*) FROM latest_metrics").fetchone()[0] > 0, migrated
        assert conn.execute("SELECT count(*) FROM tags WHERE key = 'mlflow.user'").fetchone()[0] == 2, migrated
    assert migrated == data_dump(twins, twins.runner)
