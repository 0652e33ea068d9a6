"""Typed rows of the state directory's DuckDB file, and the registry that makes their tables.

Each layer declares its own tables (a `Row` subclass per table: its fields are the columns, the DDL is
derived from the annotations) and the views over them, and registers both here with `register`;
`ensure_schema` makes whatever has been registered. A layer's views read its own tables and those of
the layers below, so importing a layer registers everything its views need.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import types
import typing
from typing import Any, Callable, ClassVar

_SQL = {str: "VARCHAR", int: "INTEGER", float: "DOUBLE", bool: "BOOLEAN", dt.datetime: "TIMESTAMP",
        list[str]: "VARCHAR[]", dict: "JSON"}


class Row:
    """A row of one table: `TABLE`, its primary key `KEY`, columns in field order."""

    TABLE: ClassVar[str]
    KEY: ClassVar[tuple[str, ...]]

    @classmethod
    def columns(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def column_types(cls) -> dict[str, str]:
        hints = typing.get_type_hints(cls)
        out = {}
        for f in dataclasses.fields(cls):
            t = hints[f.name]
            optional = isinstance(t, types.UnionType)  # `float | None`: the column's type is float's
            out[f.name] = _SQL[next(a for a in typing.get_args(t) if a is not type(None)) if optional else t]
        return out

    @classmethod
    def ddl(cls) -> str:
        cols = ", ".join(f'"{name}" {sql}' for name, sql in cls.column_types().items())
        return f"CREATE TABLE IF NOT EXISTS {cls.TABLE} ({cols}, PRIMARY KEY ({', '.join(cls.KEY)}))"

    @classmethod
    def added_columns_sql(cls, existing: set[str]) -> list[str]:
        """The ALTERs that bring a table an older version made up to this row's columns: `CREATE TABLE IF
        NOT EXISTS` leaves an existing table as it was. A column added later must have a default (its
        old rows read NULL there)."""
        return [f'ALTER TABLE {cls.TABLE} ADD COLUMN IF NOT EXISTS "{name}" {sql}'
                for name, sql in cls.column_types().items() if name not in existing]

    @classmethod
    def insert_sql(cls, replace: bool = False) -> str:
        """The INSERT of one row; `replace` for a row that is its own to update (a run's)."""
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        return f"{verb} INTO {cls.TABLE} ({', '.join(cls.columns())}) VALUES ({', '.join('?' * len(cls.columns()))})"

    def values(self) -> list[Any]:
        """The row's values as DuckDB takes them: a dict (a JSON column) as its JSON text."""
        return [json.dumps(v) if isinstance(v, dict) else v for v in (getattr(self, c) for c in self.columns())]


@dataclasses.dataclass(frozen=True)
class Schema:
    """What one layer adds to the database: tables, then `setup(con)` (tables of its own DDL, fixed
    rows), then `views()` (statements run in order, after every table exists)."""

    name: str
    tables: tuple[type[Row], ...]
    views: Callable[[], list[str]] = list
    setup: Callable[[Any], None] | None = None


_REGISTERED: dict[str, Schema] = {}


def register(schema: Schema) -> Schema:
    """Add a layer's tables and views to what `ensure_schema` makes (again under the same name: replaced)."""
    _REGISTERED[schema.name] = schema
    return schema


def registered_tables() -> tuple[type[Row], ...]:
    return tuple(t for s in _REGISTERED.values() for t in s.tables)


def ensure_schema(con) -> None:
    """Every registered table and view (idempotent); a table an older version made gains the columns
    added since."""
    schemas = list(_REGISTERED.values())
    for t in registered_tables():
        con.execute(t.ddl())
    have: dict[str, set[str]] = {}
    for table, column in con.execute("SELECT table_name, column_name FROM information_schema.columns "
                                     "WHERE table_schema = current_schema()").fetchall():
        have.setdefault(table, set()).add(column)
    for t in registered_tables():
        for statement in t.added_columns_sql(have.get(t.TABLE, set())):
            con.execute(statement)
    for s in schemas:
        if s.setup is not None:
            s.setup(con)
    for s in schemas:
        for statement in s.views():
            con.execute(statement)
