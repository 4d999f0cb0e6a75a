"""Production: secrets have no default, DEBUG is off unless asked for, HTTPS behind a TLS-terminating proxy.

`manage.py check --deploy` is clean with SECRET_KEY and ALLOWED_HOSTS set (tests/test_deploy.py proves it).
The proxy must set X-Forwarded-Proto (and strip it from clients): SECURE_PROXY_SSL_HEADER trusts it.
"""

from django.core.exceptions import ImproperlyConfigured

from monitor_project.settings.base import *  # noqa: F401,F403
from monitor_project.settings.base import env

SECRET_KEY = env.text("SECRET_KEY")
if not SECRET_KEY:
    raise ImproperlyConfigured(
        "SECRET_KEY is not set; production needs a long random value, e.g. "
        "python -c 'import secrets; print(secrets.token_urlsafe(50))'"
    )
DEBUG = env.boolean("DEBUG", False)
ALLOWED_HOSTS = env.csv("ALLOWED_HOSTS")
if not ALLOWED_HOSTS:
    raise ImproperlyConfigured(
        "ALLOWED_HOSTS is not set; list the host names the monitor is served under, "
        "comma-separated (e.g. monitor.example.com)"
    )
# Needed only when the browser's origin differs from the host Django sees, e.g. https://monitor.example.com.
CSRF_TRUSTED_ORIGINS = env.urls("CSRF_TRUSTED_ORIGINS")

# TLS ends at the proxy; it tells Django the original scheme.
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env.boolean("SECURE_SSL_REDIRECT", True)
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
SESSION_COOKIE_SECURE = True
CSRF_COOKIE_SECURE = True
SECURE_HSTS_SECONDS = env.integer("SECURE_HSTS_SECONDS", 31536000, low=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.boolean("SECURE_HSTS_INCLUDE_SUBDOMAINS", True)
SECURE_HSTS_PRELOAD = env.boolean("SECURE_HSTS_PRELOAD", True)
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"

# Static files from the image (collectstatic at build), compressed and with hashed names cached forever.
MIDDLEWARE.insert(  # noqa: F405
    MIDDLEWARE.index("django.middleware.security.SecurityMiddleware") + 1,  # noqa: F405
    "whitenoise.middleware.WhiteNoiseMiddleware",
)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}

# Seconds a connection is reused (0 = one per request). Keep 0 for the ASGI web server, where Django's
# persistent connections are per thread and leak; pool with PgBouncer instead (README, scaling notes).
DATABASES["default"]["CONN_MAX_AGE"] = env.integer("CONN_MAX_AGE", 0, low=0)  # noqa: F405
