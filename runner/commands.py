"""The runner's commands: each a verb taking the settings first, filling in a Report, returning an exit code.

`upgrade` and `downgrade` write (through `migrate`, under the lock, which
`_locked_project` takes; `locked_run` runs the migration while it is held);
`check`, `wait`, `plan` and `verify` read through env.py as `alembic current`
does (`states`) and take no lock; `heads` needs no database. The work itself is
in the modules each command calls.
"""

from __future__ import annotations

import functools
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import tenacity
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy.engine import URL, make_url

from . import (baseline, credentials, database, drift, envpy, fastpath, flaskapp, lineage, locked_run, log, migrate,
               offline_sql, revisions, session_options, sessions, states, target)
from . import history as history_
from . import lint as lint_
from . import roundtrip as roundtrip_
from .errors import EXIT_OK, ConfigError, DatabaseUnreachable, LintFindings, PendingRevisions, SchemaDrift
from .lock import Lock, advisory_lock
from .report import Report
from .settings import DRIVERS, Settings
from .wait import fatal_reason, first_line, first_login, refusal
from .wording import count, names

logger = logging.getLogger("runner")


def upgrade(settings: Settings, report: Report) -> int:
    """Wait for the database, take the lock, check heads, stamp a baseline if asked, upgrade to MIGRATE_TARGET."""
    with _locked_project(settings, report) as project:
        settings, url, config, script = project.settings, project.url, project.config, project.script
        goal = _goal(settings, script, report)

        def decide(state: revisions.State) -> str | None:
            if state.kind == "ahead":
                states.let_ahead_through(settings, state, script)
            if state.kind != "legacy":
                return None
            baseline = revisions.refuse_legacy(state, settings.baseline_revision, script)
            if baseline is None:
                logger.info("treating the legacy database as at base (MIGRATE_BASELINE_REVISION=base): every "
                            "revision applies on top of its %d tables", len(state.tables), extra={"baseline": "base"})
            else:
                logger.info("stamping baseline %s on the legacy database", baseline, extra={"baseline": baseline})
            return baseline

        recorder = _history(settings, url, report)

        def run(progress: migrate.Progress, decide: Callable) -> None:
            migrate.upgrade(config, script, progress, decide,
                            record=lineage.of(script, settings.image, fastpath.record(settings)),
                            expected=states.expected_version_table(settings), tables_before=project.tables_before,
                            goal=goal, history=recorder)

        def prove_baseline(lock) -> None:
            # Under the lock, before the run that would stamp it: a baseline that does not match writes nothing.
            if not settings.verify_baseline or settings.baseline_revision in (None, "base"):
                return
            scratch = settings.scratch_url()
            if scratch is not None:
                log.add_url_secrets(scratch)
            state = states.read_or_fail(config, script, settings)
            if state.kind == "legacy":
                revision = revisions.refuse_legacy(state, settings.baseline_revision, script)
                baseline.prove(functools.partial(_config, settings), revision, url=url, given=settings.url(),
                               schema=state.schema, table=state.table, lock=lock, scratch=scratch,
                               lock_timeout=settings.lock_timeout)

        progress, reached = locked_run.under_lock(settings, report, url, project.lock, script, decide, run,
                                                  before=prove_baseline)
    start = progress.start
    ran_from = flaskapp.heads_before_its_own_upgrade()
    if ran_from is not None:  # revisions the Flask application applied itself as it was created are this run's
        start = report.from_revision = ran_from
    report.applied = revisions.applied_between(script, start, reached)
    if progress.state.kind == "ahead":
        if set(reached) != set(progress.state.current):
            raise ConfigError(f"the database moved from {names(progress.state.current)} to {names(reached)} while "
                              f"the runner held the lock (written outside it?)")
        report.outcome = "ahead"
        report.message = f"ahead of the scripts: at {names(reached)}, heads {names(script.get_heads())}; nothing done"
        return EXIT_OK
    # Success is the target read back, not env.py returning.
    missing = target.pending(script, goal, reached)
    if missing:
        raise ConfigError(
            f"env.py returned without reaching {_aim(goal)}: the database is at {names(reached)}, "
            f"{count(len(missing), 'revision')} not applied ({', '.join(r.revision for r in missing)}); does env.py "
            f"commit (context.begin_transaction()) and call context.run_migrations() in online mode?")
    if progress.state.kind == "current" and not report.applied:
        report.outcome = "current"
        report.message = (f"already at heads: {names(reached)}" if goal.is_heads else
                          f"already at or beyond {goal}: {names(reached)}")
        return EXIT_OK
    return _moved(report, "upgraded", report.applied, "applied", goal)


def downgrade(settings: Settings, report: Report, target: str) -> int:
    """Under the lock, revert the revisions above `target` (a revision of the scripts, or base) through env.py."""
    with _locked_project(settings, report) as project:
        settings, url, config, script = project.settings, project.url, project.config, project.script
        goal = revisions.downgrade_target(script, target)

        recorder = _history(settings, url, report)

        def run(progress: migrate.Progress, decide: Callable) -> None:
            migrate.downgrade(config, script, progress, goal or "base", decide,
                              record=lineage.of(script, settings.image),
                              expected=states.expected_version_table(settings), history=recorder)

        progress, reached = locked_run.under_lock(settings, report, url, project.lock, script,
                                                  lambda state: revisions.refuse_downgrade(state, script, goal), run)
    report.reverted = revisions.reverted_between(script, progress.start, reached)
    if (goal is None and reached) or (goal is not None and goal not in reached):
        raise ConfigError(f"env.py returned without reaching {goal or 'base'}: the database is at {names(reached)}; "
                          f"does env.py commit (context.begin_transaction())?")
    if not report.reverted:
        report.outcome = "current"
        report.message = f"already at {goal or 'base'}: nothing to revert"
        return EXIT_OK
    return _moved(report, "downgraded", report.reverted, "reverted")


def _moved(report: Report, outcome: str, moved: list[str], verb: str, goal: target.Target | None = None) -> int:
    """Exit 0 with the summary of an upgrade or a downgrade that changed the database."""
    report.outcome = outcome
    aim = f" (target {goal})" if goal is not None and not goal.is_heads else ""
    report.message = (f"{outcome}: {names(report.from_revision)} -> {names(report.to_revision)}{aim}, "
                      f"{count(len(moved), 'revision')} {verb}, lock wait {report.lock_wait:.1f}s, "
                      f"total {time.monotonic() - report.started:.1f}s")
    return EXIT_OK


@dataclass
class _Project:
    """What a writing command works on, once the lock is held."""

    settings: Settings  # as the Flask application completed them, if there is one
    url: URL  # the runner's own sessions'
    config: Config
    script: ScriptDirectory
    lock: Lock
    tables_before: frozenset[int]  # the tables there were when the lock was taken (revisions.existing_tables)


@contextmanager
def _locked_project(settings: Settings, report: Report) -> Iterator[_Project]:
    """Wait for the database, take the lock, and load the project; the lock is released after the `with`.

    The scripts load before the lock (a broken project fails without waiting for it), except a
    Flask application's, which is created under the lock when DATABASE_URL names the database:
    its factory may write, or even migrate, as it is created.
    """
    url = _url(settings)
    under_lock = flaskapp.loads_under_lock(settings)
    if not under_lock:
        config, script = _config_and_scripts(settings, settings.url())
    # Writes need the primary: a standby (a failover under way) is waited out like a database not up yet.
    # The fast path's session, when it fell through, is the first login (one login fewer).
    version, first_session = first_login(url, settings.wait_timeout, primary=True, session=fastpath.take_session())
    # The lock's session is the first to carry the session options: it reports a proxy refusing them.
    check_interval = session_options.apply_after_login(settings, version)
    # The wait's session, still open, serves the lock as the second session that tells a transaction pooler.
    with advisory_lock(url, settings.lock_key, settings.lock_timeout, schema=settings.version_table_schema,
                       table=settings.version_table, second_session=first_session,
                       x_args=settings.x_arguments()) as lock:
        report.lock_wait = lock.waited
        # Timeouts for migration sessions only: the lock wait above must not be cut short by them.
        session_options.apply_for_migrations(settings, check_interval)
        # Before anything of the project runs under the lock: its code may create tables of its own.
        tables_before = revisions.existing_tables(lock.query)
        if not under_lock:
            yield _Project(settings, url, config, script, lock, tables_before)
            return
        with flaskapp.application(settings) as settings:
            config, script = _config_and_scripts(settings, settings.url())
            yield _Project(settings, url, config, script, lock, tables_before)


def check(settings: Settings, report: Report) -> int:
    """Exit 0 if the database is at (or beyond) MIGRATE_TARGET, 9 if revisions are pending, 8 if it is ahead."""
    url, config, script = _scripts(settings)
    goal = _goal(settings, script, report)
    session_options.wait_and_apply(settings, url)
    state = states.read_or_fail(config, script, settings, goal=goal)
    states.log(state)
    return states.judge(state, report, script, settings, goal)


def wait(settings: Settings, report: Report) -> int:
    """Repeat `check` with backoff until the database is at MIGRATE_TARGET or MIGRATE_WAIT_TIMEOUT passes."""
    url, config, script = _scripts(settings)
    goal = _goal(settings, script, report)
    last_logged = [None]

    def attempt() -> int:
        try:
            with database.tagged():
                state = states.read(config, script, settings, goal=goal)
        except Exception as e:
            if isinstance(e, credentials.Unavailable):  # no password this time: a token service briefly down
                raise _NotUpYet(str(e)) from None
            if credentials.may_be_stale(e):  # a rotated password refused before its file caught up
                raise _NotUpYet(first_line(e)) from None
            if fatal_reason(e):
                raise refusal(url, e) from None
            if database.is_disconnect(e):
                raise _NotUpYet(first_line(e)) from None
            raise envpy.failure(e) from None
        if (state.kind, state.current) != last_logged[0]:
            last_logged[0] = (state.kind, state.current)
            states.log(state)
        return states.judge(state, report, script, settings, goal)

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_delay(settings.wait_timeout),
        # Capped at 1 s: an application pod should start within a second or two of the migration.
        wait=tenacity.wait_random_exponential(multiplier=0.1, max=1),
        retry=tenacity.retry_if_exception_type((PendingRevisions, _NotUpYet)),
        reraise=True,
    )
    try:
        return retrying(attempt)
    except PendingRevisions as e:
        raise PendingRevisions(f"still not at {_aim(goal)} after {settings.wait_timeout:g}s (MIGRATE_WAIT_TIMEOUT): "
                               f"{e}") from None
    except _NotUpYet as e:
        raise DatabaseUnreachable(f"database {database.endpoint(url)} not reachable after "
                                  f"{settings.wait_timeout:g}s (MIGRATE_WAIT_TIMEOUT): {e}") from None


class _NotUpYet(Exception):
    """`wait`: the database did not answer this time; waiting may still cure it."""


def plan(settings: Settings, report: Report, sql: bool = False) -> int:
    """Say what `upgrade` would do from the database's current state; with sql, print the SQL. Changes nothing."""
    url, config, script = _scripts(settings)
    goal = _goal(settings, script, report)
    session_options.wait_and_apply(settings, url)
    state = states.read_or_fail(config, script, settings, goal=goal)
    states.log(state)
    report.from_revision = report.to_revision = state.current
    if state.kind == "ahead":
        states.let_ahead_through(settings, state, script)
        report.outcome = "planned"
        report.message = (f"plan: the database is ahead of the scripts at {names(state.current)} (heads "
                          f"{names(script.get_heads())}): upgrade would change nothing")
        return EXIT_OK
    start = state.current
    baseline = None
    if state.kind == "legacy":
        baseline = revisions.refuse_legacy(state, settings.baseline_revision, script)
        logger.info("would %s on the legacy database (%s, no version table)",
                    f"stamp baseline {baseline}" if baseline else "upgrade from base",
                    count(len(state.tables), "table"), extra={"baseline": baseline or "base"})
        start = (baseline,) if baseline else ()
    pending = revisions.pending_revisions(script, start, goal)
    for revision in pending:
        logger.info("would apply %s: %s", revision.revision, revisions.title(revision.doc),
                    extra={"revision": revision.revision})
    report.pending = [revision.revision for revision in pending]
    report.to_revision = goal.revisions
    report.outcome = "planned"
    report.message = (f"plan: {names(state.current)} -> {names(goal.revisions)}"
                      f"{'' if goal.is_heads else f' (target {goal.name})'}"
                      f"{f' (stamping baseline {baseline} first)' if baseline else ''}, "
                      f"{count(len(pending), 'revision')} would be applied")
    if sql:
        offline_sql.print_upgrade(config, script, start, baseline, goal)
    return EXIT_OK


def verify(settings: Settings, report: Report) -> int:
    """Exit 0 if the database is at the scripts' heads, matches env.py's target_metadata as `alembic check`
    compares them, and has no invalid index; 10 listing the differences; 9 or 8 as `check`."""
    url, config, script = _scripts(settings)
    session_options.wait_and_apply(settings, url)
    found = drift.Drift()

    def compare(context, state: revisions.State) -> None:
        # On env.py's connection, in the run that reads the state: only a database at heads is compared.
        if state.kind == "current":
            drift.find(context, found, ignore_schema=settings.history_schema)
        else:
            found.has_metadata = context.opts.get("target_metadata") is not None

    # The models describe the heads, whatever MIGRATE_TARGET says: an expanded database is not what they model.
    state = states.read_or_fail(config, script, settings, also=compare)
    states.log(state)
    if not found.has_metadata:
        raise ConfigError("verify: env.py gives context.configure() no target_metadata (it is None), so there are "
                          "no models to compare the database with; pass the models' MetaData, as `alembic check` "
                          "needs")
    code = states.judge(state, report, script, settings)  # 9 pending (or legacy), 8 ahead: raised
    if state.kind == "ahead":  # let through by MIGRATE_ALLOW_AHEAD: these models are older than the schema
        report.message += "; schema not compared (the models of this image are older than the database)"
        return code
    for difference in found.differences:
        logger.warning("schema drift: %s", difference, extra={"difference": difference})
    for index in found.invalid_indexes:
        logger.warning("invalid index %s: PostgreSQL maintains it on every write but never uses it (a failed "
                       "CREATE INDEX CONCURRENTLY leaves one): drop it and create it again", index,
                       extra={"invalid_index": index})
    problems = found.differences + [f"invalid index {index}" for index in found.invalid_indexes]
    if settings.history:  # applied revisions edited or removed since, as the history recorded them
        edited = history_.edited(url, settings.history_schema, state, script)
        for finding in edited:
            logger.warning("history: %s", finding, extra={"difference": finding})
        problems += edited
    if problems:
        raise SchemaDrift(f"at heads {names(state.current)}, but the database differs from env.py's "
                          f"target_metadata or has invalid indexes ({count(len(problems), 'finding')}): "
                          + "; ".join(problems))
    report.outcome = "verified"
    report.message = (f"verified: at heads {names(state.current)}; the schema matches env.py's target_metadata "
                      f"and no index is invalid")
    return EXIT_OK


def heads(settings: Settings, report: Report) -> int:
    """Exit 0 naming the single head, or each head of a labelled branch with its label; 5 listing heads that share
    a branch (or have none); needs no database."""
    config = revisions.load_config(settings.alembic_config, section=settings.alembic_section,
                                   x_args=settings.x_arguments())
    script = revisions.load_scripts(config)
    found = revisions.check_single_head(script)
    report.to_revision = found
    if len(found) == 1:
        report.outcome = "single head"
        report.message = f"single head: {names(found)}"
    else:
        report.outcome = "one head per branch"
        report.message = f"{len(found)} heads, one per branch: {_heads(script, found)}"
    return EXIT_OK


def lint(settings: Settings, report: Report, start: str | None = None) -> int:
    """Lint with squawk alembic's offline SQL of each pending revision (each above `start`, with no database);
    exit 11 on findings."""
    lint_.squawk()  # before any work: a missing extra is exit 2 at once
    if start is None:
        url, config, script = _scripts(settings)
        goal = _goal(settings, script, report)
        session_options.wait_and_apply(settings, url)
        state = states.read_or_fail(config, script, settings, goal=goal)  # what `upgrade` would apply
        states.log(state)
        report.from_revision = state.current
        if state.kind == "ahead":
            states.let_ahead_through(settings, state, script)
            targets = []
        elif state.kind == "legacy":  # what `upgrade` would apply: refused (6), from base, or from the baseline
            stamp = revisions.refuse_legacy(state, settings.baseline_revision, script)
            targets = revisions.pending_revisions(script, (stamp,) if stamp else (), goal)
        else:
            targets = state.pending
    else:
        config, script = _offline_scripts(settings)
        targets = revisions.above(script, revisions.downgrade_target(script, start, "lint --from"))
    report.pending = [revision.revision for revision in targets]
    exclude = [*lint_.RUNNER_MAKES_MOOT, *settings.lint_exclusions()]
    if settings.ddl_lock_timeout is None:
        logger.warning("require-lock-timeout is off: the runner sets lock_timeout from MIGRATE_DDL_LOCK_TIMEOUT, "
                       "which is not set; set it so that DDL gives up instead of queueing behind live traffic")
    with revisions.quietly():
        found, failed = lint_.lint_revisions(config, script, targets, exclude)
    for item in failed:
        logger.warning("%s (%s) not linted: %s", item.revision, item.title, item.failure,
                       extra={"revision": item.revision})
    for finding in found:
        logger.warning("%s", finding, extra={"revision": finding.revision, "rule": finding.rule, "line": finding.line})
    unlinted = (f"; {count(len(failed), 'revision')} not linted (cannot be rendered offline): "
                f"{', '.join(item.revision for item in failed)}") if failed else ""
    if found:
        where = sorted({finding.revision for finding in found}, key=report.pending.index)
        raise LintFindings(f"{count(len(found), 'finding')} in {', '.join(where)} "
                           f"({', '.join(sorted({finding.rule for finding in found}))}){unlinted}")
    report.outcome = "linted"
    report.message = f"lint: {count(len(targets), 'revision')}, no findings{unlinted}"
    return EXIT_OK


def _offline_scripts(settings: Settings) -> tuple[Config, ScriptDirectory]:
    """alembic's config and the scripts for offline SQL: DATABASE_URL's dialect if it is set, else a placeholder,
    since nothing connects."""
    given = settings.url() if settings.database_url or settings.database_url_file else make_url(
        "postgresql://lint@localhost/lint").set(drivername=DRIVERS["postgresql"])
    return _config_and_scripts(settings, given)


def history(settings: Settings, report: Report, limit: int = 20) -> int:
    """Print the newest `limit` runs the history table holds for this project's version table."""
    url, config, script = _scripts(settings)
    session_options.wait_and_apply(settings, url)
    state = states.read_or_fail(config, script, settings)
    report.from_revision = report.to_revision = state.current
    # JSON lines whenever the log is JSON: MIGRATE_LOG_FORMAT unset means json off a terminal.
    shown = history_.show(url, settings.history_schema, state, limit, log.chosen_format() == "json")
    report.outcome = "history"
    report.message = (f"history: {count(shown, 'run')} of {state.schema}.{state.table} shown" if shown else
                      f"history: no run of {state.schema}.{state.table} recorded in "
                      f"{settings.history_schema}.{history_.TABLE} (MIGRATE_HISTORY is off, or no run changed it)")
    return EXIT_OK


def roundtrip(settings: Settings, report: Report, start: str | None = None) -> int:
    """In a scratch database, prove that each revision above `start` downgrades to what it upgraded from and
    upgrades again alike; exit 12 naming those that do not."""
    url, config, script = _scripts(settings)
    session_options.wait_and_apply(settings, url)
    scratch = settings.scratch_url()
    if scratch is not None:
        log.add_url_secrets(scratch)
    return roundtrip_.prove(functools.partial(_config, settings), script, report, url=url, given=settings.url(),
                            scratch=scratch, lock_timeout=settings.lock_timeout,
                            start=revisions.downgrade_target(script, start, "roundtrip --from") if start else None)


COMMANDS = {"upgrade": upgrade, "check": check, "wait": wait, "plan": plan, "verify": verify, "heads": heads,
            "downgrade": downgrade, "lint": lint, "history": history, "roundtrip": roundtrip}


def _history(settings: Settings, url: URL, report: Report):
    """This run's history recorder (MIGRATE_HISTORY), the table created if need be; None when off. Its run's row
    gets the outcome and exit code as the runner exits (cli calls report.on_exit)."""
    recorder = history_.begin(settings.history, settings.history_schema, url, report.command, settings.image)
    if recorder is not None:
        report.on_exit.append(
            lambda code: history_.finish(report.outcome, code, report.from_revision, report.to_revision))
    return recorder


# -- shared steps -----------------------------------------------------------------------
def _scripts(settings: Settings) -> tuple[URL, Config, ScriptDirectory]:
    """What every command starts from: the URL (its secrets masked), alembic's config and the scripts."""
    return (_url(settings), *_config_and_scripts(settings, settings.url()))


def _url(settings: Settings) -> URL:
    """The URL of the runner's own sessions; every login from here on, env.py's included, takes a fresh
    password from the file or command if one is set."""
    given = settings.url()
    credentials.configure(settings, given)
    # application_name from the first login on; the other options wait for the server's version.
    session_options.apply(settings, None)
    # env.py gets the URL as given, as it would from alembic.ini; the runner's own sessions add
    # keepalives and timeouts, which other drivers than libpq's would not accept.
    return sessions.runner_url(given)


def _config_and_scripts(settings: Settings, given: URL) -> tuple[Config, ScriptDirectory]:
    """alembic's config with `given` as sqlalchemy.url, and the scripts, their heads checked."""
    config = _config(settings, given)
    script = revisions.load_scripts(config)
    found = tuple(script.get_heads()) if settings.allow_multiple_heads else revisions.check_single_head(script)
    goal = target.resolve(script, settings.target)  # an unknown target is exit 2 before the database is touched
    logger.info("scripts at %s: head%s %s%s", script.dir, "s" if len(found) > 1 else "", _heads(script, found),
                "" if goal.is_heads else f"; target {goal}", extra={"heads": list(found), "target": goal.name})
    return config, script


def _goal(settings: Settings, script: ScriptDirectory, report: Report) -> target.Target:
    """MIGRATE_TARGET resolved against the scripts, and named in the summary."""
    goal = target.resolve(script, settings.target)
    report.target = goal.name
    return goal


def _aim(goal: target.Target) -> str:
    return "the heads" if goal.is_heads else str(goal)


def _heads(script: ScriptDirectory, heads: tuple[str, ...]) -> str:
    """The heads as the log names them: `e2 (expand), c2 (contract)` when they head labelled branches."""
    if len(heads) <= 1:
        return names(heads)
    labels = revisions.branch_labels(script, heads)
    return ", ".join(revisions.describe_head(labels, head) for head in heads)


def _config(settings: Settings, given: URL) -> Config:
    """alembic's config with `given` as sqlalchemy.url, its secrets masked from now on."""
    log.add_url_secrets(given)
    return revisions.load_config(settings.alembic_config, given, section=settings.alembic_section,
                                 x_args=settings.x_arguments())
