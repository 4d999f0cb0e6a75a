"""Paging and date navigation for changelists of millions of rows, without COUNT(*) or SELECT DISTINCT.

The paginator never counts: it reads one row past the page to learn whether another page follows.

`SELECT COUNT(*)` over a million events costs a full index scan on every page view; an operator does not
need the total to page through the newest rows. The paginator is told which page will be shown, reads that
page plus one row, and reports a count that is exact on the last page and otherwise "at least one more than
this page", so the admin shows the pages up to the next one and never a "show all" of a huge table.
"""
from __future__ import annotations

import calendar
from collections.abc import Sequence
from datetime import date, datetime
from functools import cached_property
from typing import Any

from django.contrib.admin.views.main import PAGE_VAR, ChangeList
from django.core.paginator import Page, Paginator
from django.http import HttpRequest
from django.utils import formats, timezone
from django.utils.text import capfirst
from django.utils.translation import gettext as _


class NoCountPaginator(Paginator):
    """Pages a queryset with `LIMIT per_page + 1 OFFSET ...`; never issues a COUNT query.

    `number` is the page the caller is about to ask for (the admin passes the `?p=` parameter). Its rows are
    read once, on the first use of `count` or `page(number)`, and reused.
    """

    def __init__(self, object_list: Any, per_page: int, orphans: int = 0, allow_empty_first_page: bool = True,
                 *, number: int = 1) -> None:
        # Orphans would need the total to fold a short last page into the previous one.
        super().__init__(object_list, per_page, orphans=0, allow_empty_first_page=allow_empty_first_page)
        self.number = max(number, 1)

    @cached_property
    def _probe(self) -> list[Any]:
        """The requested page's rows and, if there is one, the first row of the next page."""
        offset = (self.number - 1) * self.per_page
        return list(self.object_list[offset:offset + self.per_page + 1])

    @cached_property
    def count(self) -> int:
        """Rows known to exist: exact on the last page, else this page's end plus one."""
        return (self.number - 1) * self.per_page + len(self._probe)

    @property
    def count_is_exact(self) -> bool:
        return len(self._probe) <= self.per_page

    @property
    def first_shown(self) -> int:
        return (self.number - 1) * self.per_page + 1 if self._probe else 0

    @property
    def last_shown(self) -> int:
        return (self.number - 1) * self.per_page + min(len(self._probe), self.per_page)

    def page(self, number: Any) -> Page:
        number = self.validate_number(number)
        if number == self.number:
            return self._get_page(self._probe[: self.per_page], number, self)
        return super().page(number)

    def complete_rows(self) -> Sequence[Any] | None:
        """Every row of the result when it fits on the first page (nothing to read again), else None."""
        return self._probe if self.number == 1 and self.count_is_exact else None


def requested_page(request: HttpRequest) -> int:
    """The page the admin's ChangeList will ask for, parsed the way it parses it."""
    try:
        return int(request.GET.get(PAGE_VAR, 1))
    except ValueError:
        return 1


class ConsoleChangeList(ChangeList):
    """The admin's ChangeList, minus the queries that grow with the table.

    * A result that fits on the first page is shown from the rows the paginator already read (the stock
      ChangeList reads them a second time).
    * `date_navigation()` replaces the date hierarchy's `SELECT DISTINCT` of truncated dates (a scan of every
      row of the period) with the table's first and last date (two index probes): it offers every period in
      between, so a period without rows can appear and simply shows an empty list.
    """

    def get_results(self, request: HttpRequest) -> None:
        super().get_results(request)
        rows = self.paginator.complete_rows() if isinstance(self.paginator, NoCountPaginator) else None
        if rows is not None and not self.multi_page:
            self.result_list = rows

    def date_navigation(self) -> dict[str, Any]:
        return date_navigation(self) if self.date_hierarchy else {"show": False}


def date_bounds(cl: ChangeList) -> tuple[datetime, datetime] | None:
    """First and last value of the date field in the whole table, by index, ignoring the list's filters
    (a filtered MIN() may walk most of the index before it meets a matching row)."""
    field = cl.date_hierarchy
    column = cl.root_queryset.filter(**{f"{field}__isnull": False}).values_list(field, flat=True)
    first, last = column.order_by(field).first(), column.order_by(f"-{field}").first()
    if first is None or last is None:
        return None
    if isinstance(first, datetime) and timezone.is_aware(first):
        first, last = timezone.localtime(first), timezone.localtime(last)
    return first, last


def date_navigation(cl: ChangeList) -> dict[str, Any]:
    """The context of admin/date_hierarchy.html (show, back, choices), built without scanning rows."""
    field = cl.date_hierarchy
    names = {part: f"{field}__{part}" for part in ("year", "month", "day")}

    def link(filters: dict[str, Any]) -> str:
        return cl.get_query_string(filters, [f"{field}__"])

    year, month, day = (_int(cl.params.get(names[part])) for part in ("year", "month", "day"))
    if year and month and day:
        chosen = date(year, month, day)
        return {
            "show": True,
            "back": {"link": link({names["year"]: year, names["month"]: month}),
                     "title": capfirst(formats.date_format(chosen, "YEAR_MONTH_FORMAT"))},
            "choices": [{"title": capfirst(formats.date_format(chosen, "MONTH_DAY_FORMAT"))}],
        }
    bounds = date_bounds(cl)
    if bounds is None:
        return {"show": False}
    first, last = bounds
    if not year and first.year == last.year:
        year = first.year
        month = month or (first.month if first.month == last.month else None)
    if year and month:
        return {
            "show": True,
            "back": {"link": link({names["year"]: year}), "title": str(year)},
            "choices": [
                {"link": link({names["year"]: year, names["month"]: month, names["day"]: d.day}),
                 "title": capfirst(formats.date_format(d, "MONTH_DAY_FORMAT"))}
                for d in days_between(year, month, first, last)
            ],
        }
    if year:
        return {
            "show": True,
            "back": {"link": link({}), "title": _("All dates")},
            "choices": [
                {"link": link({names["year"]: year, names["month"]: m.month}),
                 "title": capfirst(formats.date_format(m, "YEAR_MONTH_FORMAT"))}
                for m in months_between(year, first, last)
            ],
        }
    return {
        "show": True,
        "back": None,
        "choices": [{"link": link({names["year"]: str(y)}), "title": str(y)}
                    for y in range(first.year, last.year + 1)],
    }


def months_between(year: int, first: date, last: date) -> list[date]:
    start = first.month if year == first.year else 1
    end = last.month if year == last.year else 12
    return [date(year, m, 1) for m in range(start, end + 1)] if first.year <= year <= last.year else []


def days_between(year: int, month: int, first: date, last: date) -> list[date]:
    if not (first.year, first.month) <= (year, month) <= (last.year, last.month):
        return []
    start = first.day if (year, month) == (first.year, first.month) else 1
    end = last.day if (year, month) == (last.year, last.month) else calendar.monthrange(year, month)[1]
    return [date(year, month, d) for d in range(start, end + 1)]


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
