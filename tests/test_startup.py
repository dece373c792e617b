"""The console script's process (runner/startup.py): its imports frozen out of the collector's way, the project's
code under the collector as under alembic's CLI, and nothing of it in an interpreter the runner is imported into."""

from __future__ import annotations

import gc
import json

import pytest

from runner import startup

from .conftest import summary
from .fidelity import Twins
from .projects import chain, make_project

pytestmark = pytest.mark.core

# Appended to env.py: what the collector looks like to the project's code, one JSON line a run of env.py.
PROBE = '''
import gc as _gc, json as _json, os as _os
with open(_os.environ["GC_PROBE"], "a") as _probe:
    _probe.write(_json.dumps({"enabled": _gc.isenabled(), "threshold": _gc.get_threshold(),
                              "frozen": _gc.get_freeze_count()}) + "\\n")
'''


def _probed(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_env_py_runs_under_the_collector_as_under_alembic_with_the_runners_imports_frozen(postgres, tmp_path):
    ini = make_project(tmp_path / "project", chain(3))
    env_py = ini.parent / "migrations" / "env.py"
    env_py.write_text(env_py.read_text() + PROBE)
    twins = Twins.create(postgres)
    plain_probe, runner_probe = tmp_path / "plain.jsonl", tmp_path / "runner.jsonl"

    plain = twins.run_alembic(ini, env={"GC_PROBE": str(plain_probe)})
    result = twins.run_runner(ini, GC_PROBE=str(runner_probe))

    assert plain.returncode == 0, plain
    assert result.returncode == 0 and summary(result)["outcome"] == "upgraded", result
    twins.assert_same()
    [under_alembic], under_runner = _probed(plain_probe), _probed(runner_probe)
    assert under_runner, result
    for seen in under_runner:
        # The collector on, at the thresholds alembic's process has: the project's code collects as it does there.
        assert seen["enabled"] is True and under_alembic["enabled"] is True, (seen, under_alembic)
        assert seen["threshold"] == under_alembic["threshold"], (seen, under_alembic)
        # What the runner imported (pydantic, alembic, SQLAlchemy, psycopg) is frozen; alembic's CLI freezes nothing.
        assert seen["frozen"] > 50_000, seen
    assert under_alembic["frozen"] == 0, under_alembic


def test_an_interpreter_the_runner_is_imported_into_keeps_its_collector_as_it_was():
    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    with startup.importing():
        assert gc.isenabled()  # not paused: this is pytest's process, not the console script's
        import runner.commands  # noqa: F401
    assert gc.isenabled() and gc.get_freeze_count() == frozen


def test_a_failed_import_in_the_console_scripts_process_leaves_the_collector_on(monkeypatch):
    monkeypatch.setattr(startup, "_own_process", True)
    try:
        with pytest.raises(ImportError):
            with startup.importing():
                assert not gc.isenabled()  # paused while the stack imports
                import runner_no_such_module  # noqa: F401
        assert gc.isenabled()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()  # pytest's own objects back to the collector
        gc.enable()
