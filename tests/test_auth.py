"""OAuth client credentials against the simulator over loopback HTTP: caching, renewal, refusals."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from conversations.genesys.auth import TokenProvider
from conversations.genesys.errors import AuthError, FatalSourceError, TransientError
from conversations.genesys.simulator import Simulator, SimulatorServer

CLIENT_ID = "sim-client"
SECRET = "sim-secret"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def sim() -> Simulator:
    return Simulator(client_id=CLIENT_ID, client_secret=SECRET, seed=7)


@pytest.fixture
def server(sim: Simulator) -> Iterator[SimulatorServer]:
    with SimulatorServer(sim) as running:
        yield running


def provider(server: SimulatorServer, **options: object) -> TokenProvider:
    return TokenProvider(login_url=server.url, client_id=CLIENT_ID, client_secret=SECRET, **options)  # type: ignore[arg-type]


def api_accepts(server: SimulatorServer, token: str) -> bool:
    """Whether the simulator's API takes this bearer token (a 404 for an unknown code means it did)."""
    response = requests.get(
        f"{server.url}/api/v2/routing/wrapupcodes/unknown",
        headers={"Authorization": f"Bearer {token}"},
        timeout=5,
    )
    return response.status_code != 401


def test_the_token_is_requested_once_and_cached(server: SimulatorServer, sim: Simulator) -> None:
    tokens = provider(server)
    issued = {tokens.token() for _ in range(50)}
    assert len(issued) == 1
    assert sim.stats["token_requests"] == 1
    assert api_accepts(server, issued.pop())


def test_the_token_is_renewed_margin_seconds_before_it_expires(
    server: SimulatorServer, sim: Simulator
) -> None:
    clock = FakeClock()
    tokens = provider(server, margin_seconds=60, clock=clock)
    first = tokens.token()
    clock.now += 3600 - 61
    assert tokens.token() == first
    clock.now += 1
    assert tokens.token() != first
    assert sim.stats["token_requests"] == 2


def test_a_lifetime_shorter_than_twice_the_margin_is_renewed_halfway(
    server: SimulatorServer, sim: Simulator
) -> None:
    sim.token_ttl = 2
    clock = FakeClock()
    tokens = provider(server, margin_seconds=60, clock=clock)
    first = tokens.token()
    clock.now += 0.9
    assert tokens.token() == first
    clock.now += 0.1
    assert tokens.token() != first


def test_a_renewed_token_is_accepted_after_the_first_one_expired(
    server: SimulatorServer, sim: Simulator
) -> None:
    sim.token_ttl = 1
    tokens = provider(server)
    first = tokens.token()
    time.sleep(1.05)
    assert not api_accepts(server, first)
    second = tokens.token()
    assert second != first and api_accepts(server, second)


def test_invalidate_forces_a_new_token(server: SimulatorServer, sim: Simulator) -> None:
    tokens = provider(server)
    first = tokens.token()
    tokens.invalidate()
    assert tokens.token() != first
    assert sim.stats["token_requests"] == 2


def test_a_wrong_secret_is_a_fatal_auth_error_naming_the_client_not_the_secret(
    server: SimulatorServer,
) -> None:
    tokens = TokenProvider(login_url=server.url, client_id=CLIENT_ID, client_secret="not-the-secret")
    with pytest.raises(AuthError) as raised:
        tokens.token()
    message = str(raised.value)
    assert isinstance(raised.value, FatalSourceError)
    assert CLIENT_ID in message and "invalid_client" in message
    assert "not-the-secret" not in message and "\n" not in message


def test_a_wrong_login_url_is_fatal(server: SimulatorServer) -> None:
    tokens = TokenProvider(login_url=f"{server.url}/nowhere", client_id=CLIENT_ID, client_secret=SECRET)
    with pytest.raises(AuthError, match="404"):
        tokens.token()


def test_missing_credentials_are_refused_before_any_request() -> None:
    with pytest.raises(AuthError, match="client id and secret"):
        TokenProvider(login_url="http://127.0.0.1:1", client_id=CLIENT_ID, client_secret="")


def test_an_unreachable_token_endpoint_is_transient() -> None:
    tokens = TokenProvider(
        login_url=f"http://127.0.0.1:{closed_port()}", client_id=CLIENT_ID, client_secret=SECRET
    )
    with pytest.raises(TransientError, match="unreachable"):
        tokens.token()


@pytest.mark.parametrize("status", [429, 503])
def test_a_busy_token_endpoint_is_transient_and_says_when_to_retry(status: int) -> None:
    with Answering(status, retry_after="7") as url:
        tokens = TokenProvider(login_url=url, client_id=CLIENT_ID, client_secret=SECRET)
        with pytest.raises(TransientError) as raised:
            tokens.token()
    assert raised.value.retry_after == 7.0
    assert str(status) in str(raised.value)


def test_the_token_and_secret_never_reach_logs_or_repr(
    server: SimulatorServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    tokens = provider(server)
    first = tokens.token()
    tokens.invalidate()
    second = tokens.token()
    for secret in (first, second, SECRET):
        assert secret not in caplog.text
        assert secret not in repr(tokens)
    assert "new token for client sim-client" in caplog.text


# A stand-in token endpoint for answers the simulator does not give (429/5xx at login).


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Answering:
    """A loopback HTTP server answering every POST with one status and a JSON error body."""

    def __init__(self, status: int, *, retry_after: str | None = None) -> None:
        handler = _handler(status, retry_after)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __exit__(self, *exc_info: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _handler(status: int, retry_after: str | None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            body = b'{"message": "busy", "status": %d}' % status
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if retry_after is not None:
                self.send_header("Retry-After", retry_after)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
            return

    return Handler
