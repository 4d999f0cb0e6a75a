"""The topic budget: base topics spread over channels, per-conversation detail topics within the limits."""
from __future__ import annotations

import logging

import pytest

from conversations.genesys.topics import (
    DETAIL_EVENT_TYPES,
    TopicBudget,
    TopicLimitError,
    detail_topics,
    queue_topic,
    spread,
    user_topic,
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_topic_names_are_those_of_the_notifications_api() -> None:
    assert queue_topic("q1") == "v2.routing.queues.q1.conversations"
    assert user_topic("u1") == "v2.users.u1.conversations"
    assert detail_topics("c1", ("customer.start", "acw")) == [
        "v2.detail.events.conversation.c1.customer.start", "v2.detail.events.conversation.c1.acw"]
    assert len(detail_topics("c1")) == len(DETAIL_EVENT_TYPES) == 8


@pytest.mark.parametrize(("count", "sizes"), [(0, [0]), (5, [5]), (10, [10]), (11, [6, 5]), (25, [9, 9, 7])])
def test_base_topics_are_spread_evenly_over_as_few_channels_as_hold_them(count: int, sizes: list[int]) -> None:
    chunks = spread([f"t{n}" for n in range(count)], 10, 20)
    assert [len(c) for c in chunks] == sizes
    assert [topic for chunk in chunks for topic in chunk] == [f"t{n}" for n in range(count)]


def test_more_base_topics_than_every_channel_holds_is_an_error_naming_the_fix() -> None:
    with pytest.raises(TopicLimitError, match="GENESYS_QUEUE_IDS"):
        TopicBudget([f"t{n}" for n in range(41)], max_topics=10, max_channels=4)


def test_a_discovered_conversation_gets_its_detail_topics_and_loses_them_once_wrapped_up() -> None:
    budget = TopicBudget(["q1", "q2"], max_topics=100)
    version, _ = budget.plan(0)
    assert budget.follow("c1") and budget.follow("c1")  # a second snapshot changes nothing
    new_version, topics = budget.plan(0)
    assert new_version == version + 1 and topics == ["q1", "q2", *detail_topics("c1")]
    assert budget.finish("c1") and budget.plan(0)[1] == ["q1", "q2"]
    assert not budget.follow("c1")  # a late snapshot of a finished conversation does not follow it again


def test_detail_topics_go_to_the_fullest_channel_with_room_then_to_a_new_channel() -> None:
    budget = TopicBudget([f"q{n}" for n in range(12)], max_topics=10, max_channels=3, detail_types=("a", "b"))
    assert budget.sizes() == [6, 6]
    for conversation in ("c1", "c2", "c3", "c4"):
        budget.follow(conversation)
    assert budget.sizes() == [10, 10]
    budget.follow("c5")
    assert budget.sizes() == [10, 10, 2] and budget.slot_count == 3


def test_when_every_channel_is_full_a_conversation_is_followed_by_snapshots_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    budget = TopicBudget(["q1"], max_topics=5, max_channels=1, detail_types=("a", "b"))
    with caplog.at_level(logging.WARNING):
        assert budget.follow("c1") and budget.follow("c2")
        assert not budget.follow("c3")
    assert budget.sizes() == [5] and budget.dropped_no_room == 1
    assert any("no room for the detail topics of conversation c3" in r.getMessage() for r in caplog.records)
    assert any("holds 5 of 5 topics" in r.getMessage() for r in caplog.records)
    budget.finish("c1")
    assert budget.follow("c3")  # room again


def test_nearing_the_channel_limit_is_warned(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        budget = TopicBudget(["q1"], max_topics=2, max_channels=10, detail_types=("a", "b"))
        for n in range(9):
            budget.follow(f"c{n}")
    assert budget.slot_count == 10
    assert any("9 of 10 channels in use" in r.getMessage() for r in caplog.records)


def test_an_ended_conversation_without_wrapup_loses_its_topics_after_the_grace() -> None:
    clock = Clock()
    budget = TopicBudget(["q1"], ended_grace=60, clock=clock)
    budget.follow("c1")
    budget.follow("c2")
    budget.ended("c1")
    clock.now = 59
    assert budget.expire_ended() == []
    clock.now = 60
    assert budget.expire_ended() == ["c1"] and budget.following() == 1


def test_refused_detail_topics_stop_the_following() -> None:
    budget = TopicBudget(["q1"])
    budget.follow("c1")
    assert budget.disable_details() == [0]
    assert budget.plan(0)[1] == ["q1"] and not budget.follow("c2")
