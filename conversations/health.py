"""Probes: /healthz (the process answers), /readyz (the database answers and the stream is fresh).

ProbeMiddleware sits first in MIDDLEWARE and answers the probe paths (and /metrics) itself, before host
validation and the HTTPS redirect: orchestrators and Prometheus call by pod IP over plain HTTP, which
ALLOWED_HOSTS and SECURE_SSL_REDIRECT would otherwise turn into a 400 or a 301.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.db import DatabaseError, connection
from django.http import HttpRequest, HttpResponse, JsonResponse

from conversations import heartbeat
from conversations.metrics import metrics_view

logger = logging.getLogger(__name__)


def healthz(request: HttpRequest) -> JsonResponse:
    """The process is alive and serving; touches nothing else, so a slow database never restarts the web."""
    return JsonResponse({"status": "ok"})


def readyz(request: HttpRequest) -> JsonResponse:
    problem = database_problem()
    if problem:
        return unready(problem, database="unreachable")
    freshness = heartbeat.stream_freshness()
    stream = stream_summary(freshness)
    if freshness.stale:
        return unready(f"stream stale: {freshness.reason()}", database="ok", stream=stream)
    return JsonResponse({"status": "ready", "database": "ok", "stream": stream})


def database_problem() -> str | None:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except DatabaseError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"database unreachable: {reason}"  # unready() logs it
    return None


def stream_summary(freshness: heartbeat.Freshness) -> dict[str, object]:
    row = freshness.heartbeat
    return {
        "worker": row.worker if row else None,
        "source": row.source if row else None,
        "connected": row.connected if row else False,
        "age_seconds": None if freshness.age is None else round(freshness.age, 1),
        "threshold_seconds": freshness.threshold,
    }


def unready(reason: str, **details: object) -> JsonResponse:
    """A 503 with its reason, logged in one WARNING line. Probes come every few seconds: Django's request logger
    would add an ERROR line per probe for an expected answer, so the response is marked as already logged."""
    logger.warning("readyz: not ready: %s", reason)
    response = JsonResponse({"status": "unready", "reason": reason, **details}, status=503)
    response._has_been_logged = True  # type: ignore[attr-defined]  # read by django.utils.log.log_response
    return response


PROBES: dict[str, Callable[[HttpRequest], HttpResponse]] = {
    "/healthz": healthz,
    "/readyz": readyz,
    "/metrics": metrics_view,
}


class ProbeMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        view = PROBES.get(request.path_info.rstrip("/") or "/")
        if view is None or request.method not in ("GET", "HEAD"):
            return self.get_response(request)
        response = view(request)
        response["Cache-Control"] = "no-store"
        return response
