"""Stand-in for an application: starts only on a database at the scripts' heads.

An init container (or a compose service) ran `migration-runner` from this same
image before; this checks the outcome the way an application's readiness
check could, then exits 0. A real application would start serving here.
"""

import os
import sys

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url


def main() -> int:
    url = make_url(os.environ["DATABASE_URL"]).set(drivername="postgresql+psycopg")
    scripts = ScriptDirectory.from_config(Config(os.environ.get("ALEMBIC_CONFIG", "alembic.ini")))
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            current = set(MigrationContext.configure(connection).get_current_heads())
    finally:
        engine.dispose()
    expected = set(scripts.get_heads())
    if current != expected:
        print(f"database at {sorted(current)}, expected {sorted(expected)}: not starting", file=sys.stderr)
        return 1
    print(f"database at heads {sorted(current)}: application starting")
    return 0


if __name__ == "__main__":
    sys.exit(main())
