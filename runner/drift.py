"""`verify`: the differences between the database and env.py's target_metadata, and invalid indexes.

The comparison is alembic's autogenerate comparison (what `alembic check` runs),
made on env.py's own MigrationContext, so env.py's `include_object`,
`include_name`, `include_schemas`, `compare_type`, `compare_server_default` and
the like apply as they do under `alembic check`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from alembic.autogenerate import compare_metadata
from sqlalchemy import inspect, text
from sqlalchemy.sql.elements import TextClause

from . import revisions

IN_MODELS = "in the models, not in the database"
IN_DATABASE = "in the database, not in the models"


@dataclass
class Drift:
    """What `verify` found on env.py's connection."""

    has_metadata: bool = False
    compared: bool = False
    differences: list[str] = field(default_factory=list)
    invalid_indexes: list[str] = field(default_factory=list)


def find(context, drift: Drift, ignore_schema: str | None = None) -> None:
    """Fill `drift` from env.py's MigrationContext: the autogenerate diffs and the invalid indexes, leaving out
    `ignore_schema` (the runner's history), which env.py's include_schemas=True would otherwise compare."""
    metadata = context.opts.get("target_metadata")
    drift.has_metadata = metadata is not None
    if metadata is None:
        return
    # Autogenerate logs each difference at INFO in its own words (`verify` logs them in its own), its
    # plugins as it loads them, and each serial column it recognises: noise for a check.
    with revisions.quietly("alembic.autogenerate", "alembic.runtime.plugins", "alembic.ddl.postgresql"):
        diffs = compare_metadata(context, metadata)
    dialect = context.dialect
    drift.differences = [describe(diff, dialect) for diff in _flat(diffs)
                         if ignore_schema is None or _schema_of(diff) != ignore_schema]
    drift.invalid_indexes = invalid_indexes(context, metadata, ignore_schema)
    drift.compared = True


def _schema_of(diff: tuple) -> str | None:
    """The schema of the table a diff is about."""
    for part in diff[1:3]:
        if isinstance(part, str) or part is None:
            return part  # (kind, schema, table, ...) for columns
        table = getattr(part, "table", part)  # an index or constraint, or the table itself
        return getattr(table, "schema", None)
    return None


def _flat(diffs) -> Iterator[tuple]:
    # A column's changes come as a list of tuples (type, nullable, default, comment).
    for diff in diffs:
        if isinstance(diff, list):
            yield from diff
        else:
            yield diff


def describe(diff: tuple, dialect=None) -> str:
    """One of alembic's diff tuples as a line a person reads: what, where, and on which side it is."""
    kind = diff[0]
    if kind in ("add_table", "remove_table"):
        table = diff[1]
        return f"table {_name(table.schema, table.name)}: {IN_MODELS if kind == 'add_table' else IN_DATABASE}"
    if kind in ("add_column", "remove_column"):
        _, schema, table, column = diff
        return (f"column {_name(schema, table, column.name)}: "
                f"{IN_MODELS if kind == 'add_column' else IN_DATABASE}")
    if kind in ("add_index", "remove_index"):
        index = diff[1]
        return (f"{'unique ' if index.unique else ''}index {index.name} on {_table_of(index)}"
                f"{_columns(index.expressions) if kind == 'add_index' else ''}: "
                f"{IN_MODELS if kind == 'add_index' else IN_DATABASE}")
    if kind in ("add_constraint", "remove_constraint", "add_fk", "remove_fk"):
        constraint = diff[1]
        what = {"foreign_key_constraint": "foreign key", "unique_constraint": "unique constraint",
                "check_constraint": "check constraint", "primary_key_constraint": "primary key"}.get(
            constraint.__visit_name__, "constraint")
        target = ""
        if kind == "add_fk":
            target = " -> " + ", ".join(element.target_fullname for element in constraint.elements)
        name = f" {constraint.name}" if isinstance(constraint.name, str) else ""
        return (f"{what}{name} on {_table_of(constraint)}{_columns(constraint.columns)}{target}: "
                f"{IN_MODELS if kind.startswith('add') else IN_DATABASE}")
    if kind == "add_table_comment":
        table, existing = diff[1], diff[2]
        return (f"comment of table {_name(table.schema, table.name)}: {_text(existing)} in the database, "
                f"{_text(table.comment)} in the models")
    if kind == "remove_table_comment":
        table = diff[1]
        return f"comment of table {_name(table.schema, table.name)}: {IN_DATABASE}"
    if kind in ("modify_type", "modify_nullable", "modify_default", "modify_comment"):
        _, schema, table, column, _kw, existing, wanted = diff
        where = _name(schema, table, column)
        if kind == "modify_type":
            return (f"type of {where}: {_type(existing, dialect)} in the database, {_type(wanted, dialect)} in "
                    f"the models")
        if kind == "modify_nullable":
            def null(value):
                return "NULL" if value else "NOT NULL"
            return f"nullability of {where}: {null(existing)} in the database, {null(wanted)} in the models"
        if kind == "modify_default":
            return (f"server default of {where}: {_default(existing)} in the database, {_default(wanted)} in "
                    f"the models")
        return f"comment of column {where}: {_text(existing)} in the database, {_text(wanted)} in the models"
    # A kind alembic (or a plugin) adds later: still named, if less readably.
    return f"{kind}: " + ", ".join(str(part) for part in diff[1:])


def _name(*parts) -> str:
    return ".".join(str(part) for part in parts if part is not None)


def _table_of(item) -> str:
    table = item.table
    return _name(table.schema, table.name)


def _columns(columns) -> str:
    names = [getattr(column, "name", None) or str(column) for column in columns]
    return f" ({', '.join(names)})" if names else ""


def _type(type_, dialect) -> str:
    if type_ is None:
        return "no type"
    try:
        return type_.compile(dialect=dialect)
    except Exception:
        return repr(type_)


def _default(default) -> str:
    if default is None or default is False:
        return "none"
    arg = getattr(default, "arg", default)  # a DefaultClause wraps the text
    if isinstance(arg, TextClause):
        arg = arg.text
    return str(arg)


def _text(value) -> str:
    return "none" if value is None else repr(value)


# An index left invalid by a failed CREATE INDEX CONCURRENTLY (or REINDEX CONCURRENTLY), or one
# being built right now: PostgreSQL maintains it on writes but never reads it.
_INVALID_INDEXES = text("""
    SELECT n.nspname, c.relname, t.relname
      FROM pg_index i
      JOIN pg_class c ON c.oid = i.indexrelid
      JOIN pg_class t ON t.oid = i.indrelid
      JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE NOT i.indisvalid AND n.nspname = ANY(:schemas)
     ORDER BY 1, 2
""")


def invalid_indexes(context, metadata, ignore_schema: str | None = None) -> list[str]:
    """The invalid indexes in the schemas the comparison covers, as `schema.index on schema.table`."""
    schemas = sorted(covered_schemas(context, metadata) - {ignore_schema})
    rows = context.connection.execute(_INVALID_INDEXES, {"schemas": schemas}).all()
    return [f"{schema}.{index} on {schema}.{table}" for schema, index, table in rows]


def covered_schemas(context, metadata) -> set[str]:
    """The version table's schema, the default one, those the models name and, under include_schemas,
    every schema env.py's include_name lets through."""
    connection = context.connection
    default = connection.dialect.default_schema_name
    schemas = {default, context.version_table_schema or default}
    if context.opts.get("include_schemas", False):
        include_name = context.opts.get("include_name")
        for schema in inspect(connection).get_schema_names():
            if schema != "information_schema" and (
                    include_name is None or include_name(None if schema == default else schema, "schema", {})):
                schemas.add(schema)
    for each in metadata if isinstance(metadata, (list, tuple)) else [metadata]:
        schemas.update(table.schema for table in each.tables.values() if table.schema)
    return {schema for schema in schemas if schema}
