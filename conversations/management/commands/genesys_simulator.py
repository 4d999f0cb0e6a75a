"""`manage.py genesys_simulator`: run the fake Genesys Cloud (OAuth + SSE stream) for the demo.

Point the monitor at it with GENESYS_API_URL and GENESYS_LOGIN_URL set to the printed URL and the same
client id and secret. Runs until SIGINT or SIGTERM (or `--duration` seconds); logs what it served.
It needs no database.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from argparse import ArgumentParser
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from conversations.genesys.simulator import Simulator, SimulatorServer

logger = logging.getLogger(__name__)

_LINE_ENDINGS = {"lf": "\n", "cr": "\r", "crlf": "\r\n"}
# Generated history ends before now: arrivals average 20 s apart and a lifecycle lasts at most ~18 min.
_HISTORY_SECONDS_PER_CONVERSATION = 30
_HISTORY_SLACK = timedelta(minutes=20)


class Command(BaseCommand):
    help = "Run a fake Genesys Cloud server (OAuth client credentials + SSE conversation events)."
    requires_system_checks: list[str] = []
    requires_migrations_checks = False

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
        parser.add_argument("--rate", type=float, default=2.0, help="live events per second (0: none)")
        parser.add_argument("--conversations", type=int, default=0, help="history to generate at start")
        parser.add_argument("--client-id", default="sim-client")
        parser.add_argument("--client-secret", default="sim-secret")
        parser.add_argument("--token-ttl", type=float, default=3600, help="seconds")
        parser.add_argument("--seed", type=int, default=None)
        parser.add_argument("--heartbeat-interval", type=float, default=30.0, help="Notifications heartbeat, seconds")
        parser.add_argument("--reject-rate", type=float, default=0.0, help="share of inbound offers first rejected")
        parser.add_argument("--max-log", type=int, default=200_000, help="events kept for resuming clients")
        parser.add_argument("--first-id", type=int, default=None,
                            help="first SSE id (default: epoch ms, so ids keep increasing across restarts)")
        parser.add_argument("--keepalive-interval", type=float, default=15.0, help="seconds")
        # Fault knobs, to show the monitor coping with a misbehaving stream.
        parser.add_argument("--duplicate-rate", type=float, default=0.0, help="chance an event is sent twice")
        parser.add_argument("--reorder-window", type=int, default=0, help="events that may swap places")
        parser.add_argument("--malformed-rate", type=float, default=0.0, help="chance of a malformed event")
        parser.add_argument("--chunk-size", type=int, default=None, help="write the stream in N-byte pieces")
        parser.add_argument("--line-ending", choices=sorted(_LINE_ENDINGS), default="lf")
        parser.add_argument("--bom", action="store_true", help="start each stream with a UTF-8 BOM")
        parser.add_argument("--stats-interval", type=float, default=10.0, help="seconds between stats lines")
        parser.add_argument("--duration", type=float, default=None, help="stop after N seconds")

    def handle(self, *args: Any, **options: Any) -> None:
        sim = self._simulator(options)
        try:
            server = SimulatorServer(sim, host=options["host"], port=options["port"])
        except OSError as exc:
            raise CommandError(f"cannot listen on {options['host']}:{options['port']}: {exc}") from exc
        stop = threading.Event()
        previous = _on_signals(stop)
        try:
            with server:
                self.stdout.write(f"Genesys simulator on {server.url} (client id {sim.client_id!r})")
                self._feed(sim, options)
                self._serve_until(stop, sim, options)
                sim.stop_live()  # before the server stops, so the last appends are still served
        finally:
            sim.stop_live()
            _restore_signals(previous)
        logger.info("genesys simulator stopped; %s", _summary(sim))

    def _simulator(self, options: dict[str, Any]) -> Simulator:
        first_id = options["first_id"] if options["first_id"] is not None else int(time.time() * 1000)
        sim = Simulator(
            client_id=options["client_id"],
            client_secret=options["client_secret"],
            token_ttl=options["token_ttl"],
            seed=options["seed"],
            first_id=first_id,
            keepalive_interval=options["keepalive_interval"],
            max_log=options["max_log"],
            reject_rate=options["reject_rate"],
        )
        sim.notifications.heartbeat_interval = options["heartbeat_interval"]
        sim.duplicate_rate = options["duplicate_rate"]
        sim.reorder_window = options["reorder_window"]
        sim.malformed_rate = options["malformed_rate"]
        sim.send_bom = options["bom"]
        try:
            sim.chunk_size = options["chunk_size"]
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        sim.line_ending = _LINE_ENDINGS[options["line_ending"]]
        return sim

    def _feed(self, sim: Simulator, options: dict[str, Any]) -> None:
        count = options["conversations"]
        if count > 0:
            span = timedelta(seconds=count * _HISTORY_SECONDS_PER_CONVERSATION) + _HISTORY_SLACK
            payloads = sim.generate(count, start=datetime.now(UTC) - span)
            logger.info("genesys simulator generated %d conversations (%d events)", count, len(payloads))
        if options["rate"] > 0:
            sim.start_live(options["rate"])
            logger.info("genesys simulator generating about %.1f events/s", options["rate"])

    def _serve_until(self, stop: threading.Event, sim: Simulator, options: dict[str, Any]) -> None:
        deadline = None if options["duration"] is None else time.monotonic() + options["duration"]
        interval = max(options["stats_interval"], 0.05)
        last = ""
        while not stop.is_set():
            remaining = interval if deadline is None else min(interval, deadline - time.monotonic())
            if remaining <= 0 or stop.wait(remaining):
                return
            summary = _summary(sim)
            if summary != last:  # an idle simulator does not fill the log with identical lines
                logger.info("genesys simulator served: %s", summary)
                last = summary


def _summary(sim: Simulator) -> str:
    stats = sim.stats
    return (
        f"tokens={stats['token_requests']} streams={stats['stream_requests']} open={stats['open_streams']} "
        f"events_sent={stats['events_sent']} keepalives={stats['keepalives_sent']} "
        f"appended={stats['appended']} "
        f"sockets={sum(sim.notifications.stats['open_sockets'].values())} "
        f"notifications={sim.notifications.stats['messages_sent']}"
    )


_Handler = Any  # what signal.signal returns: a callable, an int or None


def _on_signals(stop: threading.Event) -> dict[int, _Handler]:
    """SIGINT and SIGTERM set `stop`; returns the previous handlers. Only the main thread may do this."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def request_stop(signum: int, frame: FrameType | None) -> None:
        logger.info("genesys simulator stopping on signal %s", signal.Signals(signum).name)
        stop.set()

    return {signum: signal.signal(signum, request_stop) for signum in (signal.SIGINT, signal.SIGTERM)}


def _restore_signals(previous: dict[int, _Handler]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)
