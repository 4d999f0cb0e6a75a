"""The Notifications source's settings, read from the environment."""
from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured

from monitor_project.settings.environment import Environment
from monitor_project.settings.genesys import GenesysSettings, load


def settings_from(**values: str) -> GenesysSettings:
    return load(Environment(source=values))


def test_the_notifications_source_and_what_it_watches_come_from_the_environment() -> None:
    config = settings_from(GENESYS_EVENT_SOURCE=" Notifications ", GENESYS_QUEUE_IDS="q1, q2,,q1 ",
                           GENESYS_USER_IDS="u1", GENESYS_NOTIFICATIONS_IDLE_TIMEOUT="45",
                           GENESYS_NOTIFICATIONS_MAX_CHANNELS="5")
    assert config.event_source == "notifications"
    assert (config.queue_ids, config.user_ids) == (("q1", "q2"), ("u1",))
    assert (config.notifications_idle_timeout, config.notifications_max_channels) == (45.0, 5)


def test_the_defaults_watch_every_queue_and_ping_after_70_seconds() -> None:
    config = settings_from()
    assert (config.queue_ids, config.user_ids) == ((), ())
    assert (config.notifications_idle_timeout, config.notifications_max_channels) == (70.0, 20)
    assert config.notifications_sync_interval == 2.0


@pytest.mark.parametrize(("name", "value", "message"), [
    ("GENESYS_NOTIFICATIONS_IDLE_TIMEOUT", "0", "expected a number above 0"),
    ("GENESYS_NOTIFICATIONS_IDLE_TIMEOUT", "soon", "expected a number above 0"),
    ("GENESYS_NOTIFICATIONS_MAX_CHANNELS", "21", "expected a whole number from 1 to 20"),
    ("GENESYS_EVENT_SOURCE", "kafka", "expected one of notifications, sse"),
])
def test_a_bad_value_names_its_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=message) as failure:
        settings_from(**{name: value})
    assert name in str(failure.value)
