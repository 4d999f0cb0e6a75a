"""Test settings: the database comes from DATABASE_URL (SQLite by default, PostgreSQL in CI)."""
import os
import tempfile

from monitor_project.settings.base import *  # noqa: F401,F403
from monitor_project.settings.base import DATABASES

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # A file, not memory: tests start `stream_events` as a child process that must see the same rows.
    # One file per test run, so two runs on one machine never share (or delete) each other's database.
    DATABASES["default"]["TEST"] = {"NAME": os.path.join(tempfile.gettempdir(), f"monitor-test-{os.getpid()}.sqlite3")}
INGEST_BATCH_MAX_AGE = 0.05
