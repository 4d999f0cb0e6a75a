"""`python manage.py bench_ingest`: the whole ingest pipeline against the database's own limit, in one run."""
from __future__ import annotations

import logging
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from conversations import bench

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = "Benchmark the ingest pipeline against a psycopg COPY ceiling and a naive baseline (PostgreSQL)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--events", type=int, default=100_000, help="events in the burst run")
        parser.add_argument("--naive-events", type=int, default=3_000, help="events for the naive baseline")
        parser.add_argument("--rate", type=float, default=0.0, help="also drive a steady rate (events/s)")
        parser.add_argument("--duration", type=float, default=30.0, help="seconds of the steady-rate run")
        parser.add_argument("--keep", action="store_true", help="keep the benchmark database afterwards")

    def handle(self, *args: Any, **options: Any) -> None:
        logging.getLogger("conversations").setLevel(logging.WARNING)  # the progress bar says it all
        try:
            with bench.benchmark_database(keep=options["keep"]) as name:
                self.stdout.write(f"benchmark database: {name} ({bench.cpu_count()} cores)")
                rows = self.measure(options)
        except RuntimeError as exc:
            raise CommandError(str(exc)) from exc
        self.report(rows)

    def measure(self, options: dict[str, Any]) -> list[tuple[str, int, float, str]]:
        events = options["events"]
        with bench.simulator_process(events=events) as url, tqdm(total=events, desc="pipeline", unit="ev") as bar:
            burst = bench.run_pipeline(url=url, max_events=events, progress=bar.update)
        rows = [("pipeline (SSE burst)", burst.events, burst.seconds,
                 f"peak RSS {burst.peak_rss_mb:.0f} MB")]
        copied, copy_seconds = bench.copy_ceiling()
        rows.append(("COPY ceiling (same events)", copied, copy_seconds, ""))
        naive, naive_seconds = bench.naive_baseline(count=options["naive_events"])
        rows.append(("naive (ORM save per event)", naive, naive_seconds, ""))
        if options["rate"]:
            rows.append(self.steady(options["rate"], options["duration"]))
        return rows

    def steady(self, rate: float, duration: float) -> tuple[str, int, float, str]:
        with bench.simulator_process(events=int(rate * duration), rate=rate) as url, \
                tqdm(desc=f"steady {rate:.0f}/s", unit="ev") as bar:
            run = bench.run_pipeline(url=url, max_events=None, duration=duration, measure_latency=True,
                                     progress=bar.update)
        p50, p99 = run.latency.quantile(0.5), run.latency.quantile(0.99)
        note = f"write->commit p50 {ms(p50)} p99 {ms(p99)}"
        return (f"pipeline at {rate:.0f}/s", run.events, run.seconds, note)

    def report(self, rows: list[tuple[str, int, float, str]]) -> None:
        self.stdout.write(f"\n{'run':<30} {'events':>9} {'seconds':>8} {'events/s':>10}  notes")
        for name, count, seconds, note in rows:
            rate = count / seconds if seconds else 0.0
            self.stdout.write(f"{name:<30} {count:>9} {seconds:>8.2f} {rate:>10.0f}  {note}")
        rates = {name: count / seconds for name, count, seconds, _ in rows if seconds}
        pipeline = rates["pipeline (SSE burst)"]
        self.stdout.write(
            f"\npipeline / COPY  = {pipeline / rates['COPY ceiling (same events)']:.2f}   (target >= 0.30)"
            f"\npipeline / naive = {pipeline / rates['naive (ORM save per event)']:.1f}x  (target >= 10x)"
        )


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"
