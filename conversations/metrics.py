"""Prometheus metrics.

Two kinds, because the stream worker and the web server are separate processes:

* Counters and histograms of the process that ingests (events by kind and source, duplicates, rejects,
  reconnects, batch size, commit latency). The stream worker serves them on METRICS_PORT; the web's /metrics
  shows them too, which matters only when the worker runs inside the web process (the demo).
* Gauges read from the database at scrape time by the web's /metrics, true whichever process did the work:
  stream freshness and lag from the heartbeats, events committed from the checkpoints, hook queue depth and
  recent outcomes, recent rejects. Every query is small: indexed, bounded by a time window or by LIMIT;
  nothing counts the event table.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from django.conf import settings
from django.db.models import Count, Min
from django.http import HttpRequest, HttpResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from conversations.models import HookDelivery, RejectedEvent, StreamCheckpoint, WorkerHeartbeat
from conversations.services import BatchResult

if TYPE_CHECKING:
    from conversations.heartbeat import Freshness

logger = logging.getLogger(__name__)

# -- the ingesting process ------------------------------------------------------------------------------

EVENTS_INGESTED = Counter(
    "monitor_events_ingested", "Events stored (new, not duplicates), by kind and source.", ["kind", "source"]
)
EVENTS_DUPLICATE = Counter("monitor_events_duplicate", "Events received again and skipped.", ["source"])
EVENTS_REJECTED = Counter("monitor_events_rejected", "Input set aside as RejectedEvent.", ["source"])
STREAM_RECONNECTS = Counter(
    "monitor_stream_reconnects", "Stream failures followed by a reconnect.", ["source"]
)
STREAM_CONNECTED = Gauge("monitor_stream_connected", "1 while the stream is connected.", ["source"])
LAST_COMMIT = Gauge(
    "monitor_stream_last_commit_timestamp_seconds", "When the last batch committed.", ["source"]
)
BATCH_SIZE = Histogram(
    "monitor_ingest_batch_size",
    "Items (events and rejects) per committed batch.",
    ["source"],
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000),
)
COMMIT_SECONDS = Histogram(
    "monitor_ingest_commit_seconds",
    "Time to store one batch (one transaction) and send its signals.",
    ["source"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)

_server_lock = threading.Lock()
_server_port: int | None = None


def batch_listener(source_name: str) -> Callable[[BatchResult], None]:
    """The after-commit listener the worker registers for its source."""

    def record_batch(result: BatchResult) -> None:
        for event in result.new_events:
            EVENTS_INGESTED.labels(kind=event.kind.value, source=event.source or source_name).inc()
        if result.duplicates:
            EVENTS_DUPLICATE.labels(source=source_name).inc(result.duplicates)
        if result.rejects:
            EVENTS_REJECTED.labels(source=source_name).inc(len(result.rejects))
        BATCH_SIZE.labels(source=source_name).observe(result.size)
        LAST_COMMIT.labels(source=source_name).set_to_current_time()

    return record_batch


def observe_commit(*, source: str, seconds: float) -> None:
    COMMIT_SECONDS.labels(source=source).observe(seconds)


def record_source(*, source: str, connected: bool, new_reconnects: int) -> None:
    """Called by the heartbeat with what it sampled of the source."""
    STREAM_CONNECTED.labels(source=source).set(1 if connected else 0)
    if new_reconnects > 0:
        STREAM_RECONNECTS.labels(source=source).inc(new_reconnects)


def serve_worker_metrics(port: int | None = None) -> int | None:
    """Serve this process's metrics on METRICS_PORT (0 = off); once per process."""
    global _server_port
    port = settings.METRICS_PORT if port is None else port
    with _server_lock:
        if not port or _server_port is not None:
            return _server_port
        start_http_server(port)
        _server_port = port
    logger.info("metrics: serving this worker's counters on :%s/metrics", port)
    return port


# -- the database, read at scrape time --------------------------------------------------------------------


class DatabaseCollector(Collector):
    def collect(self) -> Iterable[Metric]:
        from conversations import heartbeat  # heartbeat imports this module

        at = heartbeat.now()
        rows = heartbeat.recent_heartbeats()
        yield from stream_metrics(heartbeat.stream_freshness(heartbeats=rows, at=at))
        yield from worker_metrics(rows, at=at)
        yield checkpoint_metric()
        since = at - timedelta(seconds=settings.METRICS_WINDOW_SECONDS)
        yield from hook_metrics(since=since, at=at)
        recent_rejects = RejectedEvent.objects.filter(received_at__gte=since).count()
        yield GaugeMetricFamily(
            "monitor_rejected_events_recent",
            "RejectedEvent rows received in the last METRICS_WINDOW_SECONDS.",
            value=recent_rejects,
        )

    def describe(self) -> Iterable[Metric]:
        return []  # no queries at registration time


def stream_metrics(freshness: Freshness) -> Iterable[Metric]:
    age = freshness.age
    yield GaugeMetricFamily(
        "monitor_stream_freshness_seconds",
        "Seconds since a stream worker was last known alive (connected, or an event arrived); NaN if never.",
        value=float("nan") if age is None else age,
    )
    yield GaugeMetricFamily(
        "monitor_stream_stale", "1 when /readyz reports the stream stale.", value=1 if freshness.stale else 0
    )


def worker_metrics(rows: list[WorkerHeartbeat], *, at: datetime) -> Iterable[Metric]:
    from conversations import heartbeat

    labels = ["worker", "source"]
    beat_age = GaugeMetricFamily(
        "monitor_worker_heartbeat_age_seconds", "Seconds since the worker's last beat.", labels=labels
    )
    lag = GaugeMetricFamily(
        "monitor_worker_stream_lag_seconds",
        "Seconds since the worker last received anything from the stream.",
        labels=labels,
    )
    connected = GaugeMetricFamily(
        "monitor_worker_connected", "1 while the worker's stream is connected.", labels=labels
    )
    reconnects = GaugeMetricFamily(
        "monitor_worker_reconnects", "Reconnects since the worker started.", labels=labels
    )
    committed = GaugeMetricFamily(
        "monitor_worker_events_committed", "Items committed since the worker started.", labels=labels
    )
    window = settings.METRICS_WINDOW_SECONDS
    for row in rows:
        age = heartbeat.seconds_since(row.beat_at, at=at)
        if age is None or age > window:
            continue  # a worker gone for longer than the window is history, not a series
        key = [row.worker, row.source]
        beat_age.add_metric(key, age)
        last = heartbeat.seconds_since(row.last_event_at, at=at)
        lag.add_metric(key, float("nan") if last is None else last)
        connected.add_metric(key, 1 if row.connected else 0)
        reconnects.add_metric(key, row.reconnects)
        committed.add_metric(key, row.events_committed)
    return [beat_age, lag, connected, reconnects, committed]


def checkpoint_metric() -> Metric:
    family = CounterMetricFamily(
        "monitor_checkpoint_events_committed",
        "Items committed per source, all workers, from the checkpoint.",
        labels=["source"],
    )
    for source, committed in StreamCheckpoint.objects.values_list("source", "events_committed"):
        family.add_metric([source], committed)
    return family


def hook_metrics(*, since: datetime, at: datetime) -> Iterable[Metric]:
    # Count and Min together: alone, Min becomes "ORDER BY created_at LIMIT 1", a walk of the whole outbox.
    pending = HookDelivery.objects.filter(status=HookDelivery.Status.PENDING).aggregate(
        depth=Count("id"), oldest=Min("created_at")
    )
    yield GaugeMetricFamily(
        "monitor_hook_queue_depth", "Hook deliveries waiting (status pending).", value=pending["depth"]
    )
    yield GaugeMetricFamily(
        "monitor_hook_running",
        "Hook deliveries running now.",
        value=HookDelivery.objects.filter(status=HookDelivery.Status.RUNNING).count(),
    )
    oldest = pending["oldest"]
    yield GaugeMetricFamily(
        "monitor_hook_oldest_pending_seconds",
        "Age of the oldest pending hook delivery (0 when none).",
        value=0.0 if oldest is None else max((at - oldest).total_seconds(), 0.0),
    )
    outcomes = GaugeMetricFamily(
        "monitor_hook_outcomes_recent",
        "Hook deliveries created in the last METRICS_WINDOW_SECONDS, by status.",
        labels=["status"],
    )
    counts = dict(
        HookDelivery.objects.filter(created_at__gte=since)
        .order_by()
        .values_list("status")
        .annotate(n=Count("id"))
    )
    for status in HookDelivery.Status.values:
        outcomes.add_metric([status], counts.pop(status, 0))
    for status, n in counts.items():  # statuses added later still show
        outcomes.add_metric([status], n)
    yield outcomes


_database_registry = CollectorRegistry(auto_describe=False)
_database_registry.register(DatabaseCollector())


def scrape() -> bytes:
    """This process's counters, then the database gauges, in the Prometheus text format."""
    return generate_latest(REGISTRY) + generate_latest(_database_registry)


def authorized(request: HttpRequest) -> bool:
    token = settings.METRICS_TOKEN
    if not token:
        return True
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def metrics_view(request: HttpRequest) -> HttpResponse:
    """GET /metrics. Open unless METRICS_TOKEN is set; then `Authorization: Bearer <token>`."""
    if not authorized(request):
        response = HttpResponse(
            "metrics need Authorization: Bearer <METRICS_TOKEN>\n", status=401, content_type="text/plain"
        )
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    started = time.monotonic()
    body = scrape()
    logger.debug("metrics scraped in %.1f ms", (time.monotonic() - started) * 1000)
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)
