"""`plan --sql`: alembic's offline SQL from the database's revision to the target, printed on stdout."""

from __future__ import annotations

import functools
import io
import sys

from alembic import command as alembic_command
from alembic.config import Config
from alembic.script import ScriptDirectory

from . import envpy, revisions, target
from .errors import ConfigError
from .wait import first_line
from .wording import names


def print_upgrade(config: Config, script: ScriptDirectory, start: tuple[str, ...], baseline: str | None,
                  goal: target.Target) -> None:
    """alembic's offline SQL from `start` to `goal`, on stdout (logs stay on stderr)."""
    if len(start) > 1:
        raise ConfigError("plan --sql needs the database at one revision; it is at " + names(start))
    buffer = io.StringIO()
    config.output_buffer = buffer
    running = []

    def steps(current, context):
        # What `alembic upgrade <start>:<goal> --sql` does, noting which revision is being rendered.
        revisions_ = target.upgrade_steps(script, goal, current)
        for step in revisions_:
            step.migration_fn = _noting(step.migration_fn, step.revision, running)
        return revisions_

    try:
        if baseline:
            with envpy.no_exit():
                alembic_command.stamp(config, baseline, sql=True)
        envpy.run(config, script, steps, as_sql=True, starting_rev=start[0] if start else None,
                  destination_rev=goal.name)
    except Exception as e:
        where = f"revision {running[-1].revision} ({revisions.title(running[-1].doc)})" if running else "env.py"
        raise ConfigError(f"plan --sql: {where} cannot be rendered offline (it needs a live database?): "
                          f"{type(e).__name__}: {first_line(e)}") from None
    sys.__stdout__.write(buffer.getvalue())
    sys.__stdout__.flush()


def _noting(migration_fn, revision, running: list):
    @functools.wraps(migration_fn)
    def noted(**kwargs):
        running.append(revision)
        return migration_fn(**kwargs)

    return noted
