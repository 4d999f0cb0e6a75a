"""A real browser (Playwright driving Debian's chromium) against Channels' live server (daphne, its own process).

The simulator drives a conversation over loopback HTTP into the real ingest worker; the page must show it
appear and change state without a reload, then the supervisor opens its history page.

Where the worker runs depends on the channel layer, as in the product:
* Redis (REDIS_URL set): the worker is a thread of this test process and its publisher reaches daphne's
  process through Redis, as `stream_events` does in production.
* in-memory: a layer reaches only its own process, so the worker runs inside daphne's process, on daphne's
  event loop, exactly as in `manage.py demo`.
"""
from __future__ import annotations

import asyncio
import gc
import multiprocessing
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import SyncToAsync
from channels.layers import InMemoryChannelLayer, channel_layers, get_channel_layer
from channels.testing import ChannelsLiveServerTestCase
from daphne.testing import DaphneProcess
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection, connections

from conversations import realtime
from conversations.genesys.simulator import Simulator, SimulatorServer
from conversations.worker import Worker

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 15_000

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)")


@dataclass
class WorkerPlan:
    """What daphne's process needs to run the worker itself (in-memory layer); picklable for any start method."""

    database_name: str
    genesys: Any
    stop: Any  # multiprocessing.Event: Worker only calls is_set / wait / set
    done: Any


def run_worker(stop: Any, done: Any = None) -> None:
    try:
        Worker(source_name="sse", stop=stop).run()
    finally:
        connections.close_all()
        if done is not None:
            done.set()


def serve_with_worker(plan: WorkerPlan) -> None:
    """Runs in daphne's process before it serves: the publisher on its loop, the worker in a thread."""
    serve_only(plan.database_name)
    settings.GENESYS = plan.genesys
    realtime.install_publisher(loop=asyncio.get_event_loop())
    threading.Thread(target=run_worker, args=(plan.stop, plan.done), name="ingest-worker", daemon=True).start()


def serve_only(database_name: str) -> None:
    settings.DATABASES["default"]["NAME"] = database_name
    # A forked server inherits state that earlier tests' threads and loops own: the channel layer made on a
    # closed loop, and asgiref's one-thread executor whose thread did not survive the fork (any
    # database_sync_to_async call, the socket's login check included, would wait on it forever).
    channel_layers.backends.clear()
    SyncToAsync.single_thread_executor = ThreadPoolExecutor(max_workers=1)


class LiveServer(DaphneProcess):
    """Channels' DaphneProcess, set up with our hook instead of its own (which guesses the test database name)."""

    def __init__(self, host: str, get_application: Any, *, setup: Any = None, hook: Any = None) -> None:
        super().__init__(host, get_application, setup=hook)


def payload(kind: str, cid: str, **extra: Any) -> dict[str, Any]:
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    customer = {"participantId": f"{cid}-c", "purpose": "customer", "name": "Aoife Ní Bhriain"}
    return {"eventType": f"conversation:{kind}", "conversationId": cid, "timestamp": stamp, "mediaType": "voice",
            "direction": "inbound", "ani": "tel:+35315550199", "dnis": "tel:+35318880000",
            "queueId": "queue-browser", "queueName": "Browser Queue", "participants": [customer], **extra}


def wait_for_other_sessions_to_end(timeout: float = 10.0) -> None:
    """The test database is dropped at the end of the run and cannot be while a session lingers: that of
    daphne's killed process (PostgreSQL ends it a moment later), or of a worker thread that has ended."""
    if connection.vendor != "postgresql":
        return
    gc.collect()  # a finished thread's connection is closed when its wrapper is collected
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                           "AND pid <> pg_backend_pid()")
            if cursor.fetchone()[0] == 0:
                return
        time.sleep(0.1)


class TestLivePageInARealBrowser(ChannelsLiveServerTestCase):
    host = "127.0.0.1"
    serve_static = True

    @classmethod
    def setUpClass(cls) -> None:
        cls.sim = Simulator(client_id="sim-client", client_secret="sim-secret", seed=11)
        cls.sim_server = SimulatorServer(cls.sim).start()
        cls.genesys = replace(settings.GENESYS, client_id="sim-client", client_secret="sim-secret",
                              api_url=cls.sim_server.url, login_url=cls.sim_server.url)
        cls.worker_in_server = isinstance(get_channel_layer(), InMemoryChannelLayer)
        cls.stop = multiprocessing.Event()
        cls.done = multiprocessing.Event()
        name = connection.settings_dict["NAME"]
        hook = (partial(serve_with_worker, WorkerPlan(name, cls.genesys, cls.stop, cls.done))
                if cls.worker_in_server else partial(serve_only, name))
        cls.ProtocolServerProcess = partial(LiveServer, hook=hook)
        super().setUpClass()

    @classmethod
    def tearDownClass(cls) -> None:
        super().tearDownClass()  # terminates daphne's process
        cls.sim_server.stop()
        wait_for_other_sessions_to_end()


    def setUp(self) -> None:
        get_user_model().objects.create_user("supervisor", password="s3cret-pass", is_staff=True)
        self.worker: threading.Thread | None = None
        if not self.worker_in_server:
            self._settings = self.settings(GENESYS=self.genesys)
            self._settings.enable()
            self.worker = threading.Thread(target=run_worker, args=(self.stop,), name="ingest-worker", daemon=True)
            self.worker.start()

    def tearDown(self) -> None:
        # Stop the worker before the test database is flushed, so it writes nothing into the next test.
        self.stop.set()
        if self.worker is not None:
            self.worker.join(15)
            realtime.shutdown_publisher()
            self._settings.disable()
        else:
            assert self.done.wait(15), "the worker in the server process did not stop"

    def test_a_supervisor_watches_a_conversation_change_live_then_opens_its_history(self) -> None:
        from playwright.sync_api import expect, sync_playwright

        expect.set_options(timeout=WAIT_MS)
        # No database access from here on: Playwright's sync API runs an event loop in this thread.
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.set_default_timeout(WAIT_MS)
                self.anonymous_visitor_is_refused(page)
                self.log_in(page)
                cid = str(uuid.uuid4())
                latencies = self.conversation_appears_and_changes_state(page, cid)
                self.reconnecting_reloads_the_state_over_http(page)
                self.history_page_shows_the_conversation(page, cid)
                print(f"browser: commit -> page, seconds per step: {', '.join(f'{s:.2f}' for s in latencies)}")
            finally:
                browser.close()

    # -- steps ------------------------------------------------------------------------------------------
    def anonymous_visitor_is_refused(self, page: Any) -> None:
        page.goto(f"{self.live_server_url}/live/")
        assert "/login/?next=/live/" in page.url
        opened = page.evaluate("""url => new Promise(resolve => {
            const socket = new WebSocket(url);
            socket.onopen = () => { socket.close(); resolve("open"); };
            socket.onclose = () => resolve("refused");
        })""", f"{self.live_server_ws_url}/ws/live/")
        assert opened == "refused"
        assert page.request.get(f"{self.live_server_url}/live/state.json").status == 401

    def log_in(self, page: Any) -> None:
        page.fill("#id_username", "supervisor")
        page.fill("#id_password", "s3cret-pass")
        page.click("button[type=submit]")
        page.wait_for_url(f"{self.live_server_url}/live/")
        from playwright.sync_api import expect

        expect(page.locator("#connection-status")).to_have_attribute("data-status", "live")

    def conversation_appears_and_changes_state(self, page: Any, cid: str) -> list[float]:
        from playwright.sync_api import expect

        row = page.locator(f'#live-conversations tr[data-conversation-id="{cid}"]')
        agent = {"participantId": f"{cid}-a", "purpose": "agent", "userId": "user-browser",
                 "name": "Agnès Łukasz", "queueId": "queue-browser"}
        steps = [
            (payload("start", cid), "active", "waiting…"),
            (payload("update", cid, participants=[
                {"participantId": f"{cid}-c", "purpose": "customer"},
                {**agent, "connectedTime": datetime.now(UTC).isoformat().replace("+00:00", "Z")}]),
             "active", "Agnès Łukasz"),
            (payload("end", cid), "ended", "Agnès Łukasz"),
        ]
        latencies = []
        for event, state, agent_text in steps:
            started = time.monotonic()
            self.sim.append(event)
            expect(row).to_have_attribute("data-state", state)
            expect(row.locator("td").nth(5)).to_have_text(agent_text)
            latencies.append(time.monotonic() - started)
        expect(row.locator("td").nth(2)).to_have_text("Browser Queue")
        expect(page.locator('#queue-counters tr[data-queue-id="queue-browser"]')).to_be_visible()
        return latencies

    def reconnecting_reloads_the_state_over_http(self, page: Any) -> None:
        from playwright.sync_api import expect

        loads = page.evaluate("window.liveMonitor.stateLoads")
        page.evaluate("window.liveMonitor.socket.close()")
        page.wait_for_function("n => window.liveMonitor.stateLoads > n", arg=loads, timeout=WAIT_MS)
        expect(page.locator("#connection-status")).to_have_attribute("data-status", "live")

    def history_page_shows_the_conversation(self, page: Any, cid: str) -> None:
        from playwright.sync_api import expect

        page.locator(f'#live-conversations tr[data-conversation-id="{cid}"] a').click()
        expect(page.locator("#conversation-id")).to_have_text(cid)
        expect(page.locator("#timeline li")).to_have_count(3)
        expect(page.locator("#participants")).to_contain_text("Agnès Łukasz")
        page.locator("#timeline li").first.locator("summary").click()
        expect(page.locator("#timeline pre.raw").first).to_contain_text('"eventType": "conversation:start"')
        page.goto(f"{self.live_server_url}/conversations/?q=%2B35315550199")
        expect(page.locator(f'#history tr[data-conversation-id="{cid}"]')).to_contain_text("Browser Queue")

