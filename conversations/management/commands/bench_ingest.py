"""`python manage.py bench_ingest`: the whole ingest pipeline against the database's own limit, in one run.

On a fresh `<db>_bench` database: SSE bursts (one per --events size), a Notifications snapshot burst, the COPY
ceiling of the same rows, a naive baseline, a steady rate (--rate) for latency under load, and the history
list's filtered queries over --history-conversations seeded rows. Prints one table, the ratios and the targets.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from conversations import bench

logger = logging.getLogger(__name__)

TARGET_COPY_SSE = 0.30
TARGET_COPY_NOTIFICATIONS = 0.20
TARGET_NAIVE = 10.0
TARGET_P99 = 0.250
TARGET_RSS_GROWTH = 0.20
TARGET_HISTORY_P95 = 0.200


@dataclass
class Row:
    name: str
    events: int
    seconds: float
    note: str = ""

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


class Command(BaseCommand):
    help = ("Benchmark the ingest pipeline against a psycopg COPY ceiling and a naive baseline, and time the "
            "history list over seeded conversations (PostgreSQL, with a Celery broker).")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--events", type=int, nargs="+", default=[100_000],
                            help="SSE events per burst; several sizes compare peak memory (e.g. 100000 1000000)")
        parser.add_argument("--notification-events", type=int, default=50_000,
                            help="lifecycle changes published as Notifications snapshots (0: skip)")
        parser.add_argument("--naive-events", type=int, default=3_000, help="events for the naive baseline")
        parser.add_argument("--rate", type=float, default=0.0, help="also drive a steady rate (events/s)")
        parser.add_argument("--duration", type=float, default=30.0, help="seconds of the steady-rate run")
        parser.add_argument("--history-conversations", type=int, default=1_000_000,
                            help="conversations to seed before timing the history queries (0: skip)")
        parser.add_argument("--history-queries", type=int, default=40, help="queries per history filter")
        parser.add_argument("--live", action="store_true",
                            help="also publish to the live pages (channel layer on Redis), as a worker does")
        parser.add_argument("--keep", action="store_true", help="keep the benchmark database afterwards")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            bench.require_postgresql()
            broker = bench.require_broker()
            with quiet(), bench.benchmark_database(keep=options["keep"]) as name, bench.bench_queue() as queue:
                self.stdout.write(f"benchmark database: {name}; hooks to {broker} queue {queue}; "
                                  f"{bench.cpu_count()} cores")
                self.measure(options)
        except RuntimeError as exc:
            raise CommandError(str(exc)) from exc

    def measure(self, options: dict[str, Any]) -> None:
        self.live = options["live"]
        # Each burst its own conversations (a seed each): a second burst of the same events would be duplicates.
        runs = [self.burst(size, seed=n + 1) for n, size in enumerate(bench.sizes(options["events"]))]
        if options["notification_events"]:
            runs.append(self.burst(options["notification_events"], source="notifications", seed=100))
        steady = self.steady(options["rate"], options["duration"]) if options["rate"] else None
        # Ceilings and baseline after every pipeline run: reading rows back must not count as pipeline memory.
        with tqdm(total=2 * sum(run.stored for run in runs), desc="COPY ceiling and storage floor",
                  unit="row") as bar:
            ceilings = [bench.copy_ceiling(first_id=run.first_id, last_id=run.last_id, progress=bar.update)
                        for run in runs]
            self.floors = [bench.storage_floor(first_id=run.first_id, last_id=run.last_id, progress=bar.update)
                           for run in runs]
        with tqdm(total=options["naive_events"], desc="naive baseline", unit="ev") as bar:
            naive = bench.naive_baseline(count=options["naive_events"], progress=bar.update)
        self.report(runs, ceilings, naive, steady)
        if options["history_conversations"]:
            self.history(options["history_conversations"], options["history_queries"])

    def burst(self, events: int, *, source: str = "sse", seed: int) -> bench.PipelineRun:
        with bench.simulator(kind=source, events=events, seed=seed) as sim, \
                tqdm(total=events if source == "sse" else None, desc=f"{source} burst", unit="ev") as bar:
            return bench.run_pipeline(sim=sim, source=source, max_events=events if source == "sse" else None,
                                      live=self.live, progress=bar.update)

    def steady(self, rate: float, duration: float) -> bench.PipelineRun:
        with bench.simulator(kind="live", rate=rate) as sim, \
                tqdm(total=int(rate * duration), desc=f"steady {rate:.0f}/s", unit="ev") as bar:
            return bench.run_pipeline(sim=sim, duration=duration, measure_latency=True, live=self.live,
                                      progress=bar.update)

    def report(self, runs: list[bench.PipelineRun], ceilings: list[tuple[int, float]], naive: tuple[int, float],
               steady: bench.PipelineRun | None) -> None:
        rows: list[Row] = []
        for run, (copied, copy_seconds), floor in zip(runs, ceilings, self.floors):
            stored = f"{run.stored:,} stored, {run.events - run.stored:,} duplicates; " if run.stored != run.events else ""
            rows.append(Row(f"pipeline ({run.source}, {run.events:,})", run.events, run.seconds,
                            f"{stored}peak RSS {run.peak_rss_mb:.0f} MB; {run.cpu.describe()}"))
            rows.append(Row("  COPY of the same rows", copied, copy_seconds,
                            f"pipeline / COPY = {ratio(run.rate, copied, copy_seconds):.2f}"))
            rows.append(Row("  the same rows, indexed", copied, floor,
                            "storage floor (the product's indexes; one conversation row per event): "
                            f"pipeline / COPY can reach at most {copy_seconds / floor if floor else 0:.2f}"))
        rows.append(Row("naive (ORM save per event)", *naive))
        if steady is not None:
            p50, p99 = steady.latency.quantile(0.5), steady.latency.quantile(0.99)
            rows.append(Row(f"pipeline at a steady {steady.rate:.0f}/s", steady.events, steady.seconds,
                            f"event -> commit p50 {ms(p50)}, p99 {ms(p99)} (target <= {ms(TARGET_P99)}); "
                            f"{steady.cpu.describe()}"))
        self.table(rows)
        self.targets(runs, ceilings, naive)

    def table(self, rows: list[Row]) -> None:
        self.stdout.write(f"\n{'run':<32} {'events':>9} {'seconds':>8} {'events/s':>9}  notes")
        for row in rows:
            self.stdout.write(f"{row.name:<32} {row.events:>9} {row.seconds:>8.2f} {row.rate:>9.0f}  {row.note}")

    def targets(self, runs: list[bench.PipelineRun], ceilings: list[tuple[int, float]],
                naive: tuple[int, float]) -> None:
        naive_rate = naive[0] / naive[1] if naive[1] else 0.0
        self.stdout.write("")
        for run, (copied, copy_seconds), floor in zip(runs, ceilings, self.floors):
            target = TARGET_COPY_SSE if run.source == "sse" else TARGET_COPY_NOTIFICATIONS
            share = ratio(run.rate, copied, copy_seconds)
            line = (f"{run.source} {run.events:,}: pipeline / COPY = {share:.2f} (target >= {target:.2f}; "
                    f"the storage floor allows at most {copy_seconds / floor if floor else 0:.2f})")
            if run.source == "sse" and naive_rate:
                line += f"; pipeline / naive = {run.rate / naive_rate:.1f}x (target >= {TARGET_NAIVE:.0f}x)"
            self.stdout.write(line)
        sse = [run for run in runs if run.source == "sse"]
        if len(sse) > 1:
            growth = sse[-1].peak_rss_mb / sse[0].peak_rss_mb - 1
            self.stdout.write(f"peak RSS {sse[0].events:,} -> {sse[-1].events:,} events: "
                              f"{sse[0].peak_rss_mb:.0f} -> {sse[-1].peak_rss_mb:.0f} MB ({growth:+.0%}, target "
                              f"within {TARGET_RSS_GROWTH:.0%})")

    def history(self, count: int, queries: int) -> None:
        with tqdm(total=count, desc="seeding conversations", unit="row") as bar:
            seconds = bench.seed_conversations(count, progress=bar.update)
        self.stdout.write(f"\nhistory list over {count:,} seeded conversations (seeded by COPY in {seconds:.0f} s), "
                          f"{queries} queries per filter (first pages and deep pages):")
        self.stdout.write(f"{'filter':<22} {'p50':>8} {'p95':>8}  target p95 <= {ms(TARGET_HISTORY_P95)}")
        for timing in bench.time_history(queries=queries):
            flag = "" if timing.p95 <= TARGET_HISTORY_P95 else "  MISSED"
            self.stdout.write(f"{timing.name:<22} {ms(timing.p50):>8} {ms(timing.p95):>8}{flag}")


@contextmanager
def quiet() -> Iterator[None]:
    """The progress bars say it all; and DEBUG off, as in production: with it on, Django keeps every SQL statement
    of the run in memory. Both put back afterwards."""
    log = logging.getLogger("conversations")
    level, debug = log.level, settings.DEBUG
    log.setLevel(logging.WARNING)
    settings.DEBUG = False
    try:
        yield
    finally:
        log.setLevel(level)
        settings.DEBUG = debug


def ratio(rate: float, copied: int, copy_seconds: float) -> float:
    ceiling = copied / copy_seconds if copy_seconds else 0.0
    return rate / ceiling if ceiling else 0.0


def ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.1f} ms" if seconds < 0.01 else f"{seconds * 1000:.0f} ms"
