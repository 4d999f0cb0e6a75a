"""Settings shared by every environment. Everything configurable comes from the environment (or `.env`)."""
from __future__ import annotations

from pathlib import Path

import environ

from monitor_project.settings import genesys

BASE_DIR = Path(__file__).resolve().parent.parent.parent

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

SECRET_KEY = env.str("SECRET_KEY", default="insecure-local-only-key-do-not-use-in-production")
DEBUG = env.bool("DEBUG", default=False)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])

INSTALLED_APPS = [
    "daphne",  # first: `runserver` then serves ASGI (HTTP and WebSocket)
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "conversations",
]

MIDDLEWARE = [
    # First: probes answer before host validation and the HTTPS redirect (they come by pod IP, over plain HTTP).
    "conversations.health.ProbeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "monitor_project.urls"
WSGI_APPLICATION = "monitor_project.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


def database_config(url: str) -> dict:
    """Parse DATABASE_URL; SQLite gets WAL and immediate transactions so the web server and the worker share it."""
    scheme = url.partition("://")[0]
    if scheme not in environ.Env.DB_SCHEMES:
        raise environ.ImproperlyConfigured(
            f"DATABASE_URL has the unknown scheme {scheme!r}; use postgres://user:pass@host:5432/name or sqlite:///path"
        )
    try:
        config = environ.Env.db_url_config(url)
    except (KeyError, ValueError) as exc:
        raise environ.ImproperlyConfigured(f"DATABASE_URL is not a database URL: {exc}") from None
    if config["ENGINE"] == "django.db.backends.sqlite3":
        config.setdefault("OPTIONS", {}).update(
            {"init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;", "transaction_mode": "IMMEDIATE",
             "timeout": 20}
        )
    else:
        # Persistent connections: the ingest worker commits many batches a second on one connection.
        config["CONN_MAX_AGE"] = env.int("CONN_MAX_AGE", default=60)
        config["CONN_HEALTH_CHECKS"] = True
    return config


DATABASES = {"default": database_config(env.str("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}"))}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = env.str("TIME_ZONE", default="UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"

GENESYS = genesys.load(env)

# Redis: the Celery broker and the channel layer when set; empty means the single-process demo defaults.
REDIS_URL = env.str("REDIS_URL", default="")

# --- Celery and post-call hooks (see conversations/outbox.py) ---
# No broker (the demo, the SQLite tests): tasks run in-process, in the process that committed the batch.
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="") or REDIS_URL
CELERY_TASK_ALWAYS_EAGER = not CELERY_BROKER_URL
if CELERY_TASK_ALWAYS_EAGER:
    CELERY_BROKER_URL = "memory://localhost/"  # never used; keeps kombu from guessing (and warning about) a host
CELERY_TASK_EAGER_PROPAGATES = False
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
# A task is acknowledged after it ran, and given back to the queue if its worker process dies mid-task.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Longer than the longest retry delay, so a scheduled retry is not handed out twice by Redis.
# A broker that does not answer costs a batch a few seconds at most: the outbox keeps what was not sent.
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600, "socket_connect_timeout": 3}
CELERY_TIMEZONE = "UTC"
HOOK_TASK_SOFT_TIME_LIMIT = env.int("HOOK_TASK_SOFT_TIME_LIMIT", default=60)
HOOK_TASK_TIME_LIMIT = env.int("HOOK_TASK_TIME_LIMIT", default=90)
HOOK_MAX_ATTEMPTS = env.int("HOOK_MAX_ATTEMPTS", default=5)
HOOK_RETRY_BASE = env.float("HOOK_RETRY_BASE", default=10.0)  # seconds; doubles per attempt, with jitter
HOOK_RETRY_MAX = env.float("HOOK_RETRY_MAX", default=900.0)
# The sweeper re-sends deliveries pending longer than HOOK_SWEEP_GRACE seconds; a claim older than
# HOOK_CLAIM_TIMEOUT (above the task's hard time limit) belongs to a dead worker and is released.
HOOK_SWEEP_INTERVAL = env.float("HOOK_SWEEP_INTERVAL", default=30.0)
HOOK_SWEEP_GRACE = env.float("HOOK_SWEEP_GRACE", default=60.0)
HOOK_SWEEP_BATCH = env.int("HOOK_SWEEP_BATCH", default=500)
HOOK_CLAIM_TIMEOUT = env.float("HOOK_CLAIM_TIMEOUT", default=300.0)
CELERY_BEAT_SCHEDULE = {
    "sweep-hook-deliveries": {"task": "conversations.sweep_hook_deliveries", "schedule": HOOK_SWEEP_INTERVAL},
}
HOOK_WEBHOOK_URLS = env.list("HOOK_WEBHOOK_URLS", default=[])
HOOK_WEBHOOK_SECRET = env.str("HOOK_WEBHOOK_SECRET", default="")
HOOK_WEBHOOK_CONNECT_TIMEOUT = env.float("HOOK_WEBHOOK_CONNECT_TIMEOUT", default=5.0)
HOOK_WEBHOOK_TIMEOUT = env.float("HOOK_WEBHOOK_TIMEOUT", default=10.0)


def conversation_hooks(env: environ.Env) -> dict[str, list[str]]:
    """Dotted paths of callables per trigger; by default the logging hook, plus the webhook when URLs are set."""
    default = ["conversations.hooks.log_conversation"]
    if env.list("HOOK_WEBHOOK_URLS", default=[]):
        default.append("conversations.hooks.signed_webhook")
    return {
        "end": env.list("CONVERSATION_HOOKS_END", default=default),
        "wrapup": env.list("CONVERSATION_HOOKS_WRAPUP", default=default),
    }


CONVERSATION_HOOKS = conversation_hooks(env)

# --- Channels and the live pages (see conversations/realtime.py) ---
ASGI_APPLICATION = "monitor_project.asgi.application"
# Redis carries live updates from the worker process to the web processes; without it the in-memory layer
# works only inside one process (`manage.py demo` runs the worker and the web server together).
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL], "capacity": 200, "expiry": 10},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
LOGIN_URL = "conversations:login"
LOGIN_REDIRECT_URL = "conversations:live"
LOGOUT_REDIRECT_URL = "conversations:login"

# --- Operations: health, metrics, logging ---
# The stream worker upserts its WorkerHeartbeat row this often (seconds).
HEARTBEAT_INTERVAL = env.float("HEARTBEAT_INTERVAL", default=5.0)
# /readyz and `stream_status --check` fail once the stream was last known alive longer ago than this; 0 = no check.
STREAM_STALE_SECONDS = env.float("STREAM_STALE_SECONDS", default=120.0)
# The stream worker serves its own Prometheus counters on this port (0 = off); the web serves /metrics.
METRICS_PORT = env.int("METRICS_PORT", default=0)
# When set, /metrics wants `Authorization: Bearer <token>`; empty leaves it open (keep it off the public ingress).
METRICS_TOKEN = env.str("METRICS_TOKEN", default="")
# Hook outcomes and rejects on /metrics count the rows of this many recent seconds (indexed, bounded queries).
METRICS_WINDOW_SECONDS = env.int("METRICS_WINDOW_SECONDS", default=3600)
LOG_FORMAT = env.str("LOG_FORMAT", default="plain").strip().lower()
if LOG_FORMAT not in ("plain", "json"):
    raise environ.ImproperlyConfigured(f"LOG_FORMAT={LOG_FORMAT!r} is not a log format; use plain or json")

# The ingest pipeline: a bounded queue between the reader and the writer, flushed by size or by age.
INGEST_BATCH_SIZE = env.int("INGEST_BATCH_SIZE", default=2000)
INGEST_BATCH_MAX_AGE = env.float("INGEST_BATCH_MAX_AGE", default=0.1)
INGEST_QUEUE_SIZE = env.int("INGEST_QUEUE_SIZE", default=5000)
# PostgreSQL: fold the next batch while the database stores this one (pipeline.FoldAhead).
INGEST_FOLD_AHEAD = env.bool("INGEST_FOLD_AHEAD", default=True)
SSE_READ_TIMEOUT = env.float("SSE_READ_TIMEOUT", default=90.0)
SSE_BACKOFF_MAX = env.float("SSE_BACKOFF_MAX", default=60.0)
# One active consumer per source: the lease a worker holds and renews; a standby takes over when it expires.
STREAM_LEASE_SECONDS = env.float("STREAM_LEASE_SECONDS", default=10.0)
# Gap backfill (conversations/backfill.py): after the Notifications source (re)connects, the gap in its connection
# history (downtime, a reconnect, an eviction) is fetched again from the analytics details query, padded by the
# margin on each side, once the delay has passed (analytics records lag the live events by up to a minute).
# Gaps longer than the maximum are backfilled for their most recent part; `manage.py backfill` does the rest.
GENESYS_BACKFILL_ON_GAP = env.bool("GENESYS_BACKFILL_ON_GAP", default=True)
GENESYS_BACKFILL_MARGIN = env.float("GENESYS_BACKFILL_MARGIN", default=60.0)
GENESYS_BACKFILL_DELAY = env.float("GENESYS_BACKFILL_DELAY", default=60.0)
GENESYS_BACKFILL_MAX_GAP = env.float("GENESYS_BACKFILL_MAX_GAP", default=7 * 24 * 3600.0)

LOG_LEVEL = env.str("LOG_LEVEL", default="INFO")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
        "json": {"()": "monitor_project.logging.JsonFormatter"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {"urllib3": {"level": "WARNING"}, "aiohttp.access": {"level": "WARNING"}},
}
