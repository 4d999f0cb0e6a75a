"""Capped exponential backoff with full jitter, and Retry-After parsing."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from conversations.genesys.backoff import Backoff, parse_retry_after


def test_delays_stay_within_the_doubling_ceiling() -> None:
    backoff = Backoff(base=1.0, cap=100.0, rng=random.Random(1))
    for attempt in range(6):
        assert 0 <= backoff.next_delay() <= 2**attempt


def test_delays_never_exceed_the_cap() -> None:
    backoff = Backoff(base=1.0, cap=5.0, rng=random.Random(2))
    assert max(backoff.next_delay() for _ in range(200)) <= 5.0


def test_delays_are_jittered() -> None:
    backoff = Backoff(base=1.0, cap=1.0, rng=random.Random(3))
    assert len({backoff.next_delay() for _ in range(20)}) == 20


def test_retry_after_is_a_floor_even_above_the_cap() -> None:
    backoff = Backoff(base=0.01, cap=0.05, rng=random.Random(4))
    assert backoff.next_delay(retry_after=3.0) == 3.0


def test_reset_starts_again_from_the_base() -> None:
    backoff = Backoff(base=1.0, cap=1000.0, rng=random.Random(5))
    for _ in range(8):
        backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() <= 1.0


def test_thousands_of_attempts_do_not_overflow() -> None:
    backoff = Backoff(base=0.5, cap=60.0)
    assert all(0 <= backoff.next_delay() <= 60.0 for _ in range(5000))


def test_a_base_above_the_cap_is_refused() -> None:
    with pytest.raises(ValueError):
        Backoff(base=10.0, cap=1.0)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("3", 3.0), (" 120 ", 120.0), ("0.5", 0.5), ("", None), (None, None), ("soon", None), ("-1", None)],
)
def test_retry_after_seconds_are_parsed(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header) == seconds


def test_retry_after_as_an_http_date_is_seconds_from_now() -> None:
    now = datetime(2026, 11, 28, 9, 0, 0, tzinfo=UTC)
    assert parse_retry_after("Sat, 28 Nov 2026 09:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Sat, 28 Nov 2026 08:00:00 GMT", now=now) == 0.0
