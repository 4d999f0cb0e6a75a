"""What the processes write to their logs: one line per record, in the configured format, each record once."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_django_records_reach_the_terminal_once_through_the_root_handler() -> None:
    """Django's default config gives the "django" logger a console handler of its own: with DEBUG on (the demo)
    each django.request warning printed twice, once ignoring LOG_FORMAT."""
    django_logger = logging.getLogger("django")
    assert django_logger.handlers == [] and django_logger.propagate
    assert logging.getLogger("django.request").handlers == []


@pytest.mark.django_db(transaction=True)
def test_with_log_format_json_every_line_of_the_worker_is_a_json_object(
    simulator, worker_env: dict[str, str],  # noqa: ANN001
) -> None:
    payloads = simulator.generate(conversations=3)
    worker_env.update(LOG_FORMAT="json", DEBUG="true")
    done = subprocess.run(
        [sys.executable, "manage.py", "stream_events", "--max-events", str(len(payloads))],
        cwd=ROOT, env=worker_env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) > 3
    records = [json.loads(line) for line in lines]
    assert {"time", "level", "logger", "message"} <= set(records[0])
