"""The sequence batch writers draw a number from while they hold the writer lock (services.hold_writer_lock):
a worker that folds ahead of its commits knows from a gap in its numbers that another writer came between."""
from django.db import migrations

SEQUENCE = "conversations_writer_generation"


def create(apps, schema_editor) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"CREATE SEQUENCE IF NOT EXISTS {SEQUENCE}")


def drop(apps, schema_editor) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"DROP SEQUENCE IF EXISTS {SEQUENCE}")


class Migration(migrations.Migration):
    dependencies = [("conversations", "0007_event_indexes")]
    operations = [migrations.RunPython(create, drop)]
