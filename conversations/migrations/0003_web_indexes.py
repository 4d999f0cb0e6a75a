"""The history's keyset pagination walks (started_at, id) newest first: one composite index serves every page.

Plain SQL (valid on PostgreSQL and SQLite) rather than Meta.indexes, so this migration stands alone; the
model state does not need to know about it.
"""
from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("conversations", "0002_outbox_connections_tokens")]

    operations = [
        migrations.RunSQL(
            "CREATE INDEX IF NOT EXISTS conversation_started_id ON conversations_conversation (started_at, id)",
            reverse_sql="DROP INDEX IF EXISTS conversation_started_id",
        ),
    ]
