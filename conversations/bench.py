"""The ingest benchmark's parts: the simulator in its own process, the real pipeline in this one, the COPY
ceiling and the naive baseline on the same events, and a bounded latency histogram.

Speed is reported as ratios taken in one run, because the machines this runs on are noisy.
"""
from __future__ import annotations

import bisect
import math
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import requests
from django.conf import settings
from django.db import connection, transaction

from conversations import services
from conversations.events import STATE_OF_KIND
from conversations.genesys.auth import TokenProvider
from conversations.genesys.backoff import Backoff
from conversations.genesys.sse import SSESource
from conversations.models import Conversation, Event
from conversations.normalize import normalize_sse
from conversations.pipeline import Pipeline, normalized

ROOT = Path(__file__).resolve().parent.parent
EVENTS_PER_CONVERSATION = 4  # the scenario averages a little more; the run stops at exactly N events


class Histogram:
    """Latencies in log-spaced buckets (1% wide, 0.1 ms to 10 min): fixed memory whatever the event count."""

    def __init__(self, low: float = 1e-4, high: float = 600.0, growth: float = 1.01) -> None:
        count = int(math.log(high / low) / math.log(growth)) + 2
        self.bounds = [low * growth**i for i in range(count)]
        self.counts = [0] * (count + 1)
        self.total = 0

    def add(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += 1

    def quantile(self, q: float) -> float | None:
        if not self.total:
            return None
        rank, seen = q * self.total, 0
        for index, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                return self.bounds[min(index, len(self.bounds) - 1)]
        return self.bounds[-1]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def simulator_process(*, events: int, rate: float = 0.0, seed: int = 1) -> Iterator[str]:
    """A `genesys_simulator` in its own process, so its event log is not counted in this process's memory."""
    port = free_port()
    conversations = 0 if rate else events // EVENTS_PER_CONVERSATION + 1
    command = [
        sys.executable, "manage.py", "genesys_simulator", "--port", str(port), "--rate", str(rate),
        "--conversations", str(conversations), "--seed", str(seed), "--first-id", "1",
        "--max-log", str(max(events * 2, 1000)), "--keepalive-interval", "1", "--stats-interval", "3600",
    ]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def wait_until_serving(url: str, process: subprocess.Popen, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the simulator exited: {process.stderr.read() if process.stderr else ''}")
        try:
            requests.post(f"{url}/oauth/token", timeout=1)
            return
        except requests.ConnectionError:
            time.sleep(0.2)
    raise RuntimeError("the simulator did not start in time")


@dataclass
class PipelineRun:
    events: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    latency: Histogram = field(default_factory=Histogram)

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


def run_pipeline(
    *, url: str, max_events: int | None, duration: float | None = None, measure_latency: bool = False,
    progress: Callable[[int], None] = lambda n: None,
) -> PipelineRun:
    """The real road: HTTP bytes -> decoder -> normalizer -> batched writes of events, state and checkpoint."""
    run = PipelineRun()
    stop = threading.Event()
    config = replace(settings.GENESYS, api_url=url, login_url=url, client_id="sim-client", client_secret="sim-secret")
    tokens = TokenProvider(login_url=url, client_id=config.client_id, client_secret=config.client_secret)
    source = SSESource(api_url=url, tokens=tokens, backoff=Backoff(base=0.05, cap=1.0), stop=stop)

    def observe(result: services.BatchResult) -> None:
        now = datetime.now(UTC)
        if measure_latency:
            for event in result.new_events:
                run.latency.add((now - event.occurred_at).total_seconds())
        progress(result.size)

    pipeline = Pipeline(source_name="sse", batch_size=settings.INGEST_BATCH_SIZE,
                        max_age=settings.INGEST_BATCH_MAX_AGE, queue_size=settings.INGEST_QUEUE_SIZE,
                        after_commit=[observe])
    if duration is not None:
        threading.Timer(duration, stop.set).start()
    started = time.monotonic()
    pipeline.start_reader(normalized(source.messages(), normalize_sse))
    totals = pipeline.run(stop=stop, max_events=max_events)
    run.seconds = time.monotonic() - started
    stop.set()
    source.close()
    run.events = totals.committed
    run.peak_rss_mb = peak_rss_mb()
    return run


COPY_COLUMNS = "(dedupe_key, sse_id, kind, event_type, conversation_id, occurred_at, received_at, source, payload)"


def copy_ceiling(*, chunk: int = 20_000) -> tuple[int, float]:
    """COPY the events the pipeline stored into a bare table (no index, no constraint): the database's own
    limit for these rows. Rows are read back untimed, in chunks; only the COPY is timed."""
    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE IF EXISTS bench_copy_ceiling")
        cursor.execute(
            "CREATE TABLE bench_copy_ceiling (dedupe_key varchar(64), sse_id varchar(200), kind varchar(16), "
            "event_type varchar(200), conversation_id varchar(64), occurred_at timestamptz, "
            "received_at timestamptz, source varchar(32), payload jsonb)"
        )
    copied, seconds, last_id = 0, 0.0, 0
    while rows := stored_rows(after=last_id, limit=chunk):
        last_id = rows[-1][0]
        started = time.monotonic()
        with connection.cursor() as cursor, cursor.copy(f"COPY bench_copy_ceiling {COPY_COLUMNS} FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row[1:])
        seconds += time.monotonic() - started
        copied += len(rows)
    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE bench_copy_ceiling")
    return copied, seconds


def stored_rows(*, after: int, limit: int) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT id, dedupe_key, sse_id, kind, event_type, conversation_id, occurred_at, received_at, source, "
            "payload::text FROM conversations_event WHERE id > %s ORDER BY id LIMIT %s", [after, limit],
        )
        return cursor.fetchall()


def naive_baseline(*, count: int) -> tuple[int, float]:
    """What a first attempt does: per event, one ORM save and one state update, each event its own transaction."""
    events = list(Event.objects.order_by("id")[:count])
    started = time.monotonic()
    for stored in events:
        with transaction.atomic():
            Event.objects.create(
                dedupe_key=f"naive-{stored.dedupe_key}"[:64], sse_id=stored.sse_id, kind=stored.kind,
                event_type=stored.event_type, conversation_id=f"naive-{stored.conversation_id}",
                occurred_at=stored.occurred_at, received_at=datetime.now(UTC), source="naive",
                payload=stored.payload,
            )
            state = next((s for k, s in STATE_OF_KIND.items() if k.value == stored.kind), "active")
            Conversation.objects.update_or_create(
                conversation_id=f"naive-{stored.conversation_id}",
                defaults={"state": state, "last_event_at": stored.occurred_at},
            )
    return len(events), time.monotonic() - started


@contextmanager
def benchmark_database(*, keep: bool) -> Iterator[str]:
    """A fresh database beside the configured one (<name>_bench), migrated, dropped afterwards."""
    if connection.vendor != "postgresql":
        raise RuntimeError("bench_ingest measures against PostgreSQL: set DATABASE_URL=postgres://...")
    old_name = connection.settings_dict["NAME"]
    connection.settings_dict.setdefault("TEST", {})["NAME"] = f"{old_name}_bench"
    name = connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False)
    try:
        yield name
    finally:
        if not keep:
            connection.creation.destroy_test_db(old_name, verbosity=0)


def cpu_count() -> int:
    return os.cpu_count() or 1
