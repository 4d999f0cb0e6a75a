from __future__ import annotations

from collections.abc import Iterator

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conversations.genesys.simulator import Simulator, SimulatorServer


@pytest.fixture
def simulator() -> Simulator:
    from conversations.genesys.simulator import Simulator

    return Simulator(client_id="sim-client", client_secret="sim-secret", token_ttl=3600, seed=7)


@pytest.fixture
def sim_server(simulator: Simulator) -> Iterator[SimulatorServer]:
    from conversations.genesys.simulator import SimulatorServer

    with SimulatorServer(simulator) as server:
        yield server


@pytest.fixture
def genesys_settings(settings, sim_server: SimulatorServer):  # noqa: ANN001, ANN201 (pytest-django fixture)
    """Point the project's Genesys settings at the simulator on loopback."""
    from dataclasses import replace

    settings.GENESYS = replace(
        settings.GENESYS, client_id="sim-client", client_secret="sim-secret",
        api_url=sim_server.url, login_url=sim_server.url, event_source="sse",
    )
    settings.SSE_READ_TIMEOUT = 5.0
    return settings.GENESYS


def database_url() -> str:
    """The test database as a DATABASE_URL, for worker processes the tests start."""
    from django.db import connection

    conf = connection.settings_dict
    if conf["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{conf['NAME']}"
    user = conf["USER"] or "postgres"
    return f"postgres://{user}@{conf['HOST'] or '127.0.0.1'}:{conf['PORT'] or 5432}/{conf['NAME']}"


@pytest.fixture
def worker_env(sim_server: SimulatorServer) -> dict[str, str]:
    """Environment for a `manage.py stream_events` child process pointed at the simulator and the test database."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("GENESYS", "DJANGO_SETTINGS"))}
    env.update(
        DJANGO_SETTINGS_MODULE="monitor_project.settings.test",
        DATABASE_URL=database_url(),
        GENESYSCLOUD_OAUTHCLIENT_ID="sim-client",
        GENESYSCLOUD_OAUTHCLIENT_SECRET="sim-secret",
        GENESYS_API_URL=sim_server.url,
        GENESYS_LOGIN_URL=sim_server.url,
        GENESYS_EVENT_SOURCE="sse",
        SSE_READ_TIMEOUT="5",
        PYTHONUNBUFFERED="1",
    )
    return env


FAULT_REPORT: list[tuple[str, dict[str, int]]] = []


@pytest.fixture
def fault_report() -> list[tuple[str, dict[str, int]]]:
    """Fault-injection cases append (case, counts); the table is printed at the end of the run."""
    return FAULT_REPORT


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001
    if not FAULT_REPORT:
        return
    columns = ("sent", "stored", "lost", "duplicate_events", "hook_deliveries", "duplicate_deliveries")
    write = terminalreporter.write_line
    write("")
    write("fault injection: " + " | ".join(["case".ljust(52), *(c.rjust(10) for c in columns)]))
    for case, result in FAULT_REPORT:
        write("                 " + " | ".join([case.ljust(52), *(str(result.get(c, "-")).rjust(10) for c in columns)]))
