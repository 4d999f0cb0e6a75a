"""Every setting is read in one place with its type and bounds: a bad value of any of them stops every entry
point with one line naming the variable, the value and what is expected (exit 2), and docs/configuration.md
lists exactly the settings the code reads."""
from __future__ import annotations

import importlib
import os
import re
import runpy
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from monitor_project.settings.environment import Environment, Setting, without_secrets

ROOT = Path(__file__).resolve().parent.parent
PRODUCTION = {"SECRET_KEY": "x" * 50, "ALLOWED_HOSTS": "monitor.example.com"}
# Variables docker-compose.yml reads for itself; the product never sees them.
COMPOSE_ONLY = {"POSTGRES_PASSWORD", "WEB_PORT", "CELERY_AUTOSCALE"}


def read_namespace(module: str, values: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """Run one settings module afresh with exactly these variables set; the settings it made."""
    for name in list(os.environ):
        monkeypatch.delenv(name)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return run_settings(module)


def read_settings(module: str, values: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, Setting]:
    """What one settings module read itself, by name. The local and production modules share the imported base
    module's reader, so its record starts empty here (what base read at import depends on the test run's own
    environment)."""
    monkeypatch.setattr(importlib.import_module("monitor_project.settings.base").env, "read", {})
    env = read_namespace(module, values, monkeypatch)["env"]
    assert isinstance(env, Environment)
    return dict(env.read)


def run_settings(module: str) -> dict[str, object]:
    """Execute a settings module's file again (the imported module stays as it is)."""
    return runpy.run_path(str(ROOT.joinpath(*module.split(".")).with_suffix(".py")))


def every_setting(monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[str, Setting]]:
    """Name -> (the settings module that reads it, what it is)."""
    found: dict[str, tuple[str, Setting]] = {}
    for module, values in (("monitor_project.settings.base", {}), ("monitor_project.settings.local", {}),
                           ("monitor_project.settings.production", PRODUCTION)):
        for name, setting in read_settings(module, values, monkeypatch).items():
            found.setdefault(name, (module, setting))
    return found


def bad_values(setting: Setting) -> Iterator[str]:
    """Values that must be refused, from what the setting says it accepts."""
    if setting.kind in ("integer", "number"):
        yield "abc"
        yield from (str(bound - 1) for bound in (setting.low,) if bound is not None)
        yield from (str(bound) for bound in (setting.above,) if bound is not None)
        yield from (str(bound + 1) for bound in (setting.high,) if bound is not None)
    elif setting.kind == "boolean":
        yield "maybe"
    elif setting.kind == "choice":
        yield "no-such-choice"
    elif setting.kind == "time zone":
        yield "Mars/Olympus_Mons"
    elif setting.kind in ("url", "url list"):
        yield "gopher://example.com/x"
        yield "example.com"


@pytest.fixture(scope="module")
def settings_by_name() -> dict[str, tuple[str, Setting]]:
    with pytest.MonkeyPatch.context() as monkeypatch:
        return every_setting(monkeypatch)


def test_every_setting_has_a_bad_value_to_try_or_takes_any_text(
    settings_by_name: dict[str, tuple[str, Setting]],
) -> None:
    free_text = {name for name, (_, setting) in settings_by_name.items() if not list(bad_values(setting))}
    assert len(settings_by_name) > 50
    assert free_text == {
        "SECRET_KEY", "ALLOWED_HOSTS", "HOOK_WEBHOOK_SECRET", "METRICS_TOKEN", "CONVERSATION_HOOKS_END",
        "CONVERSATION_HOOKS_WRAPUP", "GENESYSCLOUD_OAUTHCLIENT_ID", "GENESYS_CLIENT_ID",
        "GENESYSCLOUD_OAUTHCLIENT_SECRET", "GENESYS_CLIENT_SECRET", "GENESYS_QUEUE_IDS", "GENESYS_USER_IDS",
    }


def test_each_bad_value_of_each_setting_stops_with_one_line_naming_it(
    settings_by_name: dict[str, tuple[str, Setting]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    tried = 0
    for name, (module, setting) in sorted(settings_by_name.items()):
        for value in bad_values(setting):
            with pytest.raises(ImproperlyConfigured) as refused:
                read_settings(module, {**PRODUCTION, name: value}, monkeypatch)
            message = str(refused.value)
            shown = without_secrets(value) if setting.kind.startswith("url") else value
            assert message.startswith(f"{name}={shown!r} is not valid: expected "), message
            assert "\n" not in message
            tried += 1
    assert tried > 80


@pytest.mark.parametrize(("name", "value"), [
    ("INGEST_QUEUE_SIZE", "-3"), ("INGEST_BATCH_SIZE", "0"), ("STREAM_LEASE_SECONDS", "0"),
    ("HOOK_SWEEP_GRACE", "-1"), ("METRICS_PORT", "70000"),
])
def test_bounds_that_would_remove_a_limit_or_break_a_loop_are_refused(
    name: str, value: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ImproperlyConfigured, match=f"^{name}="):
        read_settings("monitor_project.settings.base", {name: value}, monkeypatch)


def test_good_values_are_read_with_their_types(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {"INGEST_QUEUE_SIZE": " 300 ", "INGEST_FOLD_AHEAD": "No", "LOG_LEVEL": "warning",
              "HOOK_WEBHOOK_URLS": "https://a.example/x, https://b.example/y", "TIME_ZONE": "Europe/Oslo",
              "INGEST_BATCH_MAX_AGE": ""}
    namespace = read_namespace("monitor_project.settings.base", values, monkeypatch)
    assert namespace["INGEST_QUEUE_SIZE"] == 300 and namespace["INGEST_FOLD_AHEAD"] is False
    assert namespace["LOG_LEVEL"] == "WARNING" and namespace["TIME_ZONE"] == "Europe/Oslo"
    assert namespace["HOOK_WEBHOOK_URLS"] == ["https://a.example/x", "https://b.example/y"]
    assert namespace["INGEST_BATCH_MAX_AGE"] == 0.1, "an empty value is unset: the default applies"


def documented_settings() -> set[str]:
    text = (ROOT / "docs" / "configuration.md").read_text()
    return set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", text, re.MULTILINE))


def test_docs_list_exactly_the_settings_the_code_reads(settings_by_name: dict[str, tuple[str, Setting]]) -> None:
    assert documented_settings() - COMPOSE_ONLY == set(settings_by_name) | {"DJANGO_SETTINGS_MODULE"}


def test_the_example_env_file_names_only_real_settings(settings_by_name: dict[str, tuple[str, Setting]]) -> None:
    text = (ROOT / ".env.example").read_text()
    names = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", text, re.MULTILINE))
    assert names - COMPOSE_ONLY <= set(settings_by_name)


ENTRY_POINTS = {
    "a command": [sys.executable, "manage.py", "check"],
    "the stream worker": [sys.executable, "manage.py", "stream_events"],
    "the web server": [sys.executable, "-m", "daphne", "monitor_project.asgi:application"],
    "the WSGI server": [sys.executable, "-c", "import monitor_project.wsgi"],
    "a Celery worker": [sys.executable, "-m", "celery", "-A", "monitor_project", "worker", "--pool=solo"],
    "Celery beat": [sys.executable, "-m", "celery", "-A", "monitor_project", "beat"],
}


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_a_bad_setting_stops_every_entry_point_with_one_line_and_exit_2(entry_point: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_SETTINGS")}
    env.update(PRODUCTION, INGEST_BATCH_SIZE="abc", DJANGO_SETTINGS_MODULE="monitor_project.settings.production")
    done = subprocess.run(ENTRY_POINTS[entry_point], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        "configuration error: INGEST_BATCH_SIZE='abc' is not valid: expected a whole number from 1 to 100,000"
    ], done.stderr


@pytest.mark.parametrize(("name", "value", "secret"), [
    ("DATABASE_URL", "mysql://monitor:s3cret-pw@db:3306/monitor", "s3cret-pw"),
    ("REDIS_URL", "http://:s3cret-pw@cache:6379/0", "s3cret-pw"),
    ("HOOK_WEBHOOK_URLS", "ftp://hooks.example.com/services/T0/B0/s3cret-path", "s3cret-path"),
])
def test_a_refused_url_never_shows_its_password_or_path(
    name: str, value: str, secret: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ImproperlyConfigured) as refused:
        read_settings("monitor_project.settings.base", {name: value}, monkeypatch)
    assert secret not in str(refused.value) and str(refused.value).startswith(f"{name}=")


def test_the_hook_lists_come_from_the_environment_and_empty_means_none(monkeypatch: pytest.MonkeyPatch) -> None:
    record, log, webhook = "tests.hooks.record", "conversations.hooks.log_conversation", \
        "conversations.hooks.signed_webhook"

    def hooks(**values: str) -> object:
        return read_namespace("monitor_project.settings.base", values, monkeypatch)["CONVERSATION_HOOKS"]

    assert hooks(CONVERSATION_HOOKS_END=f"{record},{log}", CONVERSATION_HOOKS_WRAPUP="",
                 HOOK_WEBHOOK_URLS="https://crm.example/hook") == {"end": [record, log], "wrapup": []}
    assert hooks(HOOK_WEBHOOK_URLS="https://crm.example/hook")["end"] == [log, webhook]  # type: ignore[index]
    assert hooks() == {"end": [log], "wrapup": [log]}
