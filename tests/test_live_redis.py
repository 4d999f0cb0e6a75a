"""A live page's socket on the Redis channel layer, as deployed: a real daphne process, a real WebSocket client,
a real Redis. An idle socket must stay open: channels_redis blocks on Redis (BZPOPMIN) for up to 5 s, so a
client whose read timeout is no longer than that (redis-py 8's default) loses every idle socket."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import websockets
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.contrib.auth import get_user_model
from django.test import Client

from conversations import realtime
from tests.conftest import database_url
from tests.factories import wait_for

ROOT = Path(__file__).resolve().parent.parent
IDLE_SECONDS = 16  # three times channels_redis's blocking receive, and more than redis-py 8's default timeout
pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not os.environ.get("REDIS_URL"), reason="needs Redis: set REDIS_URL"),
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def web_server() -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_SETTINGS")}
    env.update(DJANGO_SETTINGS_MODULE="monitor_project.settings.test", DATABASE_URL=database_url(),
               PYTHONUNBUFFERED="1")
    server = subprocess.Popen(
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "monitor_project.asgi:application"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    wait_for(lambda: port_open(port), timeout=30, what="daphne listening")
    yield f"127.0.0.1:{port}", server
    server.terminate()
    server.wait(timeout=15)


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def staff_session_cookie() -> str:
    user = get_user_model().objects.create_user("supervisor", password="pw-for-tests-only", is_staff=True)
    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


async def hold_idle_socket_then_broadcast(address: str, cookie: str) -> dict:
    headers = {"Cookie": f"sessionid={cookie}", "Origin": f"http://{address}"}
    async with websockets.connect(f"ws://{address}/ws/live/", additional_headers=headers) as live:
        with pytest.raises(TimeoutError):  # nothing arrives, and nothing closes the socket
            await asyncio.wait_for(live.recv(), timeout=IDLE_SECONDS)
        await get_channel_layer().group_send(realtime.STATS_GROUP, {"type": "live.stats", "events": 7, "at": 1.0})
        return json.loads(await asyncio.wait_for(live.recv(), timeout=10))


def test_an_idle_live_socket_stays_open_and_still_receives(web_server: tuple[str, subprocess.Popen]) -> None:
    address, server = web_server
    cookie = staff_session_cookie()
    started = time.monotonic()
    message = async_to_sync(hold_idle_socket_then_broadcast)(address, cookie)
    assert time.monotonic() - started >= IDLE_SECONDS
    assert message == {"type": "stats", "events": 7, "at": 1.0}
    server.terminate()
    log = server.communicate(timeout=15)[0]
    assert "Traceback" not in log and "TimeoutError" not in log and " ERROR " not in log, log
