"""`manage.py stream_events` end to end: the simulator over loopback HTTP, the real pipeline, the database."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from conversations.models import Conversation, Event, RejectedEvent, StreamCheckpoint

from tests.factories import lifecycle, wait_for

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.django_db(transaction=True)


def stream(max_events: int) -> None:
    call_command("stream_events", max_events=max_events)


def start_worker(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "manage.py", "stream_events", *args], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )



def test_a_generated_day_is_stored_and_derived(simulator, genesys_settings) -> None:  # noqa: ANN001
    payloads = simulator.generate(conversations=15)
    stream(max_events=len(payloads))
    assert Event.objects.count() == len(payloads)
    conversation_ids = {p["conversationId"] for p in payloads}
    assert Conversation.objects.filter(state="wrapped_up").count() == len(conversation_ids) == 15
    checkpoint = StreamCheckpoint.objects.get(source="sse")
    assert checkpoint.events_committed == len(payloads) and checkpoint.last_event_id == str(len(payloads))


def test_duplicates_and_reordering_over_the_wire_change_nothing(simulator, genesys_settings) -> None:  # noqa: ANN001
    first, second = lifecycle("conv-1"), lifecycle("conv-2", offset=3)
    wire = [second[4], first[0], first[3], first[3], second[0], first[1], second[1], first[4], second[2],
            first[2], second[3], first[4], second[0]]
    for p in wire:
        simulator.append(p)
    stream(max_events=len(wire))
    assert Event.objects.count() == 10
    assert set(Conversation.objects.values_list("state", flat=True)) == {"wrapped_up"}
    conv = Conversation.objects.get(conversation_id="conv-1")
    assert (conv.queue_name, conv.wrapup_name) == ("Billing", "Resolved")


def test_malformed_unknown_and_keepalive_input_is_kept_apart_and_the_stream_goes_on(
    simulator, genesys_settings  # noqa: ANN001
) -> None:
    events = lifecycle("conv-1")
    simulator.append(events[0])
    simulator.append_raw('id: bad-1\ndata: {"eventType": "conversation:update", "conver\n\n')
    simulator.append_raw(": a comment\n\ndata: {}\n\ndata:\n\n")
    simulator.append({"eventType": "conversation:transfer", "conversationId": "conv-1",
                      "timestamp": "2026-11-28T09:00:01Z"})
    simulator.append(events[3])
    stream(max_events=4)
    reject = RejectedEvent.objects.get()
    assert reject.raw == '{"eventType": "conversation:update", "conver' and reject.sse_id == "bad-1"
    assert sorted(Event.objects.values_list("kind", flat=True)) == ["end", "start", "unknown"]
    assert Conversation.objects.get().state == "ended"


def test_a_restarted_worker_resumes_after_its_checkpoint(simulator, genesys_settings) -> None:  # noqa: ANN001
    payloads = simulator.generate(conversations=6)
    stream(max_events=7)
    assert StreamCheckpoint.objects.get().last_event_id == "7"
    stream(max_events=len(payloads) - 7)
    assert simulator.stats["last_event_ids"][-1] == "7"
    assert Event.objects.count() == len(payloads)
    assert StreamCheckpoint.objects.get().events_committed == len(payloads)


def test_transient_failures_are_ridden_out_without_loss(simulator, genesys_settings) -> None:  # noqa: ANN001
    payloads = simulator.generate(conversations=4)
    simulator.fail_next(503)
    simulator.fail_next(429, retry_after=1)
    simulator.drop_after(3)
    stream(max_events=len(payloads))
    assert Event.objects.count() == len(payloads)
    assert 503 in simulator.stats["statuses"] and 429 in simulator.stats["statuses"]


def test_an_expired_token_is_renewed_once_and_the_stream_goes_on(simulator, genesys_settings) -> None:  # noqa: ANN001
    payloads = simulator.generate(conversations=2)
    stream(max_events=3)
    simulator.expire_tokens()
    stream(max_events=len(payloads) - 3)
    assert Event.objects.count() == len(payloads)


def test_a_forbidden_stream_is_fatal_with_one_clear_line(simulator, genesys_settings) -> None:  # noqa: ANN001
    simulator.fail_next(403)
    with pytest.raises(CommandError, match="403"):
        stream(max_events=1)


def test_sigterm_commits_what_was_read_and_exits_zero(simulator, worker_env) -> None:  # noqa: ANN001
    payloads = simulator.generate(conversations=10)
    # Batches would not commit on their own for a minute: only the shutdown path can store them.
    env = {**worker_env, "INGEST_BATCH_MAX_AGE": "60", "INGEST_BATCH_SIZE": "100000"}
    worker = start_worker(env)
    wait_for(lambda: simulator.stats["stream_requests"] >= 1)
    time.sleep(1.0)
    started = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    out, err = worker.communicate(timeout=15)
    assert worker.returncode == 0, err
    assert time.monotonic() - started < 10
    assert Event.objects.count() == len(payloads), err
    assert StreamCheckpoint.objects.get().last_event_id == str(len(payloads))
    assert "received SIGTERM" in err


def test_wrong_credentials_exit_non_zero_with_one_line_and_no_secret(simulator, worker_env) -> None:  # noqa: ANN001
    worker = start_worker({**worker_env, "GENESYSCLOUD_OAUTHCLIENT_SECRET": "wrong-secret-value"})
    out, err = worker.communicate(timeout=30)
    assert worker.returncode != 0
    lines = [line for line in err.splitlines() if line.strip() and "INFO" not in line]
    assert len(lines) == 1 and "sim-client" in lines[0], err
    assert "wrong-secret-value" not in err + out and "Traceback" not in err


def test_a_missing_credential_names_the_variable(worker_env) -> None:  # noqa: ANN001
    env = {k: v for k, v in worker_env.items() if k != "GENESYSCLOUD_OAUTHCLIENT_ID"}
    worker = start_worker(env)
    out, err = worker.communicate(timeout=30)
    assert worker.returncode != 0 and "GENESYSCLOUD_OAUTHCLIENT_ID" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("name", "value"),
    [("GENESYSCLOUD_REGION", "mars-north-1"), ("GENESYS_EVENT_SOURCE", "carrier-pigeon"),
     ("GENESYS_API_URL", "api.example.com"), ("DATABASE_URL", "nosuchdb://x")],
)
def test_an_invalid_setting_is_one_line_naming_the_variable(worker_env, name: str, value: str) -> None:  # noqa: ANN001
    worker = start_worker({**worker_env, name: value})
    out, err = worker.communicate(timeout=30)
    assert worker.returncode == 2
    assert err.count("\n") == 1 and name in err and "Traceback" not in err, err


def test_tokens_never_reach_the_logs(simulator, worker_env) -> None:  # noqa: ANN001
    payloads = simulator.generate(conversations=2)
    simulator.expire_tokens()
    worker = start_worker({**worker_env, "LOG_LEVEL": "DEBUG"}, "--max-events", str(len(payloads)))
    out, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err
    issued = simulator.issued_tokens()
    assert issued and not any(token in out + err for token in issued)
    assert "sim-secret" not in out + err


@pytest.mark.parametrize("value", ["-5", "0", "abc"])
def test_a_max_events_below_one_is_refused_naming_the_option(value: str) -> None:
    done = subprocess.run([sys.executable, "manage.py", "stream_events", "--max-events", value], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"argument --max-events: expected a whole number of at least 1, not '{value}'" in done.stderr
    assert "Traceback" not in done.stderr
