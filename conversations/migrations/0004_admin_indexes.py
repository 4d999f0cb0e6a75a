"""Indexes behind the admin's search and filters that had none.

* conversation_agent_name: the admin's exact search by agent name (the other searched columns are indexed).
* reject_pending_received: "pending" rejects newest first (a partial index: reprocessed rows are not in it).

Plain SQL valid on PostgreSQL and SQLite, so the model state does not change. On PostgreSQL the indexes are
built CONCURRENTLY (no lock against the ingest worker's writes), hence a non-atomic migration.
"""
from django.apps.registry import Apps
from django.db import migrations
from django.db.backends.base.schema import BaseDatabaseSchemaEditor

INDEXES = {
    "conversation_agent_name": "ON conversations_conversation (agent_name)",
    "reject_pending_received": "ON conversations_rejectedevent (received_at) WHERE reprocessed_at IS NULL",
}


def create_indexes(apps: Apps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    concurrently = "CONCURRENTLY " if schema_editor.connection.vendor == "postgresql" else ""
    for name, definition in INDEXES.items():
        schema_editor.execute(f"CREATE INDEX {concurrently}IF NOT EXISTS {name} {definition}")


def drop_indexes(apps: Apps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    concurrently = "CONCURRENTLY " if schema_editor.connection.vendor == "postgresql" else ""
    for name in INDEXES:
        schema_editor.execute(f"DROP INDEX {concurrently}IF EXISTS {name}")


class Migration(migrations.Migration):
    atomic = False
    # After the other 0003 in the tree so it has one leaf (two leaves stop `migrate`); the lead linearizes.
    dependencies = [("conversations", "0003_web_indexes")]

    operations = [migrations.RunPython(create_indexes, drop_indexes, elidable=False)]
