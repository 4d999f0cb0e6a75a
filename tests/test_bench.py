"""The ingest benchmark: its parts (no timing asserted anywhere), and one small run of the whole command on
PostgreSQL with a real broker, the simulator in its own process and a throwaway `<db>_bench` database."""
from __future__ import annotations

import io

import orjson
import pytest
from django.core.management import CommandError, call_command
from django.db import connection

from conversations import bench

pytestmark = pytest.mark.django_db(transaction=True)


def test_the_latency_histogram_reports_quantiles_within_its_bucket_width() -> None:
    histogram = bench.Histogram()
    for n in range(1, 1001):
        histogram.add(n / 1000)  # 1 ms .. 1 s
    assert histogram.quantile(0.5) == pytest.approx(0.5, rel=0.02)
    assert histogram.quantile(0.99) == pytest.approx(0.99, rel=0.02)
    assert bench.Histogram().quantile(0.5) is None


def test_a_burst_is_in_timestamp_order_and_holds_at_least_the_events_asked() -> None:
    payloads = [orjson.loads(data) for data in bench.burst_payloads(2000, seed=5)]
    assert len(payloads) >= 2000
    stamps = [p["timestamp"] for p in payloads]
    assert stamps == sorted(stamps)
    # A large contact center's clock: a batch of events comes from many conversations, not a handful.
    assert len({p["conversationId"] for p in payloads[:500]}) > 200


def test_seeded_history_rows_follow_the_catalogs_and_finish_after_they_start() -> None:
    import random
    from datetime import UTC, datetime

    rng, now = random.Random(1), datetime.now(UTC)
    rows = [bench.seed_row(rng, now) for _ in range(500)]
    columns = {name: index for index, name in enumerate(bench.SEED_COLUMNS)}
    assert {row[columns["agent_id"]] for row in rows} <= set(bench.SEED_AGENTS.ids)
    finished = [row for row in rows if row[columns["state"]] == "wrapped_up"]
    assert finished and all(row[columns["started_at"]] < row[columns["wrapped_up_at"]] for row in finished)


@pytest.mark.skipif("connection.vendor == 'postgresql'")
def test_the_benchmark_refuses_sqlite_with_one_clear_line() -> None:
    with pytest.raises(CommandError, match="PostgreSQL"):
        call_command("bench_ingest", events=[10], stdout=io.StringIO())


def broker_or_skip() -> None:
    from monitor_project.celery import app

    if app.conf.task_always_eager:
        pytest.skip("bench_ingest sends hooks to a broker: set REDIS_URL to run it")


@pytest.mark.postgres
@pytest.mark.skipif("connection.vendor != 'postgresql'")
def test_bench_ingest_runs_every_part_and_prints_the_table() -> None:
    broker_or_skip()
    test_database = connection.settings_dict["NAME"]
    out = io.StringIO()
    call_command("bench_ingest", events=[300, 600], notification_events=150, naive_events=20, rate=40,
                 duration=2, history_conversations=3000, history_queries=2, stdout=out)
    text = out.getvalue()
    for line in ("pipeline (sse, 300)", "pipeline (sse, 600)", "COPY of the same rows", "pipeline (notifications",
                 "naive (ORM save per event)", "pipeline at a steady", "p99", "peak RSS 300 -> 600 events",
                 "pipeline / COPY", "pipeline / naive",
                 "the same rows, indexed", "the storage floor allows at most",
                 "history list over 3,000 seeded conversations", "agent"):
        assert line in text, f"{line!r} missing from:\n{text}"
    assert connection.settings_dict["NAME"] == test_database  # the benchmark database is gone
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_database WHERE datname = %s", [f"{test_database}_bench"])
        assert cursor.fetchone()[0] == 0
