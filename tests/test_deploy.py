"""Deployment artefacts: the compose file, the image recipe, production settings, JSON logs."""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from monitor_project.logging import JsonFormatter

ROOT = Path(__file__).resolve().parent.parent
DJANGO_SERVICES = ("migrate", "web", "stream_events", "celery_worker", "celery_beat")
LONG_RUNNING = ("postgres", "redis", "web", "stream_events", "celery_worker", "celery_beat")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def command_of(service: dict[str, Any]) -> str:
    command = service["command"]
    return command if isinstance(command, str) else " ".join(command)


def test_the_compose_file_names_every_service(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"postgres", "redis", *DJANGO_SERVICES}


def test_every_django_service_runs_the_one_image_and_differs_only_by_command(compose: dict[str, Any]) -> None:
    services = compose["services"]
    images = {(services[name]["image"], services[name]["build"]) for name in DJANGO_SERVICES}
    assert images == {("genesys-conversation-monitor:latest", ".")}
    assert all(services[name]["env_file"] == ".env" for name in DJANGO_SERVICES)
    commands = {name: command_of(services[name]) for name in DJANGO_SERVICES}
    assert commands["migrate"] == "python manage.py migrate --noinput"
    assert commands["web"] == "daphne -b 0.0.0.0 -p 8000 monitor_project.asgi:application"
    assert commands["stream_events"] == "python manage.py stream_events"
    assert commands["celery_worker"].startswith("celery -A monitor_project worker")
    assert commands["celery_beat"].startswith("celery -A monitor_project beat")


def test_migrations_run_once_before_every_other_django_service(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["migrate"]["restart"] == "no"
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in set(DJANGO_SERVICES) - {"migrate"}:
        depends = services[name]["depends_on"]
        assert depends["migrate"] == {"condition": "service_completed_successfully"}, name
        assert depends["postgres"] == depends["redis"] == {"condition": "service_healthy"}, name


def test_services_have_healthchecks_restart_policies_and_a_database_volume(compose: dict[str, Any]) -> None:
    services = compose["services"]
    checks = {
        name: " ".join(services[name]["healthcheck"]["test"])
        for name in services
        if "healthcheck" in services[name]
    }
    assert "pg_isready" in checks["postgres"]
    assert "redis-cli ping" in checks["redis"]
    assert "urllib.request" in checks["web"] and "/healthz" in checks["web"]
    assert "manage.py stream_status --check" in checks["stream_events"]
    assert all(services[name]["restart"] == "unless-stopped" for name in LONG_RUNNING)
    assert "pgdata" in compose["volumes"]
    assert "pgdata:/var/lib/postgresql/data" in services["postgres"]["volumes"]


def test_the_image_is_python_311_slim_installs_the_production_lock_and_runs_as_a_user() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", dockerfile, re.MULTILINE)
    installs = re.findall(r"pip install .*", dockerfile)
    assert installs == ["pip install --require-hashes --no-deps -r requirements/production.txt"]
    users = re.findall(r"^USER (\S+)$", dockerfile, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".env", ".venv", ".git"} <= set(ignored)


def production_env(**overrides: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "SECRET_KEY", "ALLOWED_HOSTS"))
    }
    env.update(
        DJANGO_SETTINGS_MODULE="monitor_project.settings.production",
        SECRET_KEY=secrets.token_urlsafe(50),
        ALLOWED_HOSTS="monitor.example.com",
        CSRF_TRUSTED_ORIGINS="https://monitor.example.com",
        DATABASE_URL="postgres://monitor:secret@127.0.0.1:5432/monitor",
        REDIS_URL="redis://127.0.0.1:6379/0",
    )
    env.update(overrides)
    return env


def manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def test_check_deploy_is_clean_with_a_production_environment() -> None:
    result = manage("check", "--deploy", "--fail-level", "WARNING", env=production_env())
    assert result.returncode == 0, result.stderr + result.stdout
    assert "System check identified no issues" in result.stdout
    assert "WARNING" not in result.stderr + result.stdout


@pytest.mark.parametrize("name", ["SECRET_KEY", "ALLOWED_HOSTS"])
def test_a_missing_production_secret_or_host_list_is_one_line_naming_it(name: str) -> None:
    result = manage("check", env=production_env(**{name: ""}))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and name in lines[0] and "Traceback" not in result.stderr


def test_debug_is_off_in_production_unless_asked() -> None:
    probe = "from django.conf import settings; print(settings.DEBUG, settings.SESSION_COOKIE_SECURE)"
    off = manage("shell", "-c", probe, env=production_env())
    on = manage("shell", "-c", probe, env=production_env(DEBUG="true"))
    last = [result.stdout.strip().splitlines()[-1] for result in (off, on)]
    assert last == ["False True", "True True"]


def test_json_log_lines_carry_the_message_its_context_and_the_exception() -> None:
    logger = logging.getLogger("tests.deploy")
    try:
        raise ValueError("bad row")
    except ValueError:
        record = logger.makeRecord(
            "tests.deploy",
            logging.ERROR,
            __file__,
            1,
            "batch %s failed for %s",
            (7, "Zoë"),
            sys.exc_info(),
            extra={"source": "sse"},
        )
    line = JsonFormatter().format(record)
    entry = json.loads(line)
    assert "\n" not in line
    assert (entry["level"], entry["logger"], entry["message"], entry["source"]) == (
        "ERROR",
        "tests.deploy",
        "batch 7 failed for Zoë",
        "sse",
    )
    assert "ValueError: bad row" in entry["exception"]


def test_log_format_json_switches_the_console_handler() -> None:
    probe = "import logging; logging.getLogger('probe').warning('hello %s', 'world')"
    result = manage("shell", "-c", probe, env=production_env(LOG_FORMAT="json"))
    entry = json.loads(result.stderr.strip().splitlines()[-1])
    assert (entry["logger"], entry["message"]) == ("probe", "hello world")
    bad = manage("check", env=production_env(LOG_FORMAT="xml"))
    assert bad.returncode == 2 and "LOG_FORMAT" in bad.stderr
