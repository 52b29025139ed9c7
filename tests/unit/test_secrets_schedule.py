"""Rotation schedules (secrets/schedule.py): AWS's RotationRules, checked, and the next rotation
time of rate() and cron() expressions, against a minute-by-minute search."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openkms.errors import InvalidParameterException
from openkms.secrets.schedule import Cron, check_rules, next_time, parse_cron

T0 = datetime(2026, 12, 1, 10, 30, 15, tzinfo=UTC)  # a Tuesday


def test_automatically_after_days_and_rates() -> None:
    assert next_time({"AutomaticallyAfterDays": 30}, T0) == T0 + timedelta(days=30)
    assert next_time({"ScheduleExpression": "rate(10 days)"}, T0) == T0 + timedelta(days=10)
    assert next_time({"ScheduleExpression": "rate(4 hours)"}, T0) == T0 + timedelta(hours=4)
    assert next_time({"ScheduleExpression": "rate(1 day)"}, T0) == T0 + timedelta(days=1)


@pytest.mark.parametrize(("expression", "expected"), [
    ("cron(0 16 1,15 * ? *)", datetime(2026, 12, 1, 16, 0, tzinfo=UTC)),  # later today, the 1st
    ("cron(0 9 1,15 * ? *)", datetime(2026, 12, 15, 9, 0, tzinfo=UTC)),
    ("cron(0 8 ? * MON-FRI *)", datetime(2026, 12, 2, 8, 0, tzinfo=UTC)),  # Wednesday
    ("cron(45 10 ? * TUE *)", datetime(2026, 12, 1, 10, 45, tzinfo=UTC)),  # later the same day
    ("cron(30 10 ? * TUE *)", datetime(2026, 12, 8, 10, 30, tzinfo=UTC)),  # this minute has begun: next week
    ("cron(0 0 1 JAN ? *)", datetime(2027, 1, 1, 0, 0, tzinfo=UTC)),
    ("cron(*/20 * * * ? *)", datetime(2026, 12, 1, 10, 40, tzinfo=UTC)),
    ("cron(0 12 29 2 ? *)", datetime(2028, 2, 29, 12, 0, tzinfo=UTC)),  # the next leap day
    ("cron(0 12 ? * 1 2027)", datetime(2027, 1, 3, 12, 0, tzinfo=UTC)),  # 1 = Sunday
])
def test_cron_examples(expression: str, expected: datetime) -> None:
    check_rules({"ScheduleExpression": expression})
    assert next_time({"ScheduleExpression": expression}, T0) == expected


@pytest.mark.parametrize("rules", [
    {"AutomaticallyAfterDays": 30, "ScheduleExpression": "rate(30 days)"},
    {"AutomaticallyAfterDays": 0}, {"AutomaticallyAfterDays": 1001},
    {"ScheduleExpression": "rate(3 hours)"}, {"ScheduleExpression": "rate(0 days)"},
    {"ScheduleExpression": "rate(2 weeks)"}, {"ScheduleExpression": "every day"},
    {"ScheduleExpression": "cron(0 16 1 * * *)"},  # no ? in either day field
    {"ScheduleExpression": "cron(0 16 ? * ? *)"},  # ? in both
    {"ScheduleExpression": "cron(0 16 L * ? *)"}, {"ScheduleExpression": "cron(0 16 ? * 2#1 *)"},
    {"ScheduleExpression": "cron(60 16 1 * ? *)"}, {"ScheduleExpression": "cron(0 16 1 * ?)"},
    {"ScheduleExpression": "cron(0 20-10 1 * ? *)"}, {"ScheduleExpression": "cron(0 16 1 FOO ? *)"},
    {"AutomaticallyAfterDays": 1, "Duration": "24h"}, {"AutomaticallyAfterDays": 7, "Duration": "25h"},
    {"AutomaticallyAfterDays": 7, "Duration": "3d"}, {"Duration": "2h"}, {},
])
def test_bad_rules_are_invalid_parameters(rules: dict[str, object]) -> None:
    with pytest.raises(InvalidParameterException):
        check_rules(rules)


def test_good_rules_keep_what_was_given() -> None:
    assert check_rules({"AutomaticallyAfterDays": 7, "Duration": "3h", "ScheduleExpression": None}) == \
        {"AutomaticallyAfterDays": 7, "Duration": "3h"}


def _matches(c: Cron, moment: datetime) -> bool:
    """Whether `moment` matches, from the parsed fields (independently of next_after)."""
    dow = (moment.isoweekday() % 7) + 1  # 1 = Sunday
    day_ok = (c.days_of_month is None or moment.day in c.days_of_month) and \
        (c.days_of_week is None or dow in c.days_of_week)
    return moment.minute in c.minutes and moment.hour in c.hours and moment.month in c.months and day_ok


def _field(low: int, high: int) -> st.SearchStrategy[str]:
    value = st.integers(low, high).map(str)
    ranges = st.tuples(st.integers(low, high), st.integers(low, high)).map(
        lambda t: f"{min(t)}-{max(t)}")
    steps = st.tuples(st.sampled_from(["*", str(low)]), st.integers(1, max(1, (high - low) // 2))).map(
        lambda t: f"{t[0]}/{t[1]}")
    single = st.one_of(st.just("*"), value, ranges, steps)
    return st.lists(single, min_size=1, max_size=3).map(",".join)


@given(minute=_field(0, 59), hour=_field(0, 23), dow=_field(1, 7),
       start=st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2030, 1, 1)))
@settings(max_examples=60, deadline=None)
def test_next_cron_time_is_the_first_matching_minute(minute: str, hour: str, dow: str, start: datetime) -> None:
    """Day-of-week expressions match within a week: search minute by minute and compare."""
    after = start.replace(tzinfo=UTC)
    cron = parse_cron(f"cron({minute} {hour} ? * {dow} *)")
    got = cron.next_after(after)
    assert got is not None and got > after and _matches(cron, got)
    probe = after.replace(second=0, microsecond=0) + timedelta(minutes=1)
    while probe < got:  # nothing matched earlier
        assert not _matches(cron, probe), probe
        probe += timedelta(minutes=1) if probe.hour in cron.hours else timedelta(minutes=60 - probe.minute)
