"""Set-based reads and writes for the batch writer: many rows in one or two round trips.

PostgreSQL gets the fast path: COPY into a per-session staging table, then one statement that moves the rows
into the table (INSERT ... SELECT ... ON CONFLICT ... RETURNING) and empties the staging table; reads cast
times and JSON to text, which Python parses in C (Django's own loaders for them are pure Python). Other backends
(SQLite for the demo) get multi-row INSERT ... ON CONFLICT ... RETURNING statements and ORM reads. Both return
the rows that were written, so the caller knows which events were new.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import partial
from typing import Any
from weakref import WeakKeyDictionary

import orjson
from django.db import connection, models, transaction

Row = Sequence[Any]
SQLITE_MAX_VARIABLES = 32_000
# Staging tables already created in a database session (temporary tables live as long as the session).
_staged: WeakKeyDictionary[Any, set[str]] = WeakKeyDictionary()


def qn(name: str) -> str:
    return connection.ops.quote_name(name)


def insert_ignore(
    *, table: str, columns: Sequence[str], rows: Sequence[Row], conflict: Sequence[str], returning: Sequence[str]
) -> list[tuple]:
    """Insert rows, skipping those that clash on `conflict`; return `returning` of the rows actually inserted."""
    if not rows:
        return []
    tail = f"ON CONFLICT ({', '.join(map(qn, conflict))}) DO NOTHING RETURNING {', '.join(map(qn, returning))}"
    return write(table=table, columns=columns, rows=rows, tail=tail)


def upsert(
    *, table: str, columns: Sequence[str], rows: Sequence[Row], conflict: Sequence[str], update: Sequence[str],
    returning: Sequence[str],
) -> list[tuple]:
    """Insert rows or, on a clash on `conflict`, overwrite `update` with the new values; return `returning`."""
    if not rows:
        return []
    assignments = ", ".join(f"{qn(c)} = EXCLUDED.{qn(c)}" for c in update)
    tail = (f"ON CONFLICT ({', '.join(map(qn, conflict))}) DO UPDATE SET {assignments} "
            f"RETURNING {', '.join(map(qn, returning))}")
    return write(table=table, columns=columns, rows=rows, tail=tail)


def existing_keys(*, table: str, key: str, keys: Sequence[Any]) -> set:
    """Which of `keys` the table already holds in its (unique, indexed) column `key`."""
    if not keys:
        return set()
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            # A join on the unnested keys, as in select_in: index probes even when the statistics are stale.
            cursor.execute(f"SELECT row.{qn(key)} FROM unnest(%s::text[]) AS wanted(key) "
                           f"JOIN {qn(table)} AS row ON row.{qn(key)} = wanted.key", [list(keys)])
            return {found for (found,) in cursor.fetchall()}
        found: set = set()
        for start in range(0, len(keys), SQLITE_MAX_VARIABLES):
            chunk = keys[start:start + SQLITE_MAX_VARIABLES]
            cursor.execute(f"SELECT {qn(key)} FROM {qn(table)} WHERE {qn(key)} IN ({', '.join(['%s'] * len(chunk))})",
                           chunk)
            found.update(value for (value,) in cursor.fetchall())
        return found


def insert_all(*, table: str, columns: Sequence[str], rows: Sequence[Row]) -> None:
    """Insert rows the caller knows are new (a clash is an error): on PostgreSQL one COPY straight into the
    table, the cheapest write there is."""
    if not rows:
        return
    if connection.vendor != "postgresql":
        values_insert(table=table, columns=columns, rows=rows, tail="")
        return
    with connection.cursor() as cursor:
        copy_rows(cursor, qn(table), ", ".join(map(qn, columns)), rows)


def copy_rows(cursor: Any, target: str, columns: str, rows: Iterable[Row]) -> None:
    """COPY rows into `target` (quoted) `columns` (a quoted list). Django turns driver errors into its own only
    around execute(); COPY is the driver's own, so a connection lost mid-COPY is wrapped here, to reach the
    writer's retry as django.db.OperationalError."""
    with connection.wrap_database_errors, cursor.copy(f"COPY {target} ({columns}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


def write(*, table: str, columns: Sequence[str], rows: Sequence[Row], tail: str) -> list[tuple]:
    if connection.vendor == "postgresql":
        return copy_then_insert(table=table, columns=columns, rows=rows, tail=tail)
    return values_insert(table=table, columns=columns, rows=rows, tail=tail)


def copy_then_insert(*, table: str, columns: Sequence[str], rows: Sequence[Row], tail: str) -> list[tuple]:
    """COPY is the fastest way into PostgreSQL. The move empties the staging table in the same statement, so
    several writes to one table in one transaction stay separate (and ON COMMIT DELETE ROWS clears what an
    error left behind)."""
    stage = staging_table(table)
    cols = ", ".join(map(qn, columns))
    with connection.cursor() as cursor:
        copy_rows(cursor, stage, cols, rows)
        cursor.execute(
            f"WITH staged AS (DELETE FROM {stage} RETURNING {cols}) "
            f"INSERT INTO {qn(table)} ({cols}) SELECT {cols} FROM staged {tail}"
        )
        return cursor.fetchall()


def staging_table(table: str) -> str:
    """The session's staging table for `table` (its columns, no constraints), created on first use. It is
    remembered only once the transaction that created it commits: a rollback takes the table with it."""
    stage = qn(f"stage_{table}")
    connection.ensure_connection()
    created = _staged.setdefault(connection.connection, set())
    if stage not in created:
        with connection.cursor() as cursor:
            cursor.execute(
                f"CREATE TEMP TABLE IF NOT EXISTS {stage} ON COMMIT DELETE ROWS AS "
                f"SELECT * FROM {qn(table)} WITH NO DATA"
            )
        transaction.on_commit(partial(created.add, stage))
    return stage


def adapt(value: Any) -> Any:
    """Store times the way Django's own backend does, so ORM reads and comparisons agree."""
    if isinstance(value, datetime):
        return connection.ops.adapt_datetimefield_value(value)
    return value


def values_insert(*, table: str, columns: Sequence[str], rows: Sequence[Row], tail: str) -> list[tuple]:
    placeholder = "(" + ", ".join(["%s"] * len(columns)) + ")"
    per_statement = max(1, SQLITE_MAX_VARIABLES // len(columns))
    returned: list[tuple] = []
    with connection.cursor() as cursor:
        for start in range(0, len(rows), per_statement):
            chunk = rows[start:start + per_statement]
            params = [adapt(value) for row in chunk for value in row]
            values = ", ".join([placeholder] * len(chunk))
            cursor.execute(f"INSERT INTO {qn(table)} ({', '.join(map(qn, columns))}) VALUES {values} {tail}", params)
            if tail:
                returned.extend(cursor.fetchall())
    return returned


def select_in(
    *, model: type[models.Model], columns: Sequence[str], key: str, keys: Sequence[Any]
) -> list[dict]:
    """The rows of `model` whose `key` is one of `keys`, as dicts of `columns` with the values the ORM's
    `.values()` would give (aware datetimes, decoded JSON)."""
    if not keys:
        return []
    if connection.vendor != "postgresql":
        return list(model.objects.filter(**{f"{key}__in": keys}).values(*columns))
    fields = [model._meta.get_field(column) for column in columns]
    select = ", ".join(f"row.{qn(f.column)}::text" if type(f) in LOADERS else f"row.{qn(f.column)}" for f in fields)
    key_field = model._meta.get_field(key)
    # A join on the unnested keys rather than `= ANY(...)`: the planner knows it is a few hundred index probes
    # even when the table's statistics are stale (a seq scan of a large table otherwise).
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {select} FROM unnest(%s::{key_field.db_type(connection)}[]) AS wanted(key) "
                       f"JOIN {qn(model._meta.db_table)} AS row ON row.{qn(key_field.column)} = wanted.key",
                       [list(keys)])
        rows = cursor.fetchall()
    parsed = [(index, LOADERS[type(field)]) for index, field in enumerate(fields) if type(field) in LOADERS]
    found = []
    for row in rows:
        values = list(row)
        for index, load in parsed:
            if values[index] is not None:
                values[index] = load(values[index])
        found.append(dict(zip(columns, values)))
    return found


# The columns select_in reads as text, and how it parses them (C functions, unlike Django's loaders).
LOADERS: dict[type, Any] = {models.DateTimeField: datetime.fromisoformat, models.JSONField: orjson.loads}
