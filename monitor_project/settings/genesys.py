"""Genesys Cloud connection settings: credentials, region and hosts, read and checked once."""
from __future__ import annotations

from dataclasses import dataclass

import environ
from django.core.exceptions import ImproperlyConfigured

# AWS-style region names Genesys publishes, mapped to the region's domain.
REGION_DOMAINS: dict[str, str] = {
    "us-east-1": "mypurecloud.com",
    "us-east-2": "use2.us-gov-pure.cloud",
    "us-west-2": "usw2.pure.cloud",
    "ca-central-1": "cac1.pure.cloud",
    "sa-east-1": "sae1.pure.cloud",
    "mx-central-1": "mxc1.pure.cloud",
    "eu-west-1": "mypurecloud.ie",
    "eu-west-2": "euw2.pure.cloud",
    "eu-central-1": "mypurecloud.de",
    "eu-central-2": "euc2.pure.cloud",
    "me-central-1": "mec1.pure.cloud",
    "ap-south-1": "aps1.pure.cloud",
    "ap-southeast-1": "apse1.pure.cloud",
    "ap-southeast-2": "mypurecloud.com.au",
    "ap-northeast-1": "mypurecloud.jp",
    "ap-northeast-2": "apne2.pure.cloud",
    "ap-northeast-3": "apne3.pure.cloud",
}
EVENT_SOURCES = ("notifications", "sse")
# "notifications" is what a real Genesys Cloud org offers; "sse" is for a relay that speaks the SSE contract.
DEFAULT_EVENT_SOURCE = "notifications"
MAX_NOTIFICATION_CHANNELS = 20  # per OAuth client: a 21st evicts the oldest


@dataclass(frozen=True)
class GenesysSettings:
    client_id: str
    client_secret: str = ""
    region_domain: str = "mypurecloud.com"
    api_url: str = ""
    login_url: str = ""
    event_source: str = DEFAULT_EVENT_SOURCE
    # The Notifications source: which queues and users to watch (no queue ids: every queue of the org).
    queue_ids: tuple[str, ...] = ()
    user_ids: tuple[str, ...] = ()
    notifications_idle_timeout: float = 70.0
    notifications_max_channels: int = MAX_NOTIFICATION_CHANNELS
    # How often a channel's subscriptions follow newly discovered conversations (their detail-event topics).
    notifications_sync_interval: float = 2.0

    def __repr__(self) -> str:  # the secret never reaches a log line or a traceback
        return (
            f"GenesysSettings(client_id={self.client_id!r}, region_domain={self.region_domain!r}, "
            f"api_url={self.api_url!r}, login_url={self.login_url!r}, event_source={self.event_source!r}, "
            f"queue_ids={self.queue_ids!r}, user_ids={self.user_ids!r})"
        )


def region_domain(value: str) -> str:
    """Accept a region domain (``mypurecloud.ie``) or an AWS-style name (``eu-west-1``)."""
    name = value.strip().lower()
    if name in REGION_DOMAINS:
        return REGION_DOMAINS[name]
    if name in REGION_DOMAINS.values():
        return name
    known = ", ".join(sorted(REGION_DOMAINS))
    raise ImproperlyConfigured(
        f"GENESYSCLOUD_REGION={value!r} is not a Genesys Cloud region; use a domain such as "
        f"mypurecloud.ie or one of: {known}"
    )


def _url(env: environ.Env, name: str, default: str) -> str:
    value = env.str(name, default=default).rstrip("/")
    if not value.startswith(("http://", "https://")):
        raise ImproperlyConfigured(f"{name}={value!r} must be an http:// or https:// URL")
    return value


def load(env: environ.Env) -> GenesysSettings:
    domain = region_domain(env.str("GENESYSCLOUD_REGION", default="mypurecloud.com"))
    source = env.str("GENESYS_EVENT_SOURCE", default=DEFAULT_EVENT_SOURCE).strip().lower()
    if source not in EVENT_SOURCES:
        raise ImproperlyConfigured(
            f"GENESYS_EVENT_SOURCE={source!r} is not a known source; use one of: {', '.join(EVENT_SOURCES)}"
        )
    return GenesysSettings(
        client_id=env.str("GENESYSCLOUD_OAUTHCLIENT_ID", default="") or env.str("GENESYS_CLIENT_ID", default=""),
        client_secret=env.str("GENESYSCLOUD_OAUTHCLIENT_SECRET", default="")
        or env.str("GENESYS_CLIENT_SECRET", default=""),
        region_domain=domain,
        api_url=_url(env, "GENESYS_API_URL", f"https://api.{domain}"),
        login_url=_url(env, "GENESYS_LOGIN_URL", f"https://login.{domain}"),
        event_source=source,
        queue_ids=_ids(env, "GENESYS_QUEUE_IDS"),
        user_ids=_ids(env, "GENESYS_USER_IDS"),
        notifications_idle_timeout=_positive(env, "GENESYS_NOTIFICATIONS_IDLE_TIMEOUT", 70.0),
        notifications_max_channels=_channels(env),
        notifications_sync_interval=_positive(env, "GENESYS_NOTIFICATIONS_SYNC_INTERVAL", 2.0),
    )


def _ids(env: environ.Env, name: str) -> tuple[str, ...]:
    """A comma-separated list of ids, blanks and duplicates dropped."""
    return tuple(dict.fromkeys(item.strip() for item in env.str(name, default="").split(",") if item.strip()))


def _positive(env: environ.Env, name: str, default: float) -> float:
    try:
        value = env.float(name, default=default)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number of seconds") from None
    if not value > 0:
        raise ImproperlyConfigured(f"{name}={value!r} must be a positive number of seconds")
    return value


def _channels(env: environ.Env) -> int:
    name = "GENESYS_NOTIFICATIONS_MAX_CHANNELS"
    try:
        value = env.int(name, default=MAX_NOTIFICATION_CHANNELS)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a whole number") from None
    if not 1 <= value <= MAX_NOTIFICATION_CHANNELS:
        raise ImproperlyConfigured(f"{name}={value} must be between 1 and {MAX_NOTIFICATION_CHANNELS}")
    return value
