import re

import psycopg
import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from runner.errors import ConfigError, LegacyDatabase, MultipleHeads
from runner.revisions import (applied_between, check_single_head, database_state, load_config, load_scripts,
                              merge_command, pending_revisions, refuse_legacy, state_of)

from .envs import DEFAULT_DRIVER
from .projects import Rev, chain, make_project

# Also run on SQLAlchemy 1.4 (python3 dev.py test-sa14).
pytestmark = pytest.mark.core


def scripts(tmp_path, revisions):
    ini = make_project(tmp_path / "p", revisions)
    config = load_config(ini, make_url("postgresql+psycopg://u:p%25%40@h/db"))
    return config, load_scripts(config)


def test_percent_encoded_password_survives_configparser(tmp_path):
    config, _ = scripts(tmp_path, chain(1))
    assert make_url(config.get_main_option("sqlalchemy.url")).password == "p%@"


def test_unparseable_alembic_ini_is_a_config_error(tmp_path):
    bad = tmp_path / "alembic.ini"
    bad.write_text("[alembic\nscript_location = x\n")
    with pytest.raises(ConfigError, match="ALEMBIC_CONFIG"):
        load_config(bad, make_url("postgresql+psycopg://u@h/db"))


def test_missing_script_location_is_a_config_error(tmp_path):
    config, _ = scripts(tmp_path, chain(1))
    config.set_main_option("script_location", str(tmp_path / "gone"))
    with pytest.raises(ConfigError, match="ALEMBIC_CONFIG"):
        load_scripts(config)


def test_single_head_passes_and_two_heads_name_parents_and_merge(tmp_path):
    _, script = scripts(tmp_path, chain(2))
    assert check_single_head(script) == ("r0002",)
    _, forked = scripts(tmp_path / "f", [Rev("a", None), Rev("b", "a", message="bee"), Rev("c", "a")])
    with pytest.raises(MultipleHeads) as error:
        check_single_head(forked)
    text = str(error.value)
    assert "2 heads" in text and "parent a" in text and "bee" in text
    assert merge_command(forked.get_heads()) in text


def test_state_classifies_fresh_legacy_pending_current_ahead(tmp_path, database_url):
    _, script = scripts(tmp_path, chain(3))
    engine = create_engine(make_url(database_url).set(drivername=f"postgresql+{DEFAULT_DRIVER}"))

    def state():
        with engine.connect() as conn:
            return state_of(conn, script)

    assert state().kind == "fresh"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE legacy_t (id int)")
        assert (state().kind, state().tables) == ("legacy", ["legacy_t"])
        conn.execute("CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY)")
        conn.execute("INSERT INTO alembic_version VALUES ('r0001')")
        pending = state()
        assert pending.kind == "pending" and [s.revision for s in pending.pending] == ["r0002", "r0003"]
        conn.execute("UPDATE alembic_version SET version_num = 'r0003'")
        assert state().kind == "current" and state().current == ("r0003",)
        conn.execute("UPDATE alembic_version SET version_num = 'zzz'")
        ahead = state()
        assert ahead.kind == "ahead" and ahead.unknown == ("zzz",)
    engine.dispose()


def test_pending_from_base_is_every_revision_in_order(tmp_path):
    _, script = scripts(tmp_path, chain(4))
    assert [s.revision for s in pending_revisions(script, ())] == ["r0001", "r0002", "r0003", "r0004"]


def test_legacy_refusal_names_tables_and_the_variable(tmp_path):
    from runner.revisions import State

    _, script = scripts(tmp_path, chain(2))
    state = State(kind="legacy", tables=[f"t{i}" for i in range(7)])
    with pytest.raises(LegacyDatabase) as error:
        refuse_legacy(state, None, script)
    assert "7 tables" in str(error.value) and "t0" in str(error.value) and "MIGRATE_BASELINE_REVISION" in str(error.value)
    with pytest.raises(LegacyDatabase, match="nope"):
        refuse_legacy(state, "nope", script)
    assert refuse_legacy(state, "r0001", script) == "r0001"


@pytest.mark.parametrize("source, words", [
    ("revision = 'x'\ndown_revision = None\ndef upgrade(:\n", "SyntaxError"),
    ("import no_such_module_here\n", "ModuleNotFoundError"),
])
def test_a_broken_revision_file_is_a_config_error(tmp_path, source, words):
    ini = make_project(tmp_path / "p", chain(1))
    (tmp_path / "p" / "migrations" / "versions" / "broken.py").write_text(source)
    with pytest.raises(ConfigError, match=words):
        load_scripts(load_config(ini))


def test_state_through_env_py_finds_the_version_table_where_env_py_keeps_it(tmp_path, database_url, postgres, database):
    ini = make_project(tmp_path / "p", chain(2))
    env = tmp_path / "p" / "migrations" / "env.py"
    env.write_text(env.read_text().replace("target_metadata=target_metadata", 
                                           "target_metadata=target_metadata, version_table_schema='app', "
                                           "version_table='app_version'"))
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA app; CREATE TABLE app.app_version (version_num varchar(32) PRIMARY KEY); "
                     "INSERT INTO app.app_version VALUES ('r0001'); CREATE TABLE public.r_1 (id int)")
    config = load_config(ini, make_url(database_url).set(drivername=f"postgresql+{DEFAULT_DRIVER}"))
    state = database_state(config, load_scripts(config))
    assert (state.kind, state.current, state.schema, state.table) == ("pending", ("r0001",), "app", "app_version")
    with pytest.raises(ConfigError, match="MIGRATE_VERSION_TABLE_SCHEMA=public but env.py keeps the version table "
                                          "at app.app_version"):
        database_state(config, load_scripts(config), version_table_schema="public")


def test_legacy_is_refused_while_this_projects_version_table_sits_in_another_schema(tmp_path, database_url, postgres,
                                                                                  database):
    _, script = scripts(tmp_path, chain(2))
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA app; CREATE TABLE app.alembic_version (version_num varchar(32) PRIMARY KEY); "
                     "INSERT INTO app.alembic_version VALUES ('r0002'); CREATE TABLE public.r_1 (id int)")
    engine = create_engine(make_url(database_url).set(drivername=f"postgresql+{DEFAULT_DRIVER}"))
    with engine.connect() as conn:
        with pytest.raises(ConfigError, match="app.alembic_version holds revisions of these scripts"):
            state_of(conn, script)
        # Another project's version table elsewhere (revisions these scripts do not know) does not count.
        conn.exec_driver_sql("UPDATE app.alembic_version SET version_num = 'other'")
        assert state_of(conn, script).kind == "legacy"
    engine.dispose()


def test_applied_between_lists_only_what_lies_between(tmp_path):
    _, script = scripts(tmp_path, chain(4))
    assert applied_between(script, (), ("r0002",)) == ["r0001", "r0002"]
    assert applied_between(script, ("r0002",), ("r0004",)) == ["r0003", "r0004"]
    assert applied_between(script, ("r0002",), ("r0002",)) == []
    assert applied_between(script, ("unknown",), ("r0002",)) == []


def labelled(tmp_path, extra=()):
    """The expand/contract layout: a trunk, `expand` and `contract` branches, each contract revision depending on
    its expand revision (OpenStack's layout)."""
    revs = [Rev("a1", None), Rev("e1", "a1"), Rev("e2", "e1"), Rev("c1", "a1"), Rev("c2", "c1"), *extra]
    config, script = scripts(tmp_path, revs)
    versions = tmp_path / "p" / "migrations" / "versions"
    for rev, label, depends in (("e1", "expand", None), ("c1", "contract", "e1"), ("c2", None, "e2")):
        path = versions / f"{rev}.py"
        text = path.read_text()
        if label:
            text = text.replace("branch_labels = None", f"branch_labels = ({label!r},)")
        if depends:
            text = text.replace("depends_on = None", f"depends_on = {depends!r}")
        path.write_text(text)
    return load_scripts(config)


def test_one_head_per_labelled_branch_passes_and_a_fork_inside_a_branch_does_not(tmp_path):
    script = labelled(tmp_path)
    assert sorted(check_single_head(script)) == ["c2", "e2"]
    forked = labelled(tmp_path / "f", [Rev("e3", "e2"), Rev("e4", "e2")])
    with pytest.raises(MultipleHeads, match="2 heads in branch expand: e3 .*besides c2 \\(contract\\)"):
        check_single_head(forked)
    stray = labelled(tmp_path / "s", [Rev("x1", "a1")])
    with pytest.raises(MultipleHeads, match="1 head outside any branch label of its own: x1"):
        check_single_head(stray)


def test_targets_resolve_and_judge_what_is_pending_and_reached(tmp_path):
    from runner import target

    script = labelled(tmp_path)
    expand = target.resolve(script, "expand@head")
    assert (expand.revisions, str(expand)) == (("e2",), "expand@head (e2)")
    assert [r.revision for r in target.pending(script, expand, ())] == ["a1", "e1", "e2"]
    assert [r.revision for r in target.pending(script, expand, ("c1",))] == ["e2"]
    # A contract revision depending on e2 stands for it: at or beyond the target, nothing pending.
    assert target.reached(script, expand, ("c2",)) and target.pending(script, expand, ("c2",)) == []
    heads = target.resolve(script, "heads")
    assert not target.reached(script, heads, ("c1", "e2")) and target.reached(script, heads, ("c2",))
    assert target.resolve(script, "contract@c1").revisions == ("c1",)
    for bad in ("nosuch@head", "zz", "head", "base", "+1", "expand@-1", "e1:e2"):
        with pytest.raises(ConfigError, match=re.escape(f"MIGRATE_TARGET={bad!r}")):
            target.resolve(script, bad)
