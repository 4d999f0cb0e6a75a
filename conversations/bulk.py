"""Set-based writes for the batch writer: insert-or-ignore and upsert of many rows in one round trip or two.

PostgreSQL gets the fast path: COPY into a per-session staging table, then one INSERT ... SELECT ... ON CONFLICT.
Other backends (SQLite for the demo) get multi-row INSERT ... ON CONFLICT ... RETURNING statements. Both return
the rows that were written, so the caller knows which events were new.
"""
from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from django.db import connection

Row = Sequence[Any]
SQLITE_MAX_VARIABLES = 32_000


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


def write(*, table: str, columns: Sequence[str], rows: Sequence[Row], tail: str) -> list[tuple]:
    if connection.vendor == "postgresql":
        return copy_then_insert(table=table, columns=columns, rows=rows, tail=tail)
    return values_insert(table=table, columns=columns, rows=rows, tail=tail)


def copy_then_insert(*, table: str, columns: Sequence[str], rows: Sequence[Row], tail: str) -> list[tuple]:
    """COPY is the fastest way into PostgreSQL; the staging table lives for the session and empties at commit."""
    stage = qn(f"stage_{table}")
    cols = ", ".join(map(qn, columns))
    with connection.cursor() as cursor:
        cursor.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {stage} ON COMMIT DELETE ROWS AS "
            f"SELECT {cols} FROM {qn(table)} WITH NO DATA"
        )
        with cursor.copy(f"COPY {stage} ({cols}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        cursor.execute(f"INSERT INTO {qn(table)} ({cols}) SELECT {cols} FROM {stage} {tail}")
        returned = cursor.fetchall()
        cursor.execute(f"DELETE FROM {stage}")  # several writes to one table in one transaction stay separate
    return returned


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
            returned.extend(cursor.fetchall())
    return returned
