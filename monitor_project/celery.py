"""The Celery app: `celery -A monitor_project worker` runs post-call hooks, `celery -A monitor_project beat`
the sweeper. The broker is CELERY_BROKER_URL, defaulting to REDIS_URL; with neither set (the demo) tasks run
in-process (task_always_eager): in the ingest worker on the threads of its in-process runner, off its commit path
(conversations.tasks.InProcessRunner), elsewhere in the process that asks. The log says which once."""
from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from celery import Celery
from celery.signals import setup_logging

from monitor_project.settings.environment import load_settings_or_exit

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "monitor_project.settings.local")

app = Celery("monitor_project")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@app.on_configure.connect
def stop_on_bad_settings(**kwargs: Any) -> None:
    """Celery reads Django's settings when it first needs its configuration: a bad setting then stops the
    worker or beat with one line naming it (exit 2), as every other entry point does."""
    load_settings_or_exit()


@setup_logging.connect
def keep_django_logging(**kwargs: Any) -> None:
    """Django's LOGGING (LOG_LEVEL) configures workers too. Without this receiver Celery adds its own root
    handler and level; an embedded test worker would then silence WARNING logs for the rest of the process."""


def redacted(url: str) -> str:
    """A broker URL safe to log: the password is replaced."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def describe_mode() -> str:
    if app.conf.task_always_eager:
        return ("no broker configured (CELERY_BROKER_URL and REDIS_URL are empty): running in-process "
                "(task_always_eager): in the ingest worker on background threads, off the commit path; "
                "elsewhere (rerun_hooks, the admin) in the process that asks")
    return f"sent to Celery workers through {redacted(app.conf.broker_url)}"
