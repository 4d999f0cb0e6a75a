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
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "conversations",
]

MIDDLEWARE = [
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
        config.setdefault("CONN_HEALTH_CHECKS", True)
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

# --- Channels and the live pages (see conversations/realtime.py) ---

# --- Operations: health, metrics, logging ---

# The ingest pipeline: a bounded queue between the reader and the writer, flushed by size or by age.
INGEST_BATCH_SIZE = env.int("INGEST_BATCH_SIZE", default=500)
INGEST_BATCH_MAX_AGE = env.float("INGEST_BATCH_MAX_AGE", default=0.1)
INGEST_QUEUE_SIZE = env.int("INGEST_QUEUE_SIZE", default=5000)
SSE_READ_TIMEOUT = env.float("SSE_READ_TIMEOUT", default=90.0)
SSE_BACKOFF_MAX = env.float("SSE_BACKOFF_MAX", default=60.0)

LOG_LEVEL = env.str("LOG_LEVEL", default="INFO")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {"urllib3": {"level": "WARNING"}, "aiohttp.access": {"level": "WARNING"}},
}
