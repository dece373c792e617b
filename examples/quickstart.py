"""The README's demo: the runner on examples/basic against an embedded PostgreSQL 16.

It starts a throwaway server (the pgserver wheel's binaries, on 127.0.0.1),
then runs `migration-runner` the way a container would: a fresh database,
the same database again (a no-op), a legacy database that needs a baseline,
and a downgrade under the lock followed by the upgrade back to the heads.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.postgres import Postgres  # noqa: E402

PASSWORD = "s3cret/p@ss#word"


def run(title: str, url: str, *args: str, **extra: str) -> int:
    print(f"\n=== {title}", flush=True)
    env = {**os.environ, "DATABASE_URL": url, "ALEMBIC_CONFIG": str(ROOT / "examples/basic/alembic.ini"),
           "MIGRATE_LOG_FORMAT": "text", **extra}
    code = subprocess.run([str(Path(sys.executable).parent / "migration-runner"), *args], env=env).returncode
    print(f"--- exit code {code}", flush=True)
    return code


def main() -> int:
    server = Postgres().start()
    try:
        server.create_role("app", PASSWORD)
        server.create_database("shop", owner="app")
        server.create_database("legacy", owner="app")
        server.execute("CREATE TABLE accounts (id bigint PRIMARY KEY, email text NOT NULL UNIQUE, "
                       "created_at timestamptz NOT NULL DEFAULT now())", database="legacy")
        server.execute("ALTER TABLE accounts OWNER TO app", database="legacy")
        print(f"embedded PostgreSQL 16 on 127.0.0.1:{server.port} (password masked in every log line)")
        codes = [
            run("1. fresh database: wait, lock, check heads, upgrade", server.url("shop", "app", PASSWORD)),
            run("2. the same database again: already at heads", server.url("shop", "app", PASSWORD)),
            run("3. legacy database without a baseline: refused, nothing written", server.url("legacy", "app", PASSWORD)),
            run("4. legacy database with MIGRATE_BASELINE_REVISION=0001: stamped, then upgraded",
                server.url("legacy", "app", PASSWORD), MIGRATE_BASELINE_REVISION="0001"),
            run("5. downgrade 0002 (before an application rollback): 0003 reverted under the lock",
                server.url("shop", "app", PASSWORD), "downgrade", "0002"),
            run("6. upgrade again: back at the heads", server.url("shop", "app", PASSWORD)),
        ]
        print("\nversion rows:", server.execute("SELECT version_num FROM alembic_version", database="shop"),
              server.execute("SELECT version_num FROM alembic_version", database="legacy"))
        expected = [0, 0, 6, 0, 0, 0]
        print("exit codes:", codes, "as expected" if codes == expected else f"expected {expected}")
        return 0 if codes == expected else 1
    finally:
        server.destroy()


if __name__ == "__main__":
    sys.exit(main())
