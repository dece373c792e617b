"""Errors the runner stops on, and the exit code each one means.

Every failure the runner knows about is a ``RunnerError``; ``cli`` turns it into
one log line and its ``exit_code``. Anything else escaping is a bug (exit 1).

    RunnerError
    ├── ConfigError            2  a setting, alembic.ini or the connection mode is wrong
    ├── DatabaseUnreachable    3  the database cannot be reached (or was lost)
    ├── LockTimeout            4  another runner held the advisory lock too long
    ├── MultipleHeads          5  the scripts have more than one head
    ├── LegacyDatabase         6  tables but no version table, and no usable baseline
    ├── RevisionFailed         7  a revision raised; the database is left consistent
    ├── DatabaseAhead          8  the database names revisions the scripts do not know (not let through)
    ├── PendingRevisions       9  `check`/`wait`/`verify`: revisions are not applied yet
    ├── SchemaDrift           10  `verify`: the schema differs from env.py's models, or an index is invalid
    ├── LintFindings          11  `lint`: squawk found statements that lock or break what runs
    ├── Irreversible          12  `roundtrip`: a revision's downgrade does not undo its upgrade
    └── TargetsFailed         13  a fleet: targets failed with different codes (one shared code is that code)
    Interrupted  130 / 143        SIGINT / SIGTERM (a KeyboardInterrupt, so that
                                  psycopg cancels the statement in flight)

``EXIT_CODES`` is the one table of codes: the README, ``--help`` and the Helm
chart's podFailurePolicy are generated from it (``python -m runner.errors``).
"""

from __future__ import annotations

import json
import signal
import sys


class RunnerError(Exception):
    """A failure the runner reports in one line and an exit code."""

    exit_code = 1
    meaning = "unexpected error (a bug: please report it)"
    # Whether running the same image again can succeed without a human changing
    # something; the Helm chart fails a Job at once on the codes where it cannot.
    retryable = False


class ConfigError(RunnerError):
    """A setting, the Alembic config or the connection is unusable as given."""

    exit_code = 2
    meaning = ("configuration error (a variable, alembic.ini, a pooled connection, an upgrade target the scripts do "
               "not have, or a downgrade target not below the database)")


class DatabaseUnreachable(RunnerError):
    """The database could not be reached in time, refused us, or was lost."""

    exit_code = 3
    meaning = "database unreachable, refused the login, or the connection was lost"
    retryable = True


class LockTimeout(RunnerError):
    """Another session held the advisory lock for longer than MIGRATE_LOCK_TIMEOUT."""

    exit_code = 4
    meaning = "timed out waiting for the advisory lock held by another session"
    retryable = True


class MultipleHeads(RunnerError):
    """The migration scripts have more than one head."""

    exit_code = 5
    meaning = ("the migration scripts have more than one head in one branch (heads that are each the one head of a "
               "branch label of their own, such as expand and contract, are not)")


class LegacyDatabase(RunnerError):
    """The database has tables but no version, and no usable baseline revision."""

    exit_code = 6
    meaning = ("legacy database without MIGRATE_BASELINE_REVISION, an unknown baseline, or one "
               "MIGRATE_VERIFY_BASELINE found different from the schema")


class RevisionFailed(RunnerError):
    """A revision failed; the database is at the revision read back afterwards."""

    exit_code = 7
    meaning = "a revision failed (the database stays at the last committed revision)"


class DatabaseAhead(RunnerError):
    """The version table names revisions the scripts do not contain, and MIGRATE_ALLOW_AHEAD refuses them."""

    exit_code = 8
    meaning = "the database is at revisions these scripts do not know, and MIGRATE_ALLOW_AHEAD refuses it (see Rollbacks)"


class PendingRevisions(RunnerError):
    """Read-only commands: the database is not at the scripts' heads (or MIGRATE_TARGET) yet."""

    exit_code = 9
    meaning = "`check`/`wait`/`verify`: revisions are pending"
    retryable = True


class SchemaDrift(RunnerError):
    """`verify`: at heads, but the schema differs from env.py's target_metadata or has an invalid index."""

    exit_code = 10
    meaning = ("`verify`: the schema differs from env.py's target_metadata (as `alembic check` compares them), or "
               "an index is invalid (a failed CREATE INDEX CONCURRENTLY)")


class LintFindings(RunnerError):
    """`lint`: squawk found problems in the SQL of the revisions linted."""

    exit_code = 11
    meaning = "`lint`: squawk found statements that block traffic or break running code in the revisions' SQL"


class Irreversible(RunnerError):
    """`roundtrip`: a revision's downgrade() raised, did nothing, or left a schema other than the one it started
    from, or the upgrade after it built another."""

    exit_code = 12
    meaning = ("`roundtrip`: a revision's downgrade() raised, undid nothing, or left the schema other than before its "
               "upgrade() (or the upgrade after it built another one)")


class TargetsFailed(RunnerError):
    """A fleet (DATABASE_URLS_FILE): some targets failed, not all with one code.

    When every failed target shares one code the run exits with that code (the
    instance's `exit_code`), so that the Job's podFailurePolicy still tells what
    a retry can cure.
    """

    exit_code = 13
    meaning = ("a fleet (DATABASE_URLS_FILE): targets failed with different exit codes (when every failed target "
               "exits with one code, the run exits with that code); the summary lists each target's")


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; the exit code is 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


ERRORS: tuple[type[RunnerError], ...] = (
    ConfigError,
    DatabaseUnreachable,
    LockTimeout,
    MultipleHeads,
    LegacyDatabase,
    RevisionFailed,
    DatabaseAhead,
    PendingRevisions,
    SchemaDrift,
    LintFindings,
    Irreversible,
    TargetsFailed,
)

EXIT_OK = 0
EXIT_BUG = RunnerError.exit_code
EXIT_SIGNALS = {signal.SIGINT: 128 + signal.SIGINT, signal.SIGTERM: 128 + signal.SIGTERM}


def exit_codes() -> list[dict]:
    """Every exit code with its name, meaning and whether a retry can help."""
    rows = [{"code": EXIT_OK, "name": "ok", "retryable": False,
             "meaning": "done: the database is at the scripts' heads, or at or beyond MIGRATE_TARGET (`downgrade`: at "
                        "its target), or ahead of them and let through by MIGRATE_ALLOW_AHEAD"}]
    rows.append({"code": EXIT_BUG, "name": "RunnerError", "meaning": RunnerError.meaning, "retryable": False})
    rows += [{"code": e.exit_code, "name": e.__name__, "meaning": e.meaning, "retryable": e.retryable} for e in ERRORS]
    for signum, code in EXIT_SIGNALS.items():
        rows.append({"code": code, "name": f"Interrupted ({signum.name})",
                     "meaning": f"stopped by {signum.name}; lock released, statement cancelled", "retryable": True})
    return rows


def markdown_table() -> str:
    """The exit-code table as the README shows it."""
    lines = ["| code | error | meaning | a retry can help |", "|---|---|---|---|"]
    for row in exit_codes():
        lines.append(f"| {row['code']} | `{row['name']}` | {row['meaning']} | {'yes' if row['retryable'] else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    # `python -m runner.errors [markdown|json]`: the table for docs and the chart.
    if sys.argv[1:] == ["json"]:
        print(json.dumps(exit_codes(), indent=2))
    else:
        print(markdown_table())
