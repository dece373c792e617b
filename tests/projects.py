"""Alembic projects for tests: the real `alembic init` template plus generated revisions."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from alembic import command
from alembic.config import Config

TEMPLATE = '''"""{message}

Revision ID: {id}
Revises: {down_text}
"""
from alembic import op
import sqlalchemy as sa

revision = {id!r}
down_revision = {down!r}
branch_labels = None
depends_on = None


def upgrade():
{body}


def downgrade():
{undo}
'''


@dataclass
class Rev:
    """One revision: its id, parent(s), and the body of upgrade() (SQL statements or Python)."""

    id: str
    down: str | tuple | None
    sql: list[str] = field(default_factory=list)
    python: str = ""
    message: str = ""
    undo: list[str] = field(default_factory=list)  # the body of downgrade(), SQL statements


    def source(self) -> str:
        lines = [f"    op.execute({stmt!r})" for stmt in self.sql]
        lines += ["    " + line for line in self.python.strip("\n").splitlines()]
        undo = "\n".join(f"    op.execute({stmt!r})" for stmt in self.undo) or "    pass"
        return TEMPLATE.format(id=self.id, down=self.down, down_text=self.down or "", body="\n".join(lines) or "    pass",
                               undo=undo, message=self.message or f"revision {self.id}")


def chain(n: int, prefix: str = "r", start_down: str | None = None) -> list[Rev]:
    """n revisions in a line, each creating table <prefix>_<i>."""
    revs, down = [], start_down
    for i in range(1, n + 1):
        rid = f"{prefix}{i:04d}"
        revs.append(Rev(rid, down, [f"CREATE TABLE {prefix}_{i} (id serial PRIMARY KEY, note text)"],
                        message=f"create {prefix}_{i}", undo=[f"DROP TABLE {prefix}_{i}"]))
        down = rid
    return revs


def make_project(root: Path, revisions: list[Rev], template: str = "generic") -> Path:
    """An alembic project in `root` made by `alembic init`; returns the path of its alembic.ini."""
    root.mkdir(parents=True, exist_ok=True)
    ini = root / "alembic.ini"
    toml = str(root / "pyproject.toml") if template.startswith("pyproject") else None
    command.init(Config(str(ini), toml_file=toml), str(root / "migrations"), template=template)
    add_revisions(root, revisions)
    return ini


def add_revisions(root: Path, revisions: list[Rev]) -> None:
    versions = root / "migrations" / "versions"
    for rev in revisions:
        (versions / f"{rev.id}.py").write_text(rev.source())


def write_env(root: Path, source: str) -> None:
    (root / "migrations" / "env.py").write_text(source)


# env.py written the cookbook way (alembic's docs, "Sharing a Connection across one or more
# programmatic migration commands"): a connection offered in config.attributes is used,
# otherwise env.py builds its own engine from sqlalchemy.url.
COOKBOOK_ENV = '''
from alembic import context
from sqlalchemy import engine_from_config, pool

config = context.config
connectable = config.attributes.get("connection", None)
print(f"offered: {connectable is not None}")
if connectable is None:
    engine = engine_from_config(config.get_section(config.config_ini_section), prefix="sqlalchemy.",
                                poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=None)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connectable, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()
'''
