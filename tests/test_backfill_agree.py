"""A backfilled conversation ends in the derived state the live stream gives it.

One simulator tells one story; the SSE worker reads its stream into the database, and `manage.py backfill`
reads the analytics details query for the same conversations into a fresh one. The Conversation rows' derived
fields (state, start/end/wrap-up times, media, direction, queue, ANI/DNIS, agent, wrap-up code and notes,
names) and the participants' common fields must be equal. The wire is not kind (duplicates, neighbours
swapped, agents who reject an offer first), and neither is the query (pages that repeat rows).
"""
from __future__ import annotations

import io
from typing import Any

import pytest
from django.conf import settings
from django.core.management import call_command

from conversations.genesys.scenario import Scenario
from conversations.genesys.simulator import Simulator
from conversations.models import Event, HookDelivery

from tests.test_sources_agree import derived_state, forget_everything, run_sse_worker, unkind_wire

pytestmark = pytest.mark.django_db(transaction=True)

CONVERSATIONS = 24


@pytest.fixture
def simulator() -> Simulator:
    return Simulator(client_id="sim-client", client_secret="sim-secret", seed=11, reject_rate=0.3)


def test_backfill_and_the_sse_stream_end_in_the_same_derived_state(
    simulator: Simulator, genesys_settings: Any,
) -> None:
    wire = unkind_wire(Scenario(seed=9, reject_rate=0.3).timeline(CONVERSATIONS))
    for payload in wire:
        simulator.append(payload)
    simulator.analytics.page_overlap = 2

    call_command("backfill", "--since", "2025-03-03T08:00:00Z", "--until", "2025-03-04T00:00:00Z",
                 "--no-progress", stdout=io.StringIO())
    through_backfill = derived_state()
    assert Event.objects.filter(source="backfill").count() == CONVERSATIONS
    hooks = len(settings.CONVERSATION_HOOKS["wrapup"])
    assert HookDelivery.objects.filter(trigger="wrapup").count() == CONVERSATIONS * hooks
    forget_everything()

    run_sse_worker(len(wire))
    through_sse = derived_state()

    assert len(through_sse["conversations"]) == CONVERSATIONS
    assert through_backfill["conversations"] == through_sse["conversations"]
    assert through_backfill["participants"] == through_sse["participants"]
