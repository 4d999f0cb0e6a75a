"""The ingest benchmark's parts: the simulator in its own process, the real pipeline in this one, the COPY
ceiling and the naive baseline on the same events, CPU and memory accounting, and the history queries over a
million seeded conversations.

Speed is reported as ratios taken in one run, because the machines this runs on are noisy; the CPU each
process used is reported beside them, so a reader can see what limited a run.
"""
from __future__ import annotations

import bisect
import heapq
import itertools
import math
import os
import random
import select
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from django.db import connection, transaction

from conversations import bulk, metrics, outbox, realtime, selectors, services
from conversations.events import STATE_OF_KIND
from conversations.genesys.auth import TokenProvider
from conversations.genesys.backoff import Backoff
from conversations.genesys.notifications import NotificationsApi, NotificationsConfig, NotificationsSource
from conversations.genesys.scenario import DEFAULT_START, Scenario, iso
from conversations.genesys.sse import SSESource
from conversations.leadership import Lease
from conversations.models import Conversation, Event
from conversations.normalize import normalize_sse
from conversations.pipeline import Envelope, Pipeline, normalized

ROOT = Path(__file__).resolve().parent.parent
CLIENT_ID, CLIENT_SECRET = "sim-client", "sim-secret"
# The burst's synthetic clock: conversations arrive so that events come at about this rate, like a large contact
# center at its peak, so a batch holds events of about as many conversations as it would in production.
SYNTHETIC_EVENTS_PER_SECOND = 1000.0
EVENTS_PER_CONVERSATION = 4.3  # what the scenario averages
QUIET_SECONDS = 10.0  # a run whose last commit is this old, with nothing more coming, is over


# -- measuring ------------------------------------------------------------------------------------------------


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


def reset_peak_rss() -> None:
    """Start a new high-water mark of this process's resident memory (Linux: `5` into clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux, or not allowed: the peak then covers the whole process's life


def peak_rss_mb() -> float:
    """The resident-memory high-water mark since the last reset_peak_rss(), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu(pid: int) -> float:
    """User + system CPU seconds a process has used (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_cpu() -> float:
    """Busy CPU seconds of the whole machine, all cores (everything but idle and iowait)."""
    try:
        ticks = [int(t) for t in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / CLOCK_TICKS


def postgres_pids(database: str) -> dict[str, list[int]]:
    """PostgreSQL processes on this machine: the backends serving `database`, and the server's own writers."""
    found: dict[str, list[int]] = {"backend": [], "background": []}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if not title.startswith("postgres:"):
            continue
        if f" {database} " in title:
            found["backend"].append(int(entry.name))
        elif any(part in title for part in ("walwriter", "checkpointer", "background writer", "autovacuum")):
            found["background"].append(int(entry.name))
    return found


@dataclass
class CpuSplit:
    """Who used the two cores during a run: cores busy on average (1.0 = one core all the time)."""

    wall: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)

    def cores(self, name: str) -> float:
        return self.seconds.get(name, 0.0) / self.wall if self.wall else 0.0

    def describe(self) -> str:
        parts = [f"{name} {self.cores(name):.2f}" for name in ("pipeline", "postgres", "pg-bg", "simulator")]
        return f"cores: {', '.join(parts)}; machine {self.cores('machine'):.2f} of {cpu_count()}"


class CpuMeter:
    """CPU seconds of this process, our PostgreSQL backends and writers, the simulator and the machine.

    Sampled twice a second, so a process that ends during the run (a connection closed when its thread ends)
    counts up to its last sample; one that starts during the run counts from zero."""

    INTERVAL = 0.5

    def __init__(self, *, simulator_pid: int | None) -> None:
        self.simulator_pid = simulator_pid
        self.database = connection.settings_dict["NAME"]
        self.started = time.monotonic()
        self.start = self.sample()
        self.latest = {name: dict(readings) for name, readings in self.start.items()}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._sample_loop, name="bench-cpu", daemon=True)
        self.thread.start()

    def sample(self) -> dict[str, dict[int, float]]:
        times = os.times()
        pg = postgres_pids(self.database)
        return {
            "pipeline": {os.getpid(): times.user + times.system},
            "postgres": {pid: process_cpu(pid) for pid in pg["backend"]},
            "pg-bg": {pid: process_cpu(pid) for pid in pg["background"]},
            "simulator": {self.simulator_pid: process_cpu(self.simulator_pid)} if self.simulator_pid else {},
            "machine": {0: machine_cpu()},
        }

    def _merge(self, readings: dict[str, dict[int, float]]) -> None:
        for name, found in readings.items():
            for pid, seconds in found.items():
                if seconds:  # 0: gone before it could be read
                    self.latest[name][pid] = seconds

    def _sample_loop(self) -> None:
        while not self.stopping.wait(self.INTERVAL):
            self._merge(self.sample())

    def stop(self) -> CpuSplit:
        self.stopping.set()
        self.thread.join()
        self._merge(self.sample())
        used = {
            name: sum(seconds - self.start[name].get(pid, 0.0) for pid, seconds in readings.items())
            for name, readings in self.latest.items()
        }
        return CpuSplit(wall=time.monotonic() - self.started, seconds=used)


def cpu_count() -> int:
    return os.cpu_count() or 1


# -- generating events (in the simulator's process) ----------------------------------------------------------


def burst_payloads(count: int, *, seed: int) -> Iterator[bytes]:
    """At least `count` SSE lifecycle payloads (JSON), in timestamp order, of conversations arriving so that the
    synthetic clock runs at SYNTHETIC_EVENTS_PER_SECOND. Pending payloads are held as bytes, not dicts."""
    scenario = Scenario(seed)
    arrival, made = DEFAULT_START, 0
    pending: list[tuple[str, int, bytes]] = []
    mean_gap = EVENTS_PER_CONVERSATION / SYNTHETIC_EVENTS_PER_SECOND
    while made < count:
        for payload in scenario.lifecycle(start=arrival):
            heapq.heappush(pending, (payload["timestamp"], made, orjson.dumps(payload)))
            made += 1
        arrival += timedelta(seconds=scenario.rng.expovariate(1 / mean_gap))
        horizon = iso(arrival)  # no later conversation has an event before its own arrival
        while pending and pending[0][0] < horizon:
            yield heapq.heappop(pending)[2]
    while pending:
        yield heapq.heappop(pending)[2]


SIMULATOR_MAIN = (
    "import django, sys; django.setup(); from conversations.bench import serve_simulator; "
    "serve_simulator(kind=sys.argv[1], events=int(sys.argv[2]), rate=float(sys.argv[3]), seed=int(sys.argv[4]))"
)


def serve_simulator(*, kind: str, events: int, rate: float, seed: int) -> None:
    """The simulator's process. Says `ready <url>` once it can serve, waits for `go` on stdin, then:
    `sse` serves a log generated in advance; `live` generates `rate` events/s from now on; `notifications`
    publishes its pre-generated lifecycles as snapshots to the subscribed sockets and says `published <n>`.
    It exits when stdin closes (the benchmark ended, or died)."""
    from conversations.genesys.simulator import Simulator, SimulatorServer

    sim = Simulator(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, seed=seed, first_id=1,
                    max_log=max(events * 2, 10_000), keepalive_interval=1.0)
    sim.notifications.heartbeat_interval = 30.0
    payloads = list(burst_payloads(events, seed=seed)) if kind in ("sse", "notifications") else []
    if kind == "sse":
        for data in payloads:
            sim.append_data(data)
        payloads.clear()
    with SimulatorServer(sim) as server:
        say(f"ready {server.url}")
        if sys.stdin.readline().strip() != "go":
            return
        if kind == "live":
            sim.start_live(rate)
        elif kind == "notifications":
            published = sum(sim.notifications.publish(orjson.loads(data)) for data in payloads)
            say(f"published {published}")
        sys.stdin.read()  # until the benchmark closes our stdin
        sim.stop_live()


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class SimulatorProcess:
    """The simulator in its own process, so its CPU and memory are not counted as the pipeline's."""

    def __init__(self, *, kind: str, events: int = 0, rate: float = 0.0, seed: int = 1) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", SIMULATOR_MAIN, kind, str(events), str(rate), str(seed)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        self.url = self.expect("ready", timeout=max(120.0, events / 2000))

    @property
    def pid(self) -> int:
        return self.process.pid

    def go(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def expect(self, word: str, *, timeout: float) -> str:
        """Wait for the line `<word> <value>` on the simulator's stdout; return the value."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.process.stdout], [], [], 0.5)
            if ready:
                line = self.process.stdout.readline()
                if not line:
                    break
                if line.startswith(word + " "):
                    return line.split(" ", 1)[1].strip()
            elif self.process.poll() is not None:
                break
        raise RuntimeError(f"the simulator did not say {word!r} (exit code {self.process.poll()})")

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


@contextmanager
def simulator(*, kind: str, events: int = 0, rate: float = 0.0, seed: int = 1) -> Iterator[SimulatorProcess]:
    process = SimulatorProcess(kind=kind, events=events, rate=rate, seed=seed)
    try:
        yield process
    finally:
        process.close()


# -- the pipeline ---------------------------------------------------------------------------------------------


@dataclass
class PipelineRun:
    source: str
    events: int = 0  # committed: stored, duplicates and rejects
    stored: int = 0
    seconds: float = 0.0
    first_id: int = 0  # the Event ids this run stored, for the COPY ceiling of the same rows
    last_id: int = 0
    peak_rss_mb: float = 0.0
    batches: int = 0
    latency: Histogram = field(default_factory=Histogram)
    cpu: CpuSplit = field(default_factory=CpuSplit)

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


def sse_envelopes(url: str, stop: threading.Event) -> tuple[Any, Any]:
    tokens = TokenProvider(login_url=url, client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
    source = SSESource(api_url=url, tokens=tokens, backoff=Backoff(base=0.05, cap=1.0), stop=stop)
    return source, normalized(source.messages(), normalize_sse)


def notification_envelopes(url: str, stop: threading.Event) -> tuple[Any, Any]:
    """Snapshots only: detail-event topics are not followed (a burst of thousands of conversations has no room
    for eight topics each; snapshots carry every derived field)."""
    tokens = TokenProvider(login_url=url, client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
    source = NotificationsSource(api=NotificationsApi(api_url=url, tokens=tokens),
                                 config=NotificationsConfig(detail_types=()),
                                 backoff=lambda: Backoff(base=0.05, cap=1.0), stop=stop)
    return source, (Envelope(item, None) for item in source.events())


ENVELOPES = {"sse": sse_envelopes, "notifications": notification_envelopes}


class Observer:
    """The benchmark's after-commit listener: progress, latency from the event's time to its commit, and
    the end of the run (a target count, or a quiet stream once the simulator said how much it sent)."""

    def __init__(self, run: PipelineRun, *, measure_latency: bool, progress: Callable[[int], None]) -> None:
        self.run = run
        self.measure_latency = measure_latency
        self.progress = progress
        self.target: int | None = None
        self.committed = 0
        self.last_commit = time.monotonic()

    def __call__(self, result: services.BatchResult) -> None:
        now = datetime.now(UTC)
        if self.measure_latency:
            for event in result.new_events:
                self.run.latency.add((now - event.occurred_at).total_seconds())
        self.committed += result.size
        self.last_commit = time.monotonic()
        self.progress(result.size)

    def done(self) -> bool:
        return self.target is not None and (
            self.committed >= self.target or time.monotonic() - self.last_commit > QUIET_SECONDS)


def run_pipeline(
    *, sim: SimulatorProcess, source: str = "sse", max_events: int | None = None, duration: float | None = None,
    measure_latency: bool = False, live: bool = False, progress: Callable[[int], None] = lambda n: None,
) -> PipelineRun:
    """The real road, wired as `stream_events` wires it (the lease fence; after commit: metrics, hook ids to the
    broker, and with `live` the live pages' broadcast): HTTP or WebSocket bytes -> decoder -> normalizer ->
    batched writes of events, derived state, hook deliveries and checkpoint."""
    run = PipelineRun(source=source, first_id=last_event_id() + 1)
    stop = threading.Event()
    observer = Observer(run, measure_latency=measure_latency, progress=progress)
    lease = Lease(source=source, ttl=3600)
    lease.try_acquire()
    pipeline = Pipeline.from_settings(source, after_commit=[*listeners(source, live=live), observer],
                                      guard=lease.fence)
    reader, envelopes = ENVELOPES[source](sim.url, stop)
    reset_peak_rss()
    with autovacuum_stand_in():
        meter = CpuMeter(simulator_pid=sim.pid)
        pipeline.start_reader(envelopes)
        if source == "notifications":
            start_notifications(reader, sim, observer)
        else:
            sim.go()
        stopper = watch(stop, observer=observer, duration=duration)
        totals = pipeline.run(stop=stop, max_events=max_events)
        run.cpu = meter.stop()
    run.seconds = run.cpu.wall
    run.peak_rss_mb = peak_rss_mb()
    stop.set()
    stopper.join()
    reader.close()
    lease.release()
    run.events, run.stored, run.batches = totals.committed, totals.new_events, totals.batches
    run.last_id = last_event_id()
    return run


def listeners(source: str, *, live: bool) -> list[Callable[[services.BatchResult], None]]:
    """The worker's after-commit listeners (worker.after_commit_listeners), the live broadcast only if asked."""
    found = [metrics.batch_listener(source), *outbox.after_commit_listeners()]
    publisher = realtime.after_commit_listener() if live else None
    return [*found, publisher] if publisher is not None else found


def start_notifications(source: NotificationsSource, sim: SimulatorProcess, observer: Observer) -> None:
    """Publishing starts once every channel is subscribed and its socket open; the simulator then says how
    many messages it sent, which is when the run may end."""
    if not source.wait_ready(60):
        raise RuntimeError("the Notifications source did not subscribe within 60 s")
    sim.go()

    def learn_target() -> None:
        observer.target = int(sim.expect("published", timeout=3600))

    threading.Thread(target=learn_target, name="bench-target", daemon=True).start()


def watch(stop: threading.Event, *, observer: Observer, duration: float | None) -> threading.Thread:
    """Sets `stop` after `duration` seconds, or once the observer says the run is done."""
    deadline = None if duration is None else time.monotonic() + duration

    def loop() -> None:
        while not stop.wait(0.05):
            if observer.done() or (deadline is not None and time.monotonic() >= deadline):
                stop.set()

    thread = threading.Thread(target=loop, name="bench-stopper", daemon=True)
    thread.start()
    return thread


VACUUMED_TABLES = ("conversations_conversation", "conversations_participant", "conversations_hookdelivery",
                   "conversations_event", "conversations_streamcheckpoint", "conversations_streamlease")


@contextmanager
def autovacuum_stand_in(*, every: float = 15.0) -> Iterator[None]:
    """On a server with autovacuum off (a test box), do its work: VACUUM (ANALYZE) the tables the pipeline
    rewrites, from a connection of its own, so plans and bloat look like production's. Its CPU is counted as
    the database's."""
    with connection.cursor() as cursor:
        cursor.execute("SHOW autovacuum")
        enabled = cursor.fetchone()[0] == "on"
    if enabled:
        yield
        return
    stop, connected = threading.Event(), threading.Event()

    def loop() -> None:
        try:
            connection.ensure_connection()  # now, so the CPU meter finds its backend
            connected.set()
            while not stop.wait(every):
                with connection.cursor() as cursor:
                    cursor.execute(f"VACUUM (ANALYZE) {', '.join(VACUUMED_TABLES)}")
        finally:
            connected.set()
            connection.close()

    thread = threading.Thread(target=loop, name="bench-vacuum", daemon=True)
    thread.start()
    connected.wait()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def last_event_id() -> int:
    return Event.objects.order_by("-id").values_list("id", flat=True).first() or 0


# -- the ceiling and the baseline -----------------------------------------------------------------------------

COPY_COLUMNS = "dedupe_key, sse_id, kind, event_type, conversation_id, occurred_at, received_at, source, payload"


def timed_writes(write: Callable[[Any, list[tuple]], None], *, first_id: int, last_id: int, chunk: int,
                 progress: Callable[[int], None]) -> tuple[int, float]:
    """Read back the events a run stored, in chunks (untimed), and time `write(cursor, rows)` of each chunk, one
    transaction a chunk. Returns the rows written and the seconds the writes took."""
    written, seconds, after = 0, 0.0, first_id - 1
    while rows := stored_rows(after=after, until=last_id, limit=chunk):
        after = rows[-1][0]
        started = time.monotonic()
        with transaction.atomic(), connection.cursor() as cursor:
            write(cursor, rows)
        seconds += time.monotonic() - started
        written += len(rows)
        progress(len(rows))
    return written, seconds


def copy_ceiling(*, first_id: int, last_id: int, chunk: int = 20_000,
                 progress: Callable[[int], None] = lambda n: None) -> tuple[int, float]:
    """COPY the events a run stored into a bare table (no index, no constraint): the database's own limit for
    these rows, through the same driver."""
    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE IF EXISTS bench_copy_ceiling")
        cursor.execute(
            "CREATE TABLE bench_copy_ceiling (dedupe_key varchar(64), sse_id varchar(200), kind varchar(16), "
            "event_type varchar(200), conversation_id varchar(64), occurred_at timestamptz, "
            "received_at timestamptz, source varchar(32), payload jsonb)"
        )
    result = timed_writes(lambda cursor, rows: bulk.copy_rows(cursor, "bench_copy_ceiling", COPY_COLUMNS,
                                                               (row[1:] for row in rows)),
                          first_id=first_id, last_id=last_id, chunk=chunk, progress=progress)
    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE bench_copy_ceiling")
    return result


def storage_floor(*, first_id: int, last_id: int, chunk: int = 20_000,
                  progress: Callable[[int], None] = lambda n: None) -> float:
    """What only storing these rows costs with the indexes the product reads by: the same COPY into a table with
    the Event table's indexes, plus one conversation row per event (each event changes its conversation) into a
    table with the Conversation table's indexes, the latter INSERT ... SELECT inside the server (cheaper than any
    client's write). No pipeline can beat this, so COPY-seconds / floor-seconds bounds pipeline / COPY."""
    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE IF EXISTS bench_floor_event, bench_floor_conversation")
        cursor.execute("CREATE TABLE bench_floor_event (LIKE conversations_event INCLUDING ALL)")
        cursor.execute("CREATE TABLE bench_floor_conversation (LIKE conversations_conversation INCLUDING ALL)")
    columns = [c for c in SEED_COLUMNS if c != "conversation_id"]

    def write(cursor: Any, rows: list[tuple]) -> None:
        bulk.copy_rows(cursor, "bench_floor_event", COPY_COLUMNS, (row[1:] for row in rows))
        cursor.execute(
            f"INSERT INTO bench_floor_conversation (conversation_id, {', '.join(columns)}) "
            f"SELECT event.dedupe_key, {', '.join(f'conversation.{c}' for c in columns)} "
            "FROM conversations_event AS event JOIN conversations_conversation AS conversation "
            "ON conversation.conversation_id = event.conversation_id WHERE event.id BETWEEN %s AND %s",
            [rows[0][0], rows[-1][0]],
        )

    _, seconds = timed_writes(write, first_id=first_id, last_id=last_id, chunk=chunk, progress=progress)
    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE bench_floor_event, bench_floor_conversation")
    return seconds


def stored_rows(*, after: int, until: int, limit: int) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT id, dedupe_key, sse_id, kind, event_type, conversation_id, occurred_at, received_at, source, "
            "payload::text FROM conversations_event WHERE id > %s AND id <= %s ORDER BY id LIMIT %s",
            [after, until, limit],
        )
        return cursor.fetchall()


def naive_baseline(*, count: int, progress: Callable[[int], None] = lambda n: None) -> tuple[int, float]:
    """What a first attempt does: per event, one ORM save and one state update, each event its own transaction."""
    events = list(Event.objects.filter(source="sse").order_by("id")[:count])
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
        progress(1)
    return len(events), time.monotonic() - started


# -- the history list over a million conversations ------------------------------------------------------------

SEED_COLUMNS = ("conversation_id", "state", "media_type", "direction", "queue_id", "queue_name", "agent_id",
                "agent_name", "ani", "dnis", "wrapup_code", "wrapup_name", "wrapup_notes", "started_at",
                "ended_at", "wrapped_up_at", "last_event_at", "field_versions", "created_at", "updated_at")
HISTORY_DAYS = 90


@dataclass(frozen=True)
class Catalog:
    """A large contact center's values, each used with a Zipf weight: a few are common, most are rare (the
    hard case for a filtered, newest-first page)."""

    ids: tuple[str, ...]
    names: tuple[str, ...]
    cumulative: tuple[float, ...]  # of the weights 1, 1/2, 1/3, ...

    @classmethod
    def make(cls, kind: str, count: int) -> Catalog:
        ids = tuple(str(uuid.uuid5(uuid.NAMESPACE_URL, f"bench:{kind}:{n}")) for n in range(count))
        names = tuple(f"{kind} {n}" for n in range(count))
        return cls(ids, names, tuple(itertools.accumulate(1 / (n + 1) for n in range(count))))

    def pick(self, rng: random.Random) -> int:
        return rng.choices(range(len(self.ids)), cum_weights=self.cumulative)[0]


SEED_QUEUES, SEED_AGENTS, SEED_WRAPUPS = Catalog.make("queue", 60), Catalog.make("agent", 600), \
    Catalog.make("wrapup", 40)


def seed_conversations(count: int, *, seed: int = 7, progress: Callable[[int], None] = lambda n: None) -> float:
    """COPY `count` finished and live conversations spread over HISTORY_DAYS into the conversation table;
    returns the seconds it took (ANALYZE included)."""
    rng = random.Random(seed)
    now = datetime.now(UTC)
    started = time.monotonic()
    columns = ", ".join(SEED_COLUMNS)
    with transaction.atomic(), connection.cursor() as cursor, \
            cursor.copy(f"COPY conversations_conversation ({columns}) FROM STDIN") as copy:
        for n in range(count):
            copy.write_row(seed_row(rng, now))
            if n % 10_000 == 9_999:
                progress(10_000)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE conversations_conversation")
    return time.monotonic() - started


def seed_row(rng: random.Random, now: datetime) -> tuple:
    start = now - timedelta(seconds=rng.random() * HISTORY_DAYS * 86400)
    state = rng.choices(("wrapped_up", "ended", "active"), weights=(96, 3, 1))[0]
    queue, agent, wrapup = SEED_QUEUES.pick(rng), SEED_AGENTS.pick(rng), SEED_WRAPUPS.pick(rng)
    ended = start + timedelta(seconds=rng.uniform(30, 1200)) if state != "active" else None
    wrapped = ended + timedelta(seconds=rng.uniform(5, 90)) if state == "wrapped_up" and ended else None
    media = rng.choices(("voice", "chat", "callback", "email"), weights=(70, 20, 8, 2))[0]
    direction = rng.choices(("inbound", "outbound"), weights=(85, 15))[0]
    last = wrapped or ended or start
    return (str(uuid.UUID(int=rng.getrandbits(128), version=4)), state, media, direction,
            SEED_QUEUES.ids[queue], SEED_QUEUES.names[queue], SEED_AGENTS.ids[agent], SEED_AGENTS.names[agent],
            f"tel:+3531{rng.randrange(10**7):07d}", f"tel:+3531888{queue:04d}",
            SEED_WRAPUPS.ids[wrapup] if wrapped else "", SEED_WRAPUPS.names[wrapup] if wrapped else "", "",
            start, ended, wrapped, last, "{}", start, last)


@dataclass
class QueryTiming:
    name: str
    samples: list[float] = field(default_factory=list)

    def quantile(self, q: float) -> float:
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def p50(self) -> float:
        return statistics.median(self.samples)

    @property
    def p95(self) -> float:
        return self.quantile(0.95)


def history_filters(rng: random.Random) -> dict[str, Callable[[], dict[str, str]]]:
    """Each filter of the history page alone, with values picked at random for each query."""
    now = datetime.now(UTC)
    some = Conversation.objects.order_by("?").values_list("conversation_id", "ani")[:50]
    ids = list(some)

    def day() -> str:
        return (now - timedelta(days=rng.randrange(HISTORY_DAYS))).date().isoformat()

    return {
        "no filter": lambda: {},
        "state": lambda: {"state": rng.choice(["active", "ended", "wrapped_up"])},
        "media": lambda: {"media": rng.choice(["voice", "chat", "callback", "email"])},
        "direction": lambda: {"direction": rng.choice(["inbound", "outbound"])},
        "queue": lambda: {"queue": rng.choice(SEED_QUEUES.ids)},
        "agent": lambda: {"agent": rng.choice(SEED_AGENTS.ids)},
        "wrapup": lambda: {"wrapup": rng.choice(SEED_WRAPUPS.ids)},
        "q (conversation id)": lambda: {"q": rng.choice(ids)[0]},
        "q (ANI)": lambda: {"q": rng.choice(ids)[1]},
        "from (a day)": lambda: {"from": day()},
        "to (a day)": lambda: {"to": day()},
    }


def time_history(*, queries: int = 40, seed: int = 3) -> list[QueryTiming]:
    """Each filter alone: the first page, then the page after a random cursor (deep in the results), the way the
    history page and the API call the selectors. p95 over `queries` queries per filter."""
    rng = random.Random(seed)
    timings = []
    for name, params in history_filters(rng).items():
        timing = QueryTiming(name)
        for n in range(queries):
            filters = selectors.parse_filters(params())
            qs = selectors.conversations_matching(filters)
            cursor = None if n % 2 == 0 else deep_cursor(qs, rng)
            started = time.monotonic()
            selectors.conversation_page(qs, cursor=cursor, limit=selectors.DEFAULT_PAGE_SIZE)
            timing.samples.append(time.monotonic() - started)
        timings.append(timing)
    return timings


def deep_cursor(qs: Any, rng: random.Random) -> str | None:
    """A cursor somewhere in the first half of the history (untimed): what a user paging far back sends."""
    moment = datetime.now(UTC) - timedelta(days=rng.uniform(0, HISTORY_DAYS / 2))
    row = qs.filter(started_at__lte=moment).order_by("-started_at", "-id").values_list("started_at", "id").first()
    return selectors.Cursor(*row).encode() if row else None


# -- the database ---------------------------------------------------------------------------------------------


def require_postgresql() -> None:
    if connection.vendor != "postgresql":
        raise RuntimeError("bench_ingest measures against PostgreSQL: set DATABASE_URL=postgres://...")


@contextmanager
def benchmark_database(*, keep: bool) -> Iterator[str]:
    """A fresh database beside the configured one (<name>_bench), migrated, dropped afterwards (or kept, and
    the connection pointed back at the configured one either way)."""
    require_postgresql()
    test_settings = connection.settings_dict.setdefault("TEST", {})
    old_name, old_test_name = connection.settings_dict["NAME"], test_settings.get("NAME")
    test_settings["NAME"] = f"{old_name}_bench"
    name = connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False)
    try:
        yield name
    finally:
        if keep:
            connection.close()
            connection.settings_dict["NAME"] = old_name
        else:
            connection.creation.destroy_test_db(old_name, verbosity=0)
        test_settings["NAME"] = old_test_name


def require_broker() -> str:
    """Hooks must go to a real broker, as in production: in-process (eager) hooks would be measured as ingest."""
    from monitor_project.celery import app, redacted

    if app.conf.task_always_eager:
        raise RuntimeError("bench_ingest needs a Celery broker (set REDIS_URL): hooks run on workers, not in the "
                           "ingest process")
    return redacted(app.conf.broker_url)


@contextmanager
def bench_queue() -> Iterator[str]:
    """The run's hook tasks go to a queue of their own, deleted afterwards: no Celery worker of a real
    deployment on the same broker picks up ids that only exist in the benchmark database."""
    from monitor_project.celery import app

    queue = f"bench-ingest-{os.getpid()}"
    saved = app.conf.task_routes
    route(app, {"conversations.*": {"queue": queue}})
    try:
        yield queue
    finally:
        route(app, saved)
        with app.connection_for_write() as conn:
            channel = conn.default_channel
            channel.queue_purge(queue)
            channel.queue_delete(queue)
            # kombu's Redis transport keeps the queue's bindings in keys of their own.
            channel.client.delete(f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")


def route(app: Any, routes: Any) -> None:
    app.conf.task_routes = routes
    app.amqp.flush_routes()
    app.amqp.__dict__.pop("router", None)  # Celery caches the router it built from the previous routes


def sizes(values: Sequence[int]) -> list[int]:
    return sorted({max(1, v) for v in values})
