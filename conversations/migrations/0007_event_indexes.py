"""Fewer indexes on the ingest path: each one costs every insert and update the batch writer makes.

Event: the single-column indexes on kind, event_type, conversation_id and source go. The admin's filters keep an
index each, one that also serves their newest-first order: (kind, occurred_at), (source, occurred_at),
(event_type, occurred_at); a conversation's events keep (conversation_id, occurred_at). occurred_at (the default
order, the date drill-down, pruning) and received_at (the live page's events per minute) stay.

PostgreSQL only: the `*_like` indexes Django adds beside every indexed or unique CharField (varchar_pattern_ops,
for LIKE 'abc%') go; nothing in the product searches by prefix, every search is exact. And participant rows
(rewritten by every event of their conversation) and hook deliveries (stamped when sent) get room on their page
(fillfactor 80), so an update that changes no indexed column is a HOT update that touches no index at all.

On PostgreSQL the indexes are built and dropped CONCURRENTLY, so the ingest worker keeps writing meanwhile;
hence a non-atomic migration, and the model state is changed separately from the SQL that does it.
"""
import django.db.models.deletion
from django.apps.registry import Apps
from django.db import migrations, models
from django.db.backends.base.schema import BaseDatabaseSchemaEditor

EVENT = "conversations_event"
COMPOSITES = {
    "event_kind_time": ("kind", "occurred_at"),
    "event_source_time": ("source", "occurred_at"),
    "event_type_time": ("event_type", "occurred_at"),
}
DROPPED_SINGLE = ("kind", "event_type", "conversation_id", "source")  # on the event table
# A participant's conversation is the first column of its unique (conversation, participant_id): the foreign key's
# own index only doubles its cost.
REDUNDANT = {"conversations_participant": "conversation_id",
             # (started_at, id) from 0003 serves every lookup by start time: the history, the live page, the admin.
             "conversations_conversation": "started_at"}
LIKE_INDEXES = {  # table -> CharField columns whose `_like` index goes (PostgreSQL)
    EVENT: ("dedupe_key", "kind", "event_type", "conversation_id", "source"),
    "conversations_conversation": ("conversation_id", "state", "media_type", "direction", "queue_id",
                                   "agent_id", "ani", "dnis", "wrapup_code"),
    "conversations_participant": ("user_id",),
    "conversations_hookdelivery": ("idempotency_key",),
}
# Rows rewritten in place often get room on their page, so an update that changes no indexed column is HOT:
# participants (every event of their conversation) and hook deliveries (stamped when sent).
FILLFACTOR = {"conversations_participant": 80, "conversations_hookdelivery": 80}


def run(schema_editor: BaseDatabaseSchemaEditor, sql: str) -> None:
    concurrently = "CONCURRENTLY " if schema_editor.connection.vendor == "postgresql" else ""
    schema_editor.execute(sql.format(concurrently=concurrently))


def index_name(schema_editor: BaseDatabaseSchemaEditor, table: str, column: str, suffix: str = "") -> str:
    """The name Django gave the index of a db_index field (the same function made it)."""
    return schema_editor._create_index_name(table, [column], suffix=suffix)


def forwards(apps: Apps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    postgres = schema_editor.connection.vendor == "postgresql"
    for name, columns in COMPOSITES.items():
        run(schema_editor, f"CREATE INDEX {{concurrently}}IF NOT EXISTS {name} ON {EVENT} ({', '.join(columns)})")
    for column in DROPPED_SINGLE:
        run(schema_editor, f"DROP INDEX {{concurrently}}IF EXISTS {index_name(schema_editor, EVENT, column)}")
    for table, column in REDUNDANT.items():
        run(schema_editor, f"DROP INDEX {{concurrently}}IF EXISTS {index_name(schema_editor, table, column)}")
    if not postgres:
        return
    for table, columns in LIKE_INDEXES.items():
        for column in columns:
            run(schema_editor, f"DROP INDEX {{concurrently}}IF EXISTS {index_name(schema_editor, table, column, '_like')}")
    for table, fillfactor in FILLFACTOR.items():
        schema_editor.execute(f"ALTER TABLE {table} SET (fillfactor = {fillfactor})")


def backwards(apps: Apps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    postgres = schema_editor.connection.vendor == "postgresql"
    if postgres:
        for table in FILLFACTOR:
            schema_editor.execute(f"ALTER TABLE {table} RESET (fillfactor)")
        for table, columns in LIKE_INDEXES.items():
            for column in columns:
                name = index_name(schema_editor, table, column, "_like")
                run(schema_editor, f"CREATE INDEX {{concurrently}}IF NOT EXISTS {name} ON {table} "
                                   f"({column} varchar_pattern_ops)")
    for column in DROPPED_SINGLE:
        name = index_name(schema_editor, EVENT, column)
        run(schema_editor, f"CREATE INDEX {{concurrently}}IF NOT EXISTS {name} ON {EVENT} ({column})")
    for table, column in REDUNDANT.items():
        name = index_name(schema_editor, table, column)
        run(schema_editor, f"CREATE INDEX {{concurrently}}IF NOT EXISTS {name} ON {table} ({column})")
    for name in COMPOSITES:
        run(schema_editor, f"DROP INDEX {{concurrently}}IF EXISTS {name}")


class Migration(migrations.Migration):
    atomic = False
    dependencies = [("conversations", "0005_stream_lease")]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[migrations.RunPython(forwards, backwards, elidable=False)],
            state_operations=[
                migrations.AlterField(model_name="event", name="conversation_id",
                                      field=models.CharField(max_length=64)),
                migrations.AlterField(model_name="event", name="event_type", field=models.CharField(max_length=200)),
                migrations.AlterField(
                    model_name="event", name="kind",
                    field=models.CharField(choices=[("start", "start"), ("update", "update"), ("end", "end"),
                                                    ("wrapup", "wrapup"), ("unknown", "unknown")], max_length=16),
                ),
                migrations.AlterField(model_name="event", name="source", field=models.CharField(max_length=32)),
                migrations.AlterField(
                    model_name="participant", name="conversation",
                    field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.CASCADE,
                                            related_name="participants", to="conversations.conversation"),
                ),
                migrations.AlterField(model_name="conversation", name="started_at",
                                      field=models.DateTimeField(blank=True, null=True)),
                *(migrations.AddIndex(model_name="event", index=models.Index(fields=list(columns), name=name))
                  for name, columns in COMPOSITES.items()),
            ],
        ),
    ]
