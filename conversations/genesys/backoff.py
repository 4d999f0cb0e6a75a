"""Capped exponential backoff with full jitter, and parsing of the Retry-After header."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

# 2 ** 64 times any sane base is far past any cap; stopping the exponent there avoids float overflow.
_MAX_EXPONENT = 64


class Backoff:
    """Delays before a retry: uniform in [0, min(cap, base * 2**attempt)], never less than a Retry-After.

    Full jitter spreads the reconnects of many clients that failed at the same moment.
    """

    def __init__(self, *, base: float = 0.5, cap: float = 60.0, rng: random.Random | None = None) -> None:
        if base <= 0 or cap < base:
            raise ValueError(f"Backoff needs 0 < base <= cap, got base={base} cap={cap}")
        self.base = base
        self.cap = cap
        self.attempts = 0
        self._rng = rng or random.Random()

    def next_delay(self, retry_after: float | None = None) -> float:
        """Seconds to wait before the next attempt; Retry-After is a floor, even above the cap."""
        ceiling = min(self.cap, self.base * 2 ** min(self.attempts, _MAX_EXPONENT))
        self.attempts += 1
        delay = self._rng.uniform(0, ceiling)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return delay

    def reset(self) -> None:
        """Called after a healthy connection: the next failure starts again from `base`."""
        self.attempts = 0

    def __repr__(self) -> str:
        return f"Backoff(base={self.base}, cap={self.cap}, attempts={self.attempts})"


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After header: delay-seconds or an HTTP date; None when absent or unreadable."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    if _is_number(value):
        # The standard says whole seconds; a relay sending "0.5" means half a second, not an error.
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _is_number(value: str) -> bool:
    whole, _, fraction = value.partition(".")
    return bool(whole) and value.isascii() and whole.isdigit() and (not fraction or fraction.isdigit())
