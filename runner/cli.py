"""The console script: parse the command, run it, and end in a documented exit code."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
from pathlib import Path

# Light imports only: alembic, SQLAlchemy and Flask load when a command needs them (`_full_path`), not for
# --help, --version or a no-op that fastpath proves without them.
from . import fastpath, log, sidecars, stack_versions, startup, telemetry
from .errors import EXIT_BUG, ConfigError, Interrupted, RunnerError, markdown_table
from .report import Report, emit
from .settings import Settings, quit_urls_from_env, variables

logger = logging.getLogger("runner")

HELP = {
    "upgrade": "wait, lock, check heads, stamp a baseline if asked, upgrade to heads (the default)",
    "check": "read only: exit 0 at heads, 9 if revisions are pending, 8 if the database is ahead (MIGRATE_ALLOW_AHEAD)",
    "wait": "repeat check until the database is at heads (for an application's init container)",
    "plan": "list what upgrade would apply from the database's state; --sql prints the SQL",
    "verify": "read only: exit 0 at heads with the schema matching env.py's target_metadata (as alembic check "
              "compares them) and no invalid index (with MIGRATE_HISTORY, no applied revision edited or removed since); "
              "10 listing the differences, 9 pending, 8 ahead",
    "heads": "no database: exit 0 with the single head, or 5 listing the heads and the merge command",
    "downgrade": "under the lock, revert the revisions above REVISION (an id, or base); run from the newer image",
    "lint": "squawk on the offline SQL of each pending revision (or each above --from REV, with no database); 11 on findings",
    "history": "read only: print the newest runs MIGRATE_HISTORY recorded for this version table (JSON lines under "
               "MIGRATE_LOG_FORMAT=json)",
    "roundtrip": "in a scratch database, upgrade, downgrade and upgrade again each revision above --from REV (default "
                 "base), comparing the schemas; 12 naming each revision whose downgrade does not undo its upgrade",
}


class _Version(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        sys.__stdout__.write(stack_versions() + "\n")
        parser.exit()


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors reported like any other configuration error (a log line, a summary)."""

    def error(self, message: str):
        raise ConfigError(f"{self.prog}: {message} (see --help)")

    def _print_message(self, message: str, file=None) -> None:
        # Help goes to the real stdout, not through logging (which owns sys.stdout by then).
        if message:
            (sys.__stderr__ if file in (sys.stderr, sys.__stderr__) else sys.__stdout__).write(message)


def _alembic_options(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("-x", action="append", metavar="KEY=VALUE", default=default,
                        help="passed to env.py's context.get_x_argument(), as alembic -x (adds to ALEMBIC_X_ARGS)")
    parser.add_argument("-n", "--name", metavar="SECTION", default=default,
                        help="section of alembic.ini to use, as alembic -n (overrides ALEMBIC_SECTION)")


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive whole number")
    return int(value)


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def parser() -> argparse.ArgumentParser:
    env_help = "\n".join(f"  {name:<36} {default or '-':<18} {meaning}" for name, default, meaning in variables())
    p = _Parser(
        prog="migration-runner",
        description="Bring a PostgreSQL database to the Alembic heads, safely, before an application starts.",
        epilog=f"environment variables (name, default, meaning):\n{env_help}\n\nexit codes:\n{markdown_table()}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-V", "--version", action=_Version, nargs=0,
                   help="print the versions of the runner, alembic, SQLAlchemy and psycopg, and exit")
    _alembic_options(p, None)
    commands = p.add_subparsers(dest="command", metavar="{" + ",".join(HELP) + "}",
                                title="commands (default: upgrade)")
    for name, text in HELP.items():
        sub = commands.add_parser(name, help=text, description=text)
        # Also after the command; SUPPRESS keeps an absent option from hiding one given before it.
        _alembic_options(sub, argparse.SUPPRESS)
        if name == "plan":
            sub.add_argument("--sql", action="store_true", help="print the SQL alembic would run (offline mode)")
        if name == "lint":
            sub.add_argument("--from", dest="start", metavar="REV",
                             help="lint every revision above REV (a revision id, or base) without a database")
        if name == "roundtrip":
            sub.add_argument("--from", dest="start", metavar="REV",
                             help="prove the revisions above REV (a revision id, or base), REV built first")
        if name == "history":
            sub.add_argument("--limit", type=_positive, default=20, metavar="N", help="the newest N runs (default 20)")
        if name == "downgrade":
            sub.add_argument("revision", help="the revision to leave the database at (a revision id, or base)")
    return p


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGINT, _raise_interrupted)
    # In the format asked for from the first line on: a usage error is a log line like the rest.
    fmt = os.environ.get("MIGRATE_LOG_FORMAT", "").strip().lower()
    log.setup(fmt if fmt in ("text", "json") else None)
    telemetry.start()  # the root span covers every path, a usage error included
    report = Report(command="(unparsed)")
    settings = None
    try:
        try:
            args = parser().parse_args(argv)
        except SystemExit as e:  # --help, --version: done, no summary
            return e.code or 0
        name = report.command = args.command or "upgrade"
        settings = Settings.from_env()
        settings = settings.model_copy(update=_from_options(settings, args))
        log.setup(settings.log_format, settings.log_level)
        _warn_unknown_variables()
        if settings.database_urls_file is not None:  # a fleet: each target in a runner process of its own
            with log.unheard_imports(), startup.importing():
                from . import fleet
            code = fleet.run(settings, report, name)
        else:
            code = fastpath.answer(settings, name, report)
            if code is None:
                code = _full_path(name, args, settings, report)
    except RunnerError as e:
        report.outcome, report.message, code = type(e).__name__, str(e), e.exit_code
    except SystemExit as e:
        from .envpy import EarlyExit

        # Project code (a revision file loaded for the heads, say) called sys.exit: a failure like any other.
        error = ConfigError(f"the project's code exited ({EarlyExit(e.code)}) before the runner finished")
        report.outcome, report.message, code = type(error).__name__, str(error), error.exit_code
    except Interrupted as e:
        report.outcome, code = "interrupted", e.exit_code
        report.message = f"interrupted by {e}: stopped, rolled back, lock released"
    except Exception as e:
        logger.exception("unexpected error")
        report.outcome, report.message, code = "bug", f"unexpected error: {type(e).__name__}: {e}", EXIT_BUG
    fastpath.release()  # its session, if the full path did not take it
    # Before the sidecars go (a proxy may carry the connection): a history row begun gets its outcome.
    for finish in report.on_exit:
        finish(code)
    # Sent (or given up on) before the summary, which stays the last line.
    telemetry.finish(report, code, settings)
    # The outcome is known and the lock released: the sidecars can go. Before the summary, which
    # stays the last line; also after invalid settings, or the pod would never complete.
    sidecars.stop(settings.quit_url_list() if settings else quit_urls_from_env())
    # Invalid settings still deserve a termination message where one was asked for.
    termination_log = settings.termination_log if settings else os.environ.get("MIGRATE_TERMINATION_LOG")
    emit(report, code, Path(termination_log) if termination_log else None)
    return code


def _full_path(name: str, args: argparse.Namespace, settings: Settings, report: Report) -> int:
    """Run the command through alembic (and FLASK_APP's application), the heavy modules imported now."""
    with log.unheard_imports(), startup.importing():
        from . import flaskapp, guard
        from .commands import COMMANDS
    guard.cancel_on_signals()
    run = COMMANDS[name]
    if name == "plan":
        run = functools.partial(run, sql=args.sql)
    if name == "downgrade":
        run = functools.partial(run, target=args.revision)
    if name in ("lint", "roundtrip"):
        run = functools.partial(run, start=args.start)
    if name == "history":
        run = functools.partial(run, limit=args.limit)
    if settings.database_url is not None:
        log.add_secret(settings.database_url.get_secret_value())
    writing = name in ("upgrade", "downgrade")
    if writing and flaskapp.loads_under_lock(settings):
        return run(settings, report)  # which creates the Flask application once it holds the lock
    # FLASK_APP: inside the application's context, as `flask db upgrade` runs (it may supply the URL).
    with flaskapp.application(settings, writing=writing) as settings:
        return run(settings, report)


def _warn_unknown_variables() -> None:
    # A misspelt variable would otherwise be ignored in silence (MIGRATE_BASELINE_REVISON, say).
    known = {name for name, _, _ in variables()}
    unknown = sorted(name for name in os.environ if name.startswith(("MIGRATE_", "ALEMBIC_")) and name not in known)
    if unknown:
        logger.warning("unknown variables ignored: %s (--help lists the known ones)", ", ".join(unknown),
                       extra={"unknown_variables": unknown})


def _from_options(settings: Settings, args: argparse.Namespace) -> dict:
    """The settings -x and -n change: -x adds to ALEMBIC_X_ARGS, -n replaces ALEMBIC_SECTION."""
    update = {}
    if args.x:
        update["alembic_x_args"] = " ".join([*settings.x_arguments(), *args.x])
    if args.name:
        update["alembic_section"] = args.name
    return update

