"""Settings shared by every environment. Everything configurable comes from the environment (or `.env`),
read through `env` (environment.Environment: each variable's type and bounds, one-line errors);
docs/configuration.md lists them all."""
from __future__ import annotations

from pathlib import Path

import environ

from monitor_project.settings import genesys
from monitor_project.settings.environment import Environment, invalid, without_secrets

BASE_DIR = Path(__file__).resolve().parent.parent.parent

if (BASE_DIR / ".env").exists():
    environ.Env.read_env(BASE_DIR / ".env", overwrite=False)
env = Environment()

SECRET_KEY = env.text("SECRET_KEY", "insecure-local-only-key-do-not-use-in-production")
DEBUG = env.boolean("DEBUG", False)
ALLOWED_HOSTS = env.csv("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])

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
    try:
        config = environ.Env.db_url_config(url)
    except (KeyError, ValueError) as exc:
        raise invalid("DATABASE_URL", without_secrets(url), f"a database URL ({exc})") from None
    if config["ENGINE"] == "django.db.backends.sqlite3":
        config.setdefault("OPTIONS", {}).update(
            {"init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;", "transaction_mode": "IMMEDIATE",
             "timeout": 20}
        )
    else:
        # Persistent connections: the ingest worker commits many batches a second on one connection.
        config["CONN_MAX_AGE"] = env.integer("CONN_MAX_AGE", 60, low=0)
        config["CONN_HEALTH_CHECKS"] = True
    return config


# PostgreSQL in production; SQLite for the demo and the quick tests.
DATABASE_SCHEMES = ("postgres", "postgresql", "sqlite")
DATABASES = {"default": database_config(
    env.url("DATABASE_URL", f"sqlite:///{BASE_DIR / 'db.sqlite3'}", schemes=DATABASE_SCHEMES))}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = env.time_zone("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"

GENESYS = genesys.load(env)

# Redis: the Celery broker and the channel layer when set; empty means the single-process demo defaults.
REDIS_URL = env.url("REDIS_URL", "", schemes=("redis", "rediss", "unix"))
# Every Redis client of the product names its socket timeouts. redis-py's default read timeout (5 s since
# redis-py 8) is no longer than channels_redis's blocking receive (BZPOPMIN, 5 s), so with the defaults every idle
# live socket dies with a TimeoutError; the read timeout must stay well above the longest blocking command.
REDIS_SOCKET_OPTIONS = {
    "socket_connect_timeout": 5,
    "socket_timeout": 30,  # > channels_redis brpop_timeout (5 s) and kombu's BRPOP (1 s)
    "socket_keepalive": True,
    "health_check_interval": 25,  # a PING before reusing a connection idle this long
}

# --- Celery and post-call hooks (see conversations/outbox.py) ---
BROKER_SCHEMES = ("redis", "rediss", "amqp", "amqps", "pyamqp", "sqs", "sentinel")
# No broker (the demo, the SQLite tests): tasks run in-process, in the process that committed the batch.
CELERY_BROKER_URL = env.url("CELERY_BROKER_URL", "", schemes=BROKER_SCHEMES) or REDIS_URL
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
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600, **REDIS_SOCKET_OPTIONS, "socket_connect_timeout": 3}
CELERY_TIMEZONE = "UTC"
HOOK_TASK_SOFT_TIME_LIMIT = env.integer("HOOK_TASK_SOFT_TIME_LIMIT", 60, low=1)
HOOK_TASK_TIME_LIMIT = env.integer("HOOK_TASK_TIME_LIMIT", 90, low=1)
if HOOK_TASK_TIME_LIMIT <= HOOK_TASK_SOFT_TIME_LIMIT:
    raise invalid("HOOK_TASK_TIME_LIMIT", str(HOOK_TASK_TIME_LIMIT),
                  f"more seconds than HOOK_TASK_SOFT_TIME_LIMIT ({HOOK_TASK_SOFT_TIME_LIMIT})")
HOOK_MAX_ATTEMPTS = env.integer("HOOK_MAX_ATTEMPTS", 5, low=1, high=100)
HOOK_RETRY_BASE = env.number("HOOK_RETRY_BASE", 10.0, above=0)  # seconds; doubles per attempt, with jitter
HOOK_RETRY_MAX = env.number("HOOK_RETRY_MAX", 900.0, above=0)
# The sweeper re-sends deliveries pending longer than HOOK_SWEEP_GRACE seconds; a claim older than
# HOOK_CLAIM_TIMEOUT (above the task's hard time limit) belongs to a dead worker and is released.
HOOK_SWEEP_INTERVAL = env.number("HOOK_SWEEP_INTERVAL", 30.0, above=0)
HOOK_SWEEP_GRACE = env.number("HOOK_SWEEP_GRACE", 60.0, low=0)
HOOK_SWEEP_BATCH = env.integer("HOOK_SWEEP_BATCH", 500, low=1, high=100_000)
HOOK_CLAIM_TIMEOUT = env.number("HOOK_CLAIM_TIMEOUT", 300.0, above=0)
# Without a broker the stream worker runs hooks itself, off its commit path: threads fed by a bounded queue
# (conversations.tasks.InProcessRunner); on SIGTERM running hooks get the grace, the rest stay pending.
HOOK_INPROCESS_THREADS = env.integer("HOOK_INPROCESS_THREADS", 4, low=1, high=32)
HOOK_INPROCESS_QUEUE_SIZE = env.integer("HOOK_INPROCESS_QUEUE_SIZE", 1000, low=1, high=100_000)
HOOK_INPROCESS_SHUTDOWN_GRACE = env.number("HOOK_INPROCESS_SHUTDOWN_GRACE", 10.0, low=0, high=60)
CELERY_BEAT_SCHEDULE = {
    "sweep-hook-deliveries": {"task": "conversations.sweep_hook_deliveries", "schedule": HOOK_SWEEP_INTERVAL},
}
HOOK_WEBHOOK_URLS = env.urls("HOOK_WEBHOOK_URLS")
HOOK_WEBHOOK_SECRET = env.text("HOOK_WEBHOOK_SECRET")
HOOK_WEBHOOK_CONNECT_TIMEOUT = env.number("HOOK_WEBHOOK_CONNECT_TIMEOUT", 5.0, above=0)
HOOK_WEBHOOK_TIMEOUT = env.number("HOOK_WEBHOOK_TIMEOUT", 10.0, above=0)
# Dotted paths of callables per trigger (checked by a system check); by default the logging hook, plus the
# webhook when URLs are set.
DEFAULT_HOOKS = ["conversations.hooks.log_conversation"] + (
    ["conversations.hooks.signed_webhook"] if HOOK_WEBHOOK_URLS else [])
CONVERSATION_HOOKS = {
    "end": env.csv("CONVERSATION_HOOKS_END", DEFAULT_HOOKS),
    "wrapup": env.csv("CONVERSATION_HOOKS_WRAPUP", DEFAULT_HOOKS),
}

# --- Channels and the live pages (see conversations/realtime.py) ---
ASGI_APPLICATION = "monitor_project.asgi.application"
# Redis carries live updates from the worker process to the web processes; without it the in-memory layer
# works only inside one process (`manage.py demo` runs the worker and the web server together).
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [{"address": REDIS_URL, **REDIS_SOCKET_OPTIONS}], "capacity": 200, "expiry": 10},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
LOGIN_URL = "conversations:login"
LOGIN_REDIRECT_URL = "conversations:live"
LOGOUT_REDIRECT_URL = "conversations:login"

# --- Operations: health, metrics, logging ---
# The stream worker upserts its WorkerHeartbeat row this often (seconds).
HEARTBEAT_INTERVAL = env.number("HEARTBEAT_INTERVAL", 5.0, above=0)
# /readyz and `stream_status --check` fail once the stream was last known alive longer ago than this; 0 = no check.
STREAM_STALE_SECONDS = env.number("STREAM_STALE_SECONDS", 120.0, low=0)
# The stream worker serves its own Prometheus counters on this port (0 = off); the web serves /metrics.
METRICS_PORT = env.integer("METRICS_PORT", 0, low=0, high=65535)
# When set, /metrics wants `Authorization: Bearer <token>`; empty leaves it open (keep it off the public ingress).
METRICS_TOKEN = env.text("METRICS_TOKEN")
# Hook outcomes and rejects on /metrics count the rows of this many recent seconds (indexed, bounded queries).
METRICS_WINDOW_SECONDS = env.integer("METRICS_WINDOW_SECONDS", 3600, low=1)
LOG_FORMAT = env.choice("LOG_FORMAT", "plain", ("plain", "json"))

# The ingest pipeline: a bounded queue between the reader and the writer, flushed by size or by age.
INGEST_BATCH_SIZE = env.integer("INGEST_BATCH_SIZE", 2000, low=1, high=100_000)
INGEST_BATCH_MAX_AGE = env.number("INGEST_BATCH_MAX_AGE", 0.1, above=0, high=60)
INGEST_QUEUE_SIZE = env.integer("INGEST_QUEUE_SIZE", 5000, low=1, high=1_000_000)
# PostgreSQL: fold the next batch while the database stores this one (pipeline.FoldAhead).
INGEST_FOLD_AHEAD = env.boolean("INGEST_FOLD_AHEAD", True)
SSE_READ_TIMEOUT = env.number("SSE_READ_TIMEOUT", 90.0, above=0)
SSE_BACKOFF_MAX = env.number("SSE_BACKOFF_MAX", 60.0, above=0)
# One active consumer per source: the lease a worker holds and renews; a standby takes over when it expires.
STREAM_LEASE_SECONDS = env.number("STREAM_LEASE_SECONDS", 10.0, above=0)
# Gap backfill (conversations/backfill.py): after the Notifications source (re)connects, the gap in its connection
# history (downtime, a reconnect, an eviction) is fetched again from the analytics details query, padded by the
# margin on each side, once the delay has passed (analytics records lag the live events by up to a minute).
# Gaps longer than the maximum are backfilled for their most recent part; `manage.py backfill` does the rest.
GENESYS_BACKFILL_ON_GAP = env.boolean("GENESYS_BACKFILL_ON_GAP", True)
GENESYS_BACKFILL_MARGIN = env.number("GENESYS_BACKFILL_MARGIN", 60.0, low=0)
GENESYS_BACKFILL_DELAY = env.number("GENESYS_BACKFILL_DELAY", 60.0, low=0)
GENESYS_BACKFILL_MAX_GAP = env.number("GENESYS_BACKFILL_MAX_GAP", 7 * 24 * 3600.0, above=0)

LOG_LEVEL = env.choice("LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
        "json": {"()": "monitor_project.logging.JsonFormatter"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        # Django's default config gives "django" a console handler of its own (when DEBUG is on) on top of the
        # root's: every django.* line would print twice, the second time ignoring LOG_FORMAT.
        "django": {"handlers": [], "level": "INFO", "propagate": True},
        "urllib3": {"level": "WARNING"},
        "aiohttp.access": {"level": "WARNING"},
    },
}
