"""Genesys Cloud connection settings: credentials, region and hosts, read and checked once."""
from __future__ import annotations

from dataclasses import dataclass

from monitor_project.settings.environment import Environment

# AWS-style region names Genesys publishes, mapped to the region's domain: the one list of regions (a test
# compares it with the official SDK's hosts). The API host is api.{domain}, the login host login.{domain}.
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
    "eusc-de-east-1": "edee1.eusc-pure.cloud",  # the EU sovereign cloud
}
REGION_CHOICES = (*REGION_DOMAINS, *REGION_DOMAINS.values())
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


def load(env: Environment) -> GenesysSettings:
    domain = region_domain(env.choice("GENESYSCLOUD_REGION", "mypurecloud.com", REGION_CHOICES))
    return GenesysSettings(
        client_id=env.text("GENESYSCLOUD_OAUTHCLIENT_ID") or env.text("GENESYS_CLIENT_ID"),
        client_secret=env.text("GENESYSCLOUD_OAUTHCLIENT_SECRET") or env.text("GENESYS_CLIENT_SECRET"),
        region_domain=domain,
        api_url=env.url("GENESYS_API_URL", f"https://api.{domain}").rstrip("/"),
        login_url=env.url("GENESYS_LOGIN_URL", f"https://login.{domain}").rstrip("/"),
        event_source=env.choice("GENESYS_EVENT_SOURCE", DEFAULT_EVENT_SOURCE, EVENT_SOURCES),
        queue_ids=tuple(env.csv("GENESYS_QUEUE_IDS")),
        user_ids=tuple(env.csv("GENESYS_USER_IDS")),
        notifications_idle_timeout=env.number("GENESYS_NOTIFICATIONS_IDLE_TIMEOUT", 70.0, above=0),
        notifications_max_channels=env.integer(
            "GENESYS_NOTIFICATIONS_MAX_CHANNELS", MAX_NOTIFICATION_CHANNELS, low=1, high=MAX_NOTIFICATION_CHANNELS),
        notifications_sync_interval=env.number("GENESYS_NOTIFICATIONS_SYNC_INTERVAL", 2.0, above=0),
    )


def region_domain(value: str) -> str:
    """The domain of a region given as a domain (``mypurecloud.ie``) or an AWS-style name (``eu-west-1``)."""
    return REGION_DOMAINS.get(value.lower(), value.lower())
