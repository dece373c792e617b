"""Real applications from PyPI, each in its own virtualenv with its own pins, migrated by the runner and by the
application's own upgrade command on twin databases (#21, #22).

tests/test_real_projects.py runs packages' Alembic histories in the project's .venv against plain
`alembic`; here the reference is what each application tells its operators to run, and the runner is
installed beside the application (tests/apps.py: `.venv-apps/<name>`, built by the first test that
needs it), so env.py and the application run with the versions the application resolves. Each
application does something an `alembic init` or `flask db init` template does not:

- Apache Airflow 3.3.2 (apache-airflow-core, its shipped `airflow/alembic.ini` and env.py unchanged):
  importing `airflow` configures logging with `dictConfig` (its task-log handlers) and validates it;
  env.py ignores `sqlalchemy.url` and migrates through `airflow.settings.engine`, built from
  AIRFLOW__DATABASE__SQL_ALCHEMY_CONN; `transaction_per_migration=True`, `render_as_batch=True`;
  a 2.6.2 squashed first revision. Reference: `airflow db migrate`, from a database at 3.2.0.
- ihatemoney 7.2.1 (Flask-Migrate): ships `migrations/alembic.ini` with `script_location = .`,
  which only Flask-Migrate's `Migrate` directory makes right; `create_app()` itself calls
  `flask_migrate.upgrade()` (every process that creates the application migrates, unlocked); env.py
  calls `fileConfig` unconditionally and replaces `sqlalchemy.url` with the application's URI.
  Reference: `ihatemoney db upgrade` (its own CLI, a FlaskGroup around `create_app`).
- privacyIDEA 3.12.3 (Flask-Migrate, pins SQLAlchemy<2.0): its own virtualenv resolves SQLAlchemy
  1.4 (#22); `create_app()` upserts this node's row in `nodename` when that table exists (a write
  at creation); `Migrate(directory=...)` is the installed package's absolute migrations directory;
  env.py migrates on an AUTOCOMMIT connection, and many revisions swallow their own errors.
  Reference: `pi-manage db upgrade` (what `privacyidea-schema-upgrade` runs).
- OpenStack Keystone 30.0.0 (#23): Alembic branches labelled `expand` and `contract`, one directory
  per release and branch, which `keystone-manage` passes as `version_locations` in code; its revisions
  read Keystone's oslo.config options, registered by an env.py that then runs Keystone's own. The runner
  with MIGRATE_TARGET=expand@head, then heads. Reference: `keystone-manage db_sync --expand`, then
  `--contract`, each compared.

Compared: `pg_dump --schema-only` and the version rows (tests/fidelity.py), the runner's output (JSON
lines ending with its summary, no password) and its summary (`applied` is what it committed). Run
alone with `python3 dev.py test -m real_apps`.
"""

from __future__ import annotations

import difflib
import json
import re
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import pytest

from .apps import App, AppVenv, app_venv
from .conftest import RUNNER_PASSWORD, Result, advisory_locks, summary
from .fidelity import Twins, schema_dump, version_table_rows
from .test_real_projects import not_json

pytestmark = pytest.mark.real_apps


# -- helpers ----------------------------------------------------------------------------------
def assert_clean(result: Result, password: str = RUNNER_PASSWORD) -> None:
    """Only JSON lines, the summary last, and the role's password nowhere (raw or URL-quoted)."""
    assert not_json(result) == [], not_json(result)[:10]
    summary(result)
    assert password not in result.output and quote(password, safe="") not in result.output, "password in the output"


def assert_same(twins: Twins) -> None:
    """The twins hold the same version rows and schema; fails with the first lines of the dumps' difference."""
    assert version_table_rows(twins.postgres, twins.plain) == version_table_rows(twins.postgres, twins.runner)
    plain, runner = schema_dump(twins.postgres, twins.plain), schema_dump(twins.postgres, twins.runner)
    diff = list(difflib.unified_diff(plain.splitlines(), runner.splitlines(), "own command", "runner", lineterm=""))
    assert not diff, "\n".join(diff[:60])


def with_scheme(url: str, scheme: str) -> str:
    return url.replace("postgresql://", f"{scheme}://", 1)


def runner_settings(venv: AppVenv, database_url: str | None, **extra: str) -> dict:
    """The runner's environment in the application's virtualenv, as tests/conftest.runner_env makes it."""
    env = venv.env(MIGRATE_LOG_FORMAT="json", MIGRATE_WAIT_TIMEOUT="10", MIGRATE_LOCK_TIMEOUT="120", **extra)
    if database_url:
        env["DATABASE_URL"] = database_url
    return env


def revisions_between(venv: AppVenv, script_location: Path, lower: str | None, env: dict) -> list[str]:
    """The revisions after `lower` (exclusive; None: from base) up to the heads, oldest first, read by
    alembic in the application's virtualenv (revision files import the application's modules)."""
    code = ("import json, sys\nfrom alembic.script import ScriptDirectory\n"
            "s = ScriptDirectory(sys.argv[1])\n"
            "lower = sys.argv[2] or None\n"
            "print(json.dumps([r.revision for r in s.iterate_revisions('heads', lower)][::-1]))")
    done = venv.run([str(venv.python), "-c", code, str(script_location), lower or ""], env, timeout=120)
    assert done.returncode == 0, done
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- Apache Airflow 3.3.2 ------------------------------------------------------------------------
# apache-airflow-core alone (not the apache-airflow meta-package and its providers): what `airflow db
# migrate` needs. Airflow derives an async engine from the sync URL at import (asyncpg for postgresql),
# and its docs name psycopg2 for the metadata database: both drivers are what the postgres provider
# would bring, without the provider.
AIRFLOW = App("airflow-3.3.2", ("apache-airflow-core==3.3.2", "psycopg2-binary>=2.9", "asyncpg>=0.29"))
AIRFLOW_3_2_0 = "1d6611b6ab7c"  # airflow.utils.db._REVISION_HEADS_MAP["3.2.0"] in 3.3.2


def airflow_env(venv: AppVenv, home: Path, url: str, **extra: str) -> dict:
    """Airflow's own settings for a twin: a private AIRFLOW_HOME and the metadata database over psycopg2.

    psycopg2, as Airflow's docs configure it: with SQLAlchemy 2.1's default psycopg 3 driver for
    `postgresql://`, a 3.2 -> 3.3 revision fails on PostgreSQL in `airflow db migrate` itself
    (DatatypeMismatch, `UPDATE dag SET max_consecutive_failed_dag_runs=$1::VARCHAR`).
    """
    home.mkdir(exist_ok=True)
    return venv.env(AIRFLOW_HOME=str(home), AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=with_scheme(url, "postgresql+psycopg2"),
                    AIRFLOW__CORE__LOAD_EXAMPLES="False", **extra)


def test_airflow_3_2_database_to_3_3_2_like_airflow_db_migrate(postgres, tmp_path):
    """Both twins are brought to 3.2.0 by `airflow db migrate --to-version 3.2.0` (the 3.3.2 scripts), then
    one by `airflow db migrate` and the other by the runner with the shipped ini (ALEMBIC_CONFIG naming
    site-packages/airflow/alembic.ini, nothing copied or edited) and DATABASE_URL naming the database
    that AIRFLOW__DATABASE__SQL_ALCHEMY_CONN names, since env.py connects with Airflow's engine.

    `airflow db migrate` also adds the default pool and syncs the log templates (rows, not schema; done
    at 3.2.0 on both twins already): schema and version rows are compared.
    """
    venv = app_venv(AIRFLOW)
    ini = venv.site_packages / "airflow" / "alembic.ini"
    assert ini.is_file(), ini
    twins = Twins.create(postgres)
    envs = {which: airflow_env(venv, tmp_path / f"airflow-{which}", twins.url(which)) for which in ("plain", "runner")}
    # Both twins at once (each is its own database): seconds off a test that is mostly interpreter start-ups.
    setups = [venv.start([venv.script("airflow"), "db", "migrate", "--to-version", "3.2.0"], env) for env in envs.values()]
    for proc in setups:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
    assert version_table_rows(postgres, twins.runner) == {"public.alembic_version": [AIRFLOW_3_2_0]}
    assert_same(twins)
    pending = revisions_between(venv, ini.parent / "migrations", AIRFLOW_3_2_0, envs["runner"])
    assert len(pending) >= 10, pending  # 3.3.0's revisions

    settings = runner_settings(venv, twins.url("runner"), ALEMBIC_CONFIG=str(ini), **{
        k: v for k, v in envs["runner"].items() if k.startswith("AIRFLOW")})
    # #21: importing airflow runs its dictConfig; ignoring it made airflow's own check fail (exit 2).
    heads = venv.runner(settings, "heads", cwd=tmp_path)
    assert heads.returncode == 0, summary(heads)
    assert summary(heads)["to_revision"] == [pending[-1]], summary(heads)
    assert_clean(heads)

    plain = venv.run([venv.script("airflow"), "db", "migrate"], envs["plain"])
    assert plain.returncode == 0, plain
    assert version_table_rows(postgres, twins.plain) == {"public.alembic_version": [pending[-1]]}

    result = venv.runner(settings, cwd=tmp_path)
    assert result.returncode == 0, summary(result)
    assert summary(result)["outcome"] == "upgraded", summary(result)
    assert summary(result)["applied"] == pending, summary(result)
    assert_clean(result)
    assert_same(twins)
    assert advisory_locks(postgres, twins.runner) == []

    again = venv.runner(settings, cwd=tmp_path)
    assert again.returncode == 0, summary(again)
    assert summary(again)["outcome"] == "current" and summary(again)["applied"] == [], summary(again)
    assert_clean(again)
    assert_same(twins)


# -- ihatemoney 7.2.1 ------------------------------------------------------------------------------
# [database] is ihatemoney's own extra for PostgreSQL/MySQL (psycopg2-binary, pymysql).
IHATEMONEY = App("ihatemoney-7.2.1", ("ihatemoney[database]==7.2.1",))
# A role of its own: ihatemoney's env.py hands the URI to configparser unescaped
# (`config.set_main_option("sqlalchemy.url", ...)`), so a password that needs %-quoting in a URL
# (the runner role's does) breaks its own `ihatemoney db upgrade` before any migration.
IHATEMONEY_ROLE, IHATEMONEY_PASSWORD = "ihatemoney", "ihatemoney-secret-pw"


@pytest.fixture
def ihatemoney(postgres, tmp_path):
    """The application's virtualenv and a function making a configured database: (venv, databases -> envs)."""
    venv = app_venv(IHATEMONEY)
    postgres.create_role(IHATEMONEY_ROLE, IHATEMONEY_PASSWORD, "CREATEDB")
    package = venv.site_packages / "ihatemoney"
    assert (package / "migrations" / "alembic.ini").read_text().count("script_location = .") == 1

    def configured(name: str) -> tuple[str, dict]:
        """A new database and ihatemoney's settings file for it (IHATEMONEY_SETTINGS_FILE_PATH, as deployed)."""
        postgres.create_database(name, IHATEMONEY_ROLE)
        url = postgres.url(name, IHATEMONEY_ROLE, IHATEMONEY_PASSWORD)
        settings = tmp_path / f"{name}.cfg"
        settings.write_text(f"SQLALCHEMY_DATABASE_URI = {url!r}\nSECRET_KEY = 'not-the-default-key'\n")
        return url, venv.env(IHATEMONEY_SETTINGS_FILE_PATH=str(settings))

    return venv, package, configured


def ihatemoney_runner_env(venv: AppVenv, url: str, app_env: dict) -> dict:
    """The runner as an init container would run it: FLASK_APP the WSGI module gunicorn is given
    (`ihatemoney.wsgi:application`, named from the package directory, where Flask's loader makes it
    `ihatemoney.wsgi`), DATABASE_URL naming the application's database, the application's settings."""
    return runner_settings(venv, url, FLASK_APP="wsgi:application",
                           IHATEMONEY_SETTINGS_FILE_PATH=app_env["IHATEMONEY_SETTINGS_FILE_PATH"])


def test_ihatemoney_runner_and_its_own_db_upgrade_end_alike(postgres, ihatemoney):
    """From the package directory (where `Migrate`'s `migrations` directory is, as for its own CLI):
    `ihatemoney db upgrade` on one twin, the runner with FLASK_APP on the other. The application's
    `create_app()` runs every revision itself; under the runner that must happen under its lock and be
    reported as applied (#21), and the shipped `script_location = .` must not send alembic to the
    working directory for env.py (exit 2, "Can't find Python file env.py", before #21)."""
    venv, package, configured = ihatemoney
    twins = Twins(postgres, f"ihm_{uuid.uuid4().hex[:8]}", f"ihm_{uuid.uuid4().hex[:8]}")
    plain_url, plain_env = configured(twins.plain)
    runner_url, runner_app_env = configured(twins.runner)
    history = revisions_between(venv, package / "migrations", None, plain_env)
    assert len(history) >= 13, history

    plain = venv.run([venv.script("ihatemoney"), "db", "upgrade"], plain_env, cwd=package)
    assert plain.returncode == 0, plain
    assert version_table_rows(postgres, twins.plain) == {"public.alembic_version": [history[-1]]}

    env = ihatemoney_runner_env(venv, runner_url, runner_app_env)
    result = venv.runner(env, cwd=package)
    assert result.returncode == 0, summary(result)
    assert summary(result)["outcome"] == "upgraded", summary(result)
    assert summary(result)["applied"] == history, summary(result)
    assert_clean(result, IHATEMONEY_PASSWORD)
    assert_same(twins)
    assert advisory_locks(postgres, twins.runner) == []

    again = venv.runner(env, cwd=package)
    assert again.returncode == 0, summary(again)
    assert summary(again)["outcome"] == "current" and summary(again)["applied"] == [], summary(again)
    assert_clean(again, IHATEMONEY_PASSWORD)
    assert_same(twins)


def test_ihatemoney_six_runners_at_once_run_each_revision_once_and_say_so(postgres, ihatemoney):
    """Six replicas' init containers at once on a new database. Each creates the application, whose
    factory runs `flask_migrate.upgrade()`: created before the lock, they raced each other (#21). Each
    revision must run once ("Running upgrade" in one runner's log), every runner exits 0, and what ran
    is reported: the runners' `applied` lists, together, are the history once (none says `current`
    with nothing applied when it, or the application it created, ran the revisions)."""
    venv, package, configured = ihatemoney
    database = f"ihm_{uuid.uuid4().hex[:8]}"
    url, app_env = configured(database)
    history = revisions_between(venv, package / "migrations", None, app_env)
    env = ihatemoney_runner_env(venv, url, app_env)
    procs = [venv.start([venv.script("migration-runner")], env, cwd=package) for _ in range(6)]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        results.append(Result(proc.returncode, out, ""))
    failed = [summary(r) if r.output.strip() else r for r in results if r.returncode]
    assert failed == [], failed
    for r in results:
        assert_clean(r, IHATEMONEY_PASSWORD)
    ran = [re.search(r"-> (\w+)", rec["event"]).group(1) for r in results for rec in r.records
           if rec.get("logger") == "alembic.runtime.migration" and rec["event"].startswith(("Running upgrade",
                                                                                            "Running wrapper"))]
    assert sorted(ran) == sorted(history), ran
    applied = [rev for r in results for rev in summary(r)["applied"]]
    assert sorted(applied) == sorted(history), [summary(r) for r in results]
    assert sum(summary(r)["outcome"] == "upgraded" for r in results) == 1, [summary(r) for r in results]
    assert version_table_rows(postgres, database) == {"public.alembic_version": [history[-1]]}
    assert advisory_locks(postgres, database) == []


# -- privacyIDEA 3.12.3 (#22: SQLAlchemy 1.4) ------------------------------------------------------
# privacyIDEA pins SQLAlchemy<2.0: its virtualenv resolves SQLAlchemy 1.4 and Flask-SQLAlchemy 3.0.
# psycopg2 is the PostgreSQL driver its docs install.
PRIVACYIDEA = App("privacyidea-3.12.3", ("privacyidea==3.12.3", "psycopg2-binary>=2.9"))
PRIVACYIDEA_3_11 = "903a6ed6f6c4"  # the last revision whose docstring says "v3.11"; the five after it are 3.12's


def privacyidea_env(venv: AppVenv, home: Path, url: str) -> dict:
    """privacyIDEA's own configuration, generated: pi.cfg (PRIVACYIDEA_CONFIGFILE, as pi-manage and the WSGI
    script read it) with the database, the secrets and the encryption key file it requires, and a fixed
    node UUID so that creating the application writes no /etc/privacyidea/uuid.txt."""
    home.mkdir(exist_ok=True)
    (home / "enckey").write_bytes(bytes(range(96)))  # 96 bytes, as `pi-manage setup create_enckey` writes
    config = home / "pi.cfg"
    config.write_text(f"SQLALCHEMY_DATABASE_URI = {url!r}\n"
                      "SECRET_KEY = 'not-the-default-secret-key'\n"
                      "PI_PEPPER = 'not-the-default-pepper'\n"
                      f"PI_ENCFILE = {str(home / 'enckey')!r}\n"
                      f"PI_LOGFILE = {str(home / 'privacyidea.log')!r}\n"
                      "PI_NODE = 'node-one'\n"
                      "PI_NODE_UUID = '0d7c3a34-7a06-4d1f-9b5e-2f0d2b8e6c11'\n")
    return venv.env(PRIVACYIDEA_CONFIGFILE=str(config))


def test_privacyidea_on_sqlalchemy_1_4_3_11_database_like_pi_manage_db_upgrade(postgres, tmp_path):
    """privacyIDEA installed with its own pins (SQLAlchemy 1.4) and the runner beside it (#22). Both twins are
    made as privacyIDEA makes a database, `pi-manage setup create_tables` (create_all, stamped at the head:
    its history does not run from an empty database), then taken back to 3.11 with `pi-manage db downgrade`.
    Then `pi-manage db upgrade` (what `privacyidea-schema-upgrade` runs) on one twin and the runner with
    FLASK_APP naming pi-manage's factory on the other. `create_app()` upserts the node's row in `nodename`
    while the application is created; the migrations run on an AUTOCOMMIT connection, from the absolute
    `Migrate(directory=...)` of the installed package."""
    venv = app_venv(PRIVACYIDEA)
    # The point of this test (#22): the runner under the SQLAlchemy the application's pins resolve.
    version = venv.run([str(venv.python), "-c", "import sqlalchemy; print(sqlalchemy.__version__)"], venv.env())
    assert version.stdout.startswith("1.4."), version
    twins = Twins.create(postgres)
    envs = {which: privacyidea_env(venv, tmp_path / f"pi-{which}", with_scheme(twins.url(which), "postgresql+psycopg2"))
            for which in ("plain", "runner")}
    pi_manage = venv.script("pi-manage")

    def made_at_3_11(env: dict) -> list[Result]:
        return [venv.run([pi_manage, *args], env, cwd=tmp_path)
                for args in (("setup", "create_tables"), ("db", "downgrade", PRIVACYIDEA_3_11))]

    with ThreadPoolExecutor(2) as pool:  # both twins at once: each step is mostly privacyIDEA's import
        for done in (r for twin in pool.map(made_at_3_11, envs.values()) for r in twin):
            assert done.returncode == 0, done
    assert version_table_rows(postgres, twins.runner) == {"public.alembic_version": [PRIVACYIDEA_3_11]}
    assert_same(twins)
    migrations = venv.site_packages / "privacyidea" / "migrations"
    pending = revisions_between(venv, migrations, PRIVACYIDEA_3_11, envs["plain"])
    assert len(pending) == 5, pending

    plain = venv.run([pi_manage, "db", "upgrade"], envs["plain"], cwd=tmp_path)
    assert plain.returncode == 0, plain
    assert version_table_rows(postgres, twins.plain) == {"public.alembic_version": [pending[-1]]}

    env = runner_settings(venv, twins.url("runner"), FLASK_APP="privacyidea.cli:create_silent_app",
                          PRIVACYIDEA_CONFIGFILE=envs["runner"]["PRIVACYIDEA_CONFIGFILE"])
    result = venv.runner(env, cwd=tmp_path)
    assert result.returncode == 0, summary(result)
    assert summary(result)["outcome"] == "upgraded" and summary(result)["applied"] == pending, summary(result)
    assert_clean(result)
    assert_same(twins)
    assert advisory_locks(postgres, twins.runner) == []
    with postgres.connect(twins.runner) as conn:  # the application was created: its node row is there
        assert conn.execute("SELECT name FROM nodename").fetchall() == [("node-one",)]

    again = venv.runner(env, cwd=tmp_path)
    assert again.returncode == 0, summary(again)
    assert summary(again)["outcome"] == "current" and summary(again)["applied"] == [], summary(again)
    assert_clean(again)
    assert_same(twins)


# -- OpenStack Keystone 30.0.0 (expand and contract, #23) ------------------------------------------
# psycopg2 for `keystone-manage`, whose oslo.db engine takes `[database] connection` as given; the runner's
# env.py gets `postgresql://` (psycopg 3 under SQLAlchemy 2, which Keystone resolves).
KEYSTONE = App("keystone-30.0.0", ("keystone==30.0.0", "psycopg2-binary>=2.9"))
# A role of its own for keystone-manage: oslo.config reads `[database] connection` from keystone.conf, where
# the runner role's password (every character URLs and ini files trip on) would need its own escaping.
KEYSTONE_ROLE, KEYSTONE_PASSWORD = "keystone", "keystone-secret-pw"

# Keystone's revisions read its configuration (`CONF.saml.relay_state_prefix` in the initial one), which
# `keystone-manage` registers before it runs alembic: this env.py does the same, then runs Keystone's
# own env.py unchanged. What an image that runs the runner for Keystone would ship.
KEYSTONE_ENV = '''
"""Keystone's configuration registered as keystone-manage registers it, then Keystone's own env.py."""
import runpy

import keystone.conf
from keystone.common import sql
from keystone.common.sql import upgrades

if not getattr(keystone.conf, "_registered_for_alembic", False):
    keystone.conf.configure()
    sql.initialize()
    # No configuration file: Keystone's defaults, as `keystone-manage` without one (the revisions only
    # read options such as [saml]; the URL is alembic's sqlalchemy.url).
    keystone.conf.CONF(args=[], project="keystone", default_config_files=[])
    keystone.conf._registered_for_alembic = True
runpy.run_path(upgrades.os.path.join(upgrades.os.path.dirname(upgrades.VERSIONS_PATH), "env.py"))
'''

# `version_locations` as keystone.common.sql.upgrades._find_alembic_conf sets it in code (the shipped
# alembic.ini has none, so alembic alone would find only the initial revision).
KEYSTONE_LOCATIONS = ("import os\nfrom keystone.common.sql import upgrades as u\n"
                      "print(os.pathsep.join([u.VERSIONS_PATH] + [os.path.join(u.VERSIONS_PATH, r, b)\n"
                      "    for r in u.RELEASES for b in u.MIGRATION_BRANCHES]))")


def keystone_project(venv: AppVenv, root: Path) -> Path:
    """An alembic.ini for the runner: Keystone's shipped one, its script location this directory (the env.py
    above, Keystone's script.py.mako), and Keystone's version locations."""
    sql_dir = venv.site_packages / "keystone" / "common" / "sql"
    root.mkdir()
    (root / "env.py").write_text(KEYSTONE_ENV)
    shutil.copy(sql_dir / "migrations" / "script.py.mako", root / "script.py.mako")
    done = venv.run([str(venv.python), "-c", KEYSTONE_LOCATIONS], venv.env(), timeout=120)
    assert done.returncode == 0, done
    shipped = (sql_dir / "alembic.ini").read_text()
    assert shipped.count("script_location = %(here)s/migrations") == 1, shipped
    text = shipped.replace("script_location = %(here)s/migrations",
                           f"script_location = {root}\nversion_locations = {done.stdout.strip()}")
    ini = root / "alembic.ini"
    ini.write_text(text)
    return ini


def test_keystone_expand_then_contract_like_keystone_manage_db_sync(postgres, tmp_path):
    """Keystone's own scripts (branches labelled `expand` and `contract`, one directory per release): the runner
    with MIGRATE_TARGET=expand@head then heads on one twin, `keystone-manage db_sync --expand` then `--contract`
    on the other; schema and version rows equal after each step. Between the two, `check` and `wait` for
    expand@head exit 0 while the contract branch is pending, and `heads` lists both heads with their labels."""
    venv = app_venv(KEYSTONE)
    ini = keystone_project(venv, tmp_path / "keystone")
    twins = Twins.create(postgres)
    postgres.create_role(KEYSTONE_ROLE, KEYSTONE_PASSWORD)
    postgres.execute(f"ALTER DATABASE {twins.plain} OWNER TO {KEYSTONE_ROLE}")
    conf = tmp_path / "keystone.conf"
    plain_url = postgres.url(twins.plain, KEYSTONE_ROLE, KEYSTONE_PASSWORD)
    conf.write_text(f"[database]\nconnection = {with_scheme(plain_url, 'postgresql+psycopg2')}\n")

    def db_sync(step: str) -> None:
        done = venv.run([venv.script("keystone-manage"), "--config-file", str(conf), "db_sync", step], venv.env())
        assert done.returncode == 0, done

    expand_env = runner_settings(venv, twins.url("runner"), ALEMBIC_CONFIG=str(ini), MIGRATE_TARGET="expand@head")
    heads_env = runner_settings(venv, twins.url("runner"), ALEMBIC_CONFIG=str(ini))

    heads = venv.runner(heads_env, "heads", cwd=tmp_path)
    assert heads.returncode == 0, summary(heads)
    assert summary(heads)["outcome"] == "one head per branch", summary(heads)
    labelled = dict(re.findall(r"(\w+) \((expand|contract)\)", summary(heads)["event"]))
    assert sorted(labelled.values()) == ["contract", "expand"], summary(heads)
    expand_head = next(rev for rev, label in labelled.items() if label == "expand")
    contract_head = next(rev for rev, label in labelled.items() if label == "contract")

    pending = venv.runner(expand_env, "check", cwd=tmp_path)
    assert pending.returncode == 9, summary(pending)
    expand_revisions = summary(pending)["pending"]
    assert expand_revisions[-1] == expand_head and contract_head not in expand_revisions, expand_revisions

    db_sync("--expand")
    expand = venv.runner(expand_env, cwd=tmp_path)
    assert expand.returncode == 0, summary(expand)
    assert summary(expand)["applied"] == expand_revisions, summary(expand)
    assert summary(expand)["target"] == "expand@head"
    assert_clean(expand)
    assert_same(twins)
    at_expand = version_table_rows(postgres, twins.runner)["public.alembic_version"]
    assert expand_head in at_expand and contract_head not in at_expand, at_expand

    for command in ("check", "wait"):
        ready = venv.runner(expand_env, command, cwd=tmp_path)
        assert ready.returncode == 0, summary(ready)
        assert summary(ready)["outcome"] == "current", summary(ready)
        assert_clean(ready)
    contract_pending = venv.runner(heads_env, "check", cwd=tmp_path)
    assert contract_pending.returncode == 9, summary(contract_pending)
    assert summary(contract_pending)["pending"][-1] == contract_head, summary(contract_pending)

    db_sync("--contract")
    contract = venv.runner(heads_env, cwd=tmp_path)
    assert contract.returncode == 0, summary(contract)
    assert summary(contract)["applied"] == summary(contract_pending)["pending"], summary(contract)
    assert_clean(contract)
    assert_same(twins)
    assert sorted(version_table_rows(postgres, twins.runner)["public.alembic_version"]) == sorted(
        [expand_head, contract_head])
    assert advisory_locks(postgres, twins.runner) == []

    again = venv.runner(heads_env, cwd=tmp_path)
    assert again.returncode == 0 and summary(again)["outcome"] == "current", summary(again)
