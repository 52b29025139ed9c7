"""Rotation schedules, as RotateSecret's RotationRules give them (AWS's rules and formats).

- AutomaticallyAfterDays N (1-1000): the next rotation N days after the last one.
- ScheduleExpression `rate(N hours)` (at least 4 hours) or `rate(N days)` (1-1000 days), or
  `cron(minutes hours day-of-month month day-of-week year)` in UTC, AWS's
  EventBridge form: `*`, lists `a,b`, ranges `a-b`, steps `a/n` and `*/n`, month names JAN-DEC,
  day names SUN-SAT (1 = Sunday), and `?` in exactly one of day-of-month and day-of-week. `L`,
  `W` and `#` are refused (InvalidParameterException) rather than approximated.
- Duration `Nh` (1-24 hours): the window a rotation may start in; kept and shown, and shorter than
  the interval between rotations.

AutomaticallyAfterDays and ScheduleExpression exclude each other. `next_time` gives the first
moment after a given one; openkms rotates at that moment (AWS picks a random time in the window).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from ..errors import InvalidParameterException

RATE_RE = re.compile(r"^rate\((\d{1,5}) (hour|hours|day|days)\)$")
CRON_RE = re.compile(r"^cron\(([^)]*)\)$")
DURATION_RE = re.compile(r"^(\d{1,2})h$")
MONTHS = {m: i + 1 for i, m in enumerate(
    ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"])}
DAYS = {d: i + 1 for i, d in enumerate(["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"])}
HORIZON_DAYS = 5 * 366  # a cron expression that matches nothing sooner matches nothing


@dataclass(frozen=True)
class Cron:
    minutes: frozenset[int]
    hours: frozenset[int]
    days_of_month: frozenset[int] | None  # None: `?`
    months: frozenset[int]
    days_of_week: frozenset[int] | None  # 1 = Sunday; None: `?`
    years: frozenset[int] | None  # None: every year

    def next_after(self, moment: datetime) -> datetime | None:
        start = moment.astimezone(UTC).replace(second=0, microsecond=0) + timedelta(minutes=1)
        day = start.date()
        for _ in range(HORIZON_DAYS):
            if self._day_matches(day):
                first = (start.hour, start.minute) if day == start.date() else (0, 0)
                for hour in sorted(self.hours):
                    for minute in sorted(self.minutes):
                        if (hour, minute) >= first:
                            return datetime(day.year, day.month, day.day, hour, minute, tzinfo=UTC)
            day += timedelta(days=1)
        return None

    def _day_matches(self, day: Any) -> bool:
        if day.month not in self.months or (self.years is not None and day.year not in self.years):
            return False
        if self.days_of_month is not None:
            return day.day in self.days_of_month
        assert self.days_of_week is not None
        return (day.isoweekday() % 7) + 1 in self.days_of_week  # isoweekday: Monday 1 .. Sunday 7


def _bad(expression: str, why: str) -> InvalidParameterException:
    return InvalidParameterException(f"Invalid ScheduleExpression {expression!r}: {why}.")


def _field(text: str, low: int, high: int, names: dict[str, int], expression: str) -> frozenset[int]:
    out: set[int] = set()
    for part in text.split(","):
        if any(c in part for c in "LW#"):
            raise _bad(expression, "L, W and # are not supported by this server")
        base, _, step_text = part.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) == 0:
                raise _bad(expression, f"bad step in {part!r}")
            step = int(step_text)
        if base == "*":
            first, last = low, high
        else:
            first_text, dash, last_text = base.partition("-")
            first = _value(first_text, low, high, names, expression)
            last = _value(last_text, low, high, names, expression) if dash else (high if step_text else first)
            if last < first:
                raise _bad(expression, f"the range {part!r} runs backwards")
        out.update(range(first, last + 1, step))
    return frozenset(out)


def _value(text: str, low: int, high: int, names: dict[str, int], expression: str) -> int:
    value = names.get(text.upper()) if not text.isdigit() else int(text)
    if value is None or not low <= value <= high:
        raise _bad(expression, f"{text!r} is not a value from {low} to {high}")
    return value


def parse_cron(expression: str) -> Cron:
    found = CRON_RE.match(expression)
    if found is None:
        raise _bad(expression, "it is not cron(...)")
    parts = found.group(1).split()
    if len(parts) != 6:
        raise _bad(expression, "cron() takes six fields: minutes hours day-of-month month day-of-week year")
    minute, hour, dom, month, dow, year = parts
    if (dom == "?") == (dow == "?"):
        raise _bad(expression, "give ? in exactly one of day-of-month and day-of-week")
    return Cron(
        minutes=_field(minute, 0, 59, {}, expression),
        hours=_field(hour, 0, 23, {}, expression),
        days_of_month=None if dom == "?" else _field(dom, 1, 31, {}, expression),
        months=_field(month, 1, 12, MONTHS, expression),
        days_of_week=None if dow == "?" else _field(dow, 1, 7, DAYS, expression),
        years=None if year == "*" else _field(year, 1970, 2199, {}, expression))


def _interval(rules: dict[str, Any]) -> timedelta | None:
    days = rules.get("AutomaticallyAfterDays")
    if days is not None:
        return timedelta(days=int(days))
    found = RATE_RE.match(str(rules.get("ScheduleExpression") or ""))
    if found is None:
        return None
    n = int(found.group(1))
    return timedelta(hours=n) if found.group(2).startswith("hour") else timedelta(days=n)


def check_rules(rules: dict[str, Any]) -> dict[str, Any]:
    """RotationRules as given, checked (InvalidParameterException); only the members that are set."""
    out = {k: v for k, v in rules.items() if v is not None}
    days, expression, duration = out.get("AutomaticallyAfterDays"), out.get("ScheduleExpression"), out.get("Duration")
    if days is not None and expression is not None:
        raise InvalidParameterException("You can't specify both AutomaticallyAfterDays and ScheduleExpression.")
    if days is not None and not 1 <= int(days) <= 1000:
        raise InvalidParameterException("AutomaticallyAfterDays must be from 1 to 1000.")
    if expression is not None:
        found = RATE_RE.match(expression)
        if found is not None:
            n, unit = int(found.group(1)), found.group(2)
            if unit.startswith("hour") and not 4 <= n <= 24000:
                raise _bad(expression, "a rate in hours must be at least 4 hours")
            if unit.startswith("day") and not 1 <= n <= 1000:
                raise _bad(expression, "a rate in days must be from 1 to 1000 days")
        else:
            parse_cron(expression)
    if duration is not None:
        found = DURATION_RE.match(str(duration))
        if found is None or not 1 <= int(found.group(1)) <= 24:
            raise InvalidParameterException(f"Invalid Duration {duration!r}: give 1h to 24h.")
        interval = _interval(out)
        if interval is not None and timedelta(hours=int(found.group(1))) >= interval:
            raise InvalidParameterException("The rotation window (Duration) must be shorter than the time between "
                                            "rotations.")
    if days is None and expression is None:
        raise InvalidParameterException("RotationRules needs AutomaticallyAfterDays or ScheduleExpression.")
    return out


def next_time(rules: dict[str, Any], after: datetime) -> datetime | None:
    """When the next rotation is due, after `after` (a rotation, or enabling rotation)."""
    interval = _interval(rules)
    if interval is not None:
        return after + interval
    expression = rules.get("ScheduleExpression")
    return parse_cron(str(expression)).next_after(after) if expression else None
