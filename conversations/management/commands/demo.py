"""`python manage.py demo`: the whole product in ONE process, for trying it out.

The Genesys simulator (live lifecycles at --rate events/s), the ingest worker (a thread, reading the simulator's
SSE stream over loopback HTTP, exactly as it reads Genesys) and the ASGI server (daphne: admin, live page,
history, API, WebSockets). One process because the in-memory channel layer reaches only its own process: the
live publisher runs on the web server's event loop. With REDIS_URL set, production runs these as separate
processes instead (`stream_events`, `daphne monitor_project.asgi:application`).

Migrates the database, creates the demo user (demo / demo, demo settings only), prints where to look, and
stops cleanly on Ctrl-C or SIGTERM.
"""
from __future__ import annotations

import logging
import threading
import time
from argparse import ArgumentParser
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import connections

from conversations import realtime
from conversations.genesys.simulator import Simulator, SimulatorServer
from conversations.worker import Worker

logger = logging.getLogger("conversations.demo")

HISTORY_SPACING = timedelta(seconds=30)  # generated history: one conversation every 30 s, ending before now
WORKER_STOP_TIMEOUT = 10.0


class Command(BaseCommand):
    help = "Run the simulator, the ingest worker and the web server (live page) in one process."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000, help="web server port")
        parser.add_argument("--sim-port", type=int, default=0, help="simulator port (0: any free port)")
        parser.add_argument("--rate", type=float, default=3.0, help="live events per second from the simulator")
        parser.add_argument("--history", type=int, default=40, help="past conversations to generate first")
        parser.add_argument("--log-file", default=".demo/demo.log",
                            help="INFO logs go here; the terminal shows warnings only ('-': all to the terminal)")

    def handle(self, *args: Any, **options: Any) -> None:
        # Before anything imports Twisted's reactor: daphne installs the asyncio one on this loop.
        from daphne.server import Server, twisted_loop

        if options["rate"] <= 0:
            raise CommandError("--rate must be positive")
        call_command("migrate", interactive=False, verbosity=0)
        call_command("demo_user", stdout=self.stdout)
        application = _asgi_application()  # sets Django up again, logging included: before _log_to
        self._log_to(options["log_file"])
        connections.close_all()  # the worker and the web server open their own
        sim = Simulator(first_id=int(time.time() * 1000))  # ids keep increasing across demo restarts
        try:
            sim_server = SimulatorServer(sim, port=options["sim_port"])
        except OSError as exc:
            raise CommandError(f"cannot start the simulator on port {options['sim_port']}: {exc}") from exc
        with sim_server:
            settings.GENESYS = replace(settings.GENESYS, client_id=sim.client_id, client_secret=sim.client_secret,
                                       api_url=sim_server.url, login_url=sim_server.url)
            realtime.install_publisher(loop=twisted_loop)
            stop = threading.Event()
            worker = threading.Thread(target=self._ingest, args=(stop,), name="ingest-worker", daemon=True)
            worker.start()
            # The Notifications API only delivers to a subscribed socket (as on a real org): wait for it.
            if settings.GENESYS.event_source == "notifications":
                _wait_for_subscription(sim)
            self._feed(sim, history=options["history"], rate=options["rate"])
            try:
                self._serve(Server, application, options, sim_server.url)
            finally:
                self._stop(stop, worker, sim)

    def _feed(self, sim: Simulator, *, history: int, rate: float) -> None:
        if history > 0:
            start = datetime.now(UTC) - history * HISTORY_SPACING - timedelta(minutes=20)
            sim.generate(history, start=start)
        sim.start_live(rate)

    def _ingest(self, stop: threading.Event) -> None:
        """The worker thread: read and commit until stopped; a fatal error ends the demo."""
        try:
            Worker(source_name=settings.GENESYS.event_source, stop=stop).run()
        except CommandError as exc:
            logger.error("the ingest worker stopped: %s", exc)
            self.stderr.write(f"the ingest worker stopped: {exc}")
            _stop_reactor()
        finally:
            connections.close_all()

    def _serve(self, server_class: Any, application: Any, options: dict[str, Any], sim_url: str) -> None:
        host, port = options["host"], options["port"]
        server = server_class(
            application=application,
            endpoints=[f"tcp:port={port}:interface={host}"],
            signal_handlers=True,  # Ctrl-C and SIGTERM stop the reactor; cleanup follows in handle()
            ready_callable=lambda: self._announce(f"http://{host}:{port}", sim_url, options["log_file"]),
        )
        server.run()
        if not server.listening_addresses:
            raise CommandError(f"cannot listen on {host}:{port} (in use? try --port)")

    def _announce(self, web: str, sim_url: str, log_file: str) -> None:
        lines = [
            "",
            f"  Live page:       {web}/live/",
            f"  History:         {web}/conversations/",
            f"  JSON API:        {web}/api/conversations/",
            f"  Admin:           {web}/admin/",
            "  Login:           demo / demo   (demo only)",
            f"  Fake Genesys:    {sim_url}",
            f"  Logs:            {log_file if log_file != '-' else 'this terminal'}",
            "  Stop:            Ctrl-C",
            "",
        ]
        self.stdout.write("\n".join(lines))

    def _stop(self, stop: threading.Event, worker: threading.Thread, sim: Simulator) -> None:
        self.stdout.write("stopping: committing what was read…")
        sim.stop_live()
        stop.set()
        worker.join(WORKER_STOP_TIMEOUT)
        if worker.is_alive():
            logger.warning("the ingest worker did not stop within %.0f s", WORKER_STOP_TIMEOUT)
        realtime.shutdown_publisher()
        self.stdout.write("stopped.")

    def _log_to(self, log_file: str) -> None:
        """INFO and up to the file, only warnings to the terminal: the worker logs every batch."""
        if log_file == "-":
            return
        path = Path(log_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        root = logging.getLogger()
        for handler in root.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.WARNING)
        file_handler = logging.FileHandler(path, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s"))
        root.addHandler(file_handler)


def _asgi_application() -> Any:
    """The project's ASGI app, serving static files too (the admin's CSS, the live page's script)."""
    from channels.routing import get_default_application
    from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

    return ASGIStaticFilesHandler(get_default_application())


def _stop_reactor() -> None:
    from twisted.internet import reactor

    reactor.callFromThread(reactor.stop)


def _wait_for_subscription(sim: Simulator, timeout: float = 15.0) -> None:
    hub = sim.notifications
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(hub.topics(channel) for channel in hub.channel_ids()):
            return
        time.sleep(0.05)
    logger.warning("the Notifications worker has not subscribed after %.0f s; generating anyway", timeout)
