"""The console script: parse the command, run it, and end in a documented exit code."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from . import __version__, commands, log
from .errors import EXIT_BUG, Interrupted, RunnerError, markdown_table
from .settings import Settings, variables

logger = logging.getLogger("runner")

COMMANDS = {
    "upgrade": commands.upgrade,
}


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def parser() -> argparse.ArgumentParser:
    env_help = "\n".join(f"  {name:<36} {default or '-':<18} {meaning}" for name, default, meaning in variables())
    p = argparse.ArgumentParser(
        prog="migration-runner",
        description="Bring a PostgreSQL database to the Alembic heads, safely, before an application starts.",
        epilog=f"environment variables (name, default, meaning):\n{env_help}\n\nexit codes:\n{markdown_table()}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("command", nargs="?", default="upgrade", choices=sorted(COMMANDS),
                   help="what to do (default: upgrade)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGINT, _raise_interrupted)
    log.setup()
    try:
        settings = Settings.from_env()
        log.setup(settings.log_format, settings.log_level)
        if settings.database_url is not None:
            log.add_secret(settings.database_url.get_secret_value())
        url = settings.url()
        log.add_secret(url.password)
        log.add_secret(url.query.get("password"))
        return COMMANDS[args.command](settings)
    except RunnerError as e:
        logger.error("%s", e, extra={"exit_code": e.exit_code, "error": type(e).__name__})
        return e.exit_code
    except Interrupted as e:
        logger.error("interrupted by %s: stopped, rolled back, lock released", e, extra={"exit_code": e.exit_code})
        return e.exit_code
    except Exception as e:
        logger.exception("unexpected error: %s: %s", type(e).__name__, e, extra={"exit_code": EXIT_BUG})
        return EXIT_BUG


def run() -> None:
    sys.exit(main())
