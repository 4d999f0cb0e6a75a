"""Every setting the product reads comes through `Environment`: one place that knows each variable's type and
bounds, and stops the program with one line naming the variable, its value and what is expected.

The settings modules read `os.environ` (filled from `.env` first) through typed readers; each reader records
the setting it read, so the tests can walk every one of them with a bad value and compare the list with
docs/configuration.md. An empty value counts as unset: the default applies.
"""
from __future__ import annotations

import os
import sys
import zoneinfo
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

from django.core.exceptions import ImproperlyConfigured

T = TypeVar("T")
TRUE = frozenset({"1", "true", "yes", "on"})
FALSE = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True)
class Setting:
    """What one variable is: its kind, default and bounds (for the docs test and the bad-value test)."""

    name: str
    kind: str  # text, choice, integer, number, boolean, list, url
    default: Any
    low: float | None = None
    high: float | None = None
    above: float | None = None  # exclusive lower bound: "more than"
    choices: tuple[str, ...] = ()


@dataclass
class Environment:
    source: Mapping[str, str] = field(default_factory=lambda: os.environ)
    read: dict[str, Setting] = field(default_factory=dict)

    def raw(self, setting: Setting) -> str | None:
        self.read[setting.name] = setting
        value = self.source.get(setting.name)
        return value.strip() if value is not None and value.strip() else None

    def text(self, name: str, default: str = "") -> str:
        value = self.raw(Setting(name, "text", default))
        return default if value is None else value

    def choice(self, name: str, default: str, choices: Sequence[str]) -> str:
        """One of `choices`, matched without regard to case and returned as the choice is spelled."""
        value = self.raw(Setting(name, "choice", default, choices=tuple(choices)))
        if value is None:
            return default
        spelled = {choice.lower(): choice for choice in choices}
        if value.lower() not in spelled:
            raise invalid(name, value, "one of " + ", ".join(choices))
        return spelled[value.lower()]

    def time_zone(self, name: str, default: str) -> str:
        value = self.raw(Setting(name, "time zone", default))
        if value is None:
            return default
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise invalid(name, value, "a time zone name such as UTC or Europe/Paris") from None
        return value

    def integer(self, name: str, default: int, *, low: int | None = None, high: int | None = None) -> int:
        setting = Setting(name, "integer", default, low=low, high=high)
        return self.bounded(setting, parse=int, noun="a whole number")

    def number(self, name: str, default: float, *, low: float | None = None, high: float | None = None,
               above: float | None = None) -> float:
        """A number (seconds, mostly); `above` is an exclusive lower bound, `low` and `high` inclusive."""
        setting = Setting(name, "number", default, low=low, high=high, above=above)
        return self.bounded(setting, parse=float, noun="a number")

    def bounded(self, setting: Setting, *, parse: Callable[[str], T], noun: str) -> T:
        value = self.raw(setting)
        if value is None:
            return setting.default
        try:
            number = parse(value)
        except ValueError:
            raise invalid(setting.name, value, expectation(setting, noun)) from None
        if not within(number, setting):  # type: ignore[arg-type]
            raise invalid(setting.name, value, expectation(setting, noun))
        return number

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(Setting(name, "boolean", default))
        if value is None:
            return default
        if value.lower() in TRUE | FALSE:
            return value.lower() in TRUE
        raise invalid(name, value, "true or false")

    def csv(self, name: str, default: Sequence[str] = ()) -> list[str]:
        """Comma-separated; blanks dropped, order kept, duplicates dropped. Unlike other kinds, a variable set
        to nothing is an empty list, not the default (CONVERSATION_HOOKS_WRAPUP= runs no hook on wrap-up)."""
        self.raw(Setting(name, "list", list(default)))
        if name not in self.source:
            return list(default)
        return list(dict.fromkeys(item.strip() for item in self.source[name].split(",") if item.strip()))

    def url(self, name: str, default: str, *, schemes: Sequence[str] = ("http", "https")) -> str:
        """A URL with one of `schemes`; an empty default means the setting is optional."""
        value = self.raw(Setting(name, "url", default, choices=tuple(schemes)))
        if value is None:
            return default
        check_url(name, value, schemes)
        return value

    def urls(self, name: str, *, schemes: Sequence[str] = ("http", "https")) -> list[str]:
        """A comma-separated list of URLs."""
        values = self.csv(name)
        self.read[name] = Setting(name, "url list", [], choices=tuple(schemes))
        for value in values:
            check_url(name, value, schemes)
        return values


def check_url(name: str, value: str, schemes: Sequence[str]) -> None:
    scheme, sep, rest = value.partition("://")
    if not sep or scheme.lower() not in schemes or not rest.strip("/"):
        expected = "a URL starting with " + " or ".join(f"{s}://" for s in schemes)
        raise invalid(name, without_secrets(value), expected)


def without_secrets(url: str) -> str:
    """A URL fit for an error line: no password, no path (a webhook's path can be its secret)."""
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = f"{parts.username}:***@" if parts.password else (f"{parts.username}@" if parts.username else "")
    return f"{parts.scheme}://{user}{host}" + ("/..." if parts.path.strip("/") or parts.query else "")


def within(number: float, setting: Setting) -> bool:
    return not (
        (setting.low is not None and number < setting.low)
        or (setting.high is not None and number > setting.high)
        or (setting.above is not None and number <= setting.above)
    )


def expectation(setting: Setting, noun: str) -> str:
    low, high, above = (figure(bound) for bound in (setting.low, setting.high, setting.above))
    if above and high:
        return f"{noun} above {above} and at most {high}"
    if above:
        return f"{noun} above {above}"
    if low and high:
        return f"{noun} from {low} to {high}"
    if low:
        return f"{noun} of at least {low}"
    return noun


def figure(bound: float | None) -> str:
    """A bound as people write it: 100,000 and 0.5."""
    if bound is None:
        return ""
    return f"{bound:,.0f}" if float(bound).is_integer() else f"{bound:g}"


def invalid(name: str, value: str, expected: str) -> ImproperlyConfigured:
    return ImproperlyConfigured(f"{name}={value!r} is not valid: expected {expected}")


def load_settings_or_exit() -> None:
    """Read the settings now, so that a bad one stops this process (web, Celery, a command) with one line
    naming it and exit status 2, instead of a traceback at the first request or task."""
    from django.conf import settings

    try:
        settings.INSTALLED_APPS  # noqa: B018 (the access loads the settings module)
    except ImproperlyConfigured as exc:
        sys.stderr.write(f"configuration error: {exc}\n")
        raise SystemExit(2) from None
