"""The ``Condition`` element: IAM condition operators, compiled once, evaluated per request.

Semantics (IAM JSON policy reference, "Condition operators" and "multivalued context keys"):

* A ``Condition`` block is ``{operator: {key: value-or-list}}``. Every (operator, key) pair must be
  true (AND across operators and across keys); the values listed for one key are ORed.
* Condition key names are case-insensitive: ``aws:SourceIp`` and ``AWS:sourceip`` are the same key.
  That includes the part after ``kms:EncryptionContext:`` (the KMS guide says the whole condition
  key "is not case sensitive"), ``aws:ResourceTag/`` and ``aws:RequestTag/``. Whether *values*
  compare case-sensitively is up to the operator.
* Negated operators (``StringNotEquals``, ``StringNotLike``, ``NumericNotEquals``,
  ``DateNotEquals``, ``NotIpAddress``, ``ArnNotEquals``, ``ArnNotLike``,
  ``StringNotEqualsIgnoreCase``) are exactly NOT of their positive twin: true when no request value
  matches any policy value -- so they are true when the key is missing.
* Positive operators are false when the key is missing.
* ``...IfExists``: a missing key makes the condition true; a present key is tested normally.
* ``Null``: ``true`` means the key must be absent, ``false`` that it must be present.
* ``ForAnyValue:`` true when at least one request value matches; false on a missing/empty key.
  ``ForAllValues:`` true when every request value matches; true on a missing/empty key. With a
  negated operator, "matches" means "matches none of the policy values".
* A multi-valued request key under a plain (no set prefix) operator is tested like ``ForAnyValue``
  for positive operators and as NOT(any value matches) for negated ones. (IAM tells authors to use a
  set operator with multi-valued keys and does not document this case; this is the reading that
  keeps "negated = NOT positive".) An empty list of request values counts as a missing key.

Operator names and the ``ForAllValues:``/``ForAnyValue:`` prefixes are accepted in any case.
Policy values are strings, numbers or booleans (numbers and booleans are turned into their JSON
text, as IAM does); values that cannot mean anything for the operator (a bad CIDR, date, number,
or a ``Bool``/``Null`` value other than true/false) make the document malformed. Policy variables
(``${aws:username}``) are not substituted: such values compare literally.
"""

from __future__ import annotations

import base64
import binascii
import enum
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any

from ..errors import MalformedPolicyDocumentException
from .wildcard import Glob, GlobSet

#: The values of one condition key in a request, or None when the request does not carry the key.
Values = tuple[str, ...] | None

Test = Callable[[str], bool]


class SetOperator(enum.Enum):
    NONE = ""
    FOR_ALL_VALUES = "ForAllValues"
    FOR_ANY_VALUE = "ForAnyValue"


@dataclass(frozen=True, slots=True)
class Condition:
    """One (operator, key) pair of a Condition block, with its policy values compiled.

    ``test`` is the positive base test of one request value against all the policy values (ORed);
    ``negated``, ``set_operator``, ``if_exists`` and ``null`` say how to combine it.
    """

    operator: str
    key: str
    values: tuple[str, ...]
    set_operator: SetOperator
    if_exists: bool
    negated: bool
    null: bool | None  # for Null: True = the key must be absent, False = it must be present
    test: Test

    def holds(self, values: Values) -> bool:
        """Whether the condition is true for the request values of its key (None: key missing)."""
        if self.null is not None:
            return (values is None) is self.null
        if values is None:
            if self.if_exists or self.set_operator is SetOperator.FOR_ALL_VALUES:
                return True
            if self.set_operator is SetOperator.FOR_ANY_VALUE:
                return False
            return self.negated
        test, negated = self.test, self.negated
        if self.set_operator is SetOperator.NONE:
            if len(values) == 1:  # the common case, without a generator
                return test(values[0]) is not negated
            return any(test(v) for v in values) is not negated
        if self.set_operator is SetOperator.FOR_ALL_VALUES:
            return all(test(v) is not negated for v in values)
        return any(test(v) is not negated for v in values)


# --- parsing of values that are not plain strings ---------------------------------------------

_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?\Z")
_EPOCH_RE = re.compile(r"-?\d+(?:\.\d+)?\Z")
_YEAR_MONTH_RE = re.compile(r"(\d{4})-(\d{2})\Z")


@lru_cache(maxsize=4096)
def parse_number(text: str) -> Decimal | None:
    """An integer or decimal number (Decimal, so large integers compare exactly), else None."""
    text = text.strip()
    if not _NUMBER_RE.match(text):
        return None
    try:
        return Decimal(text)
    except InvalidOperation:  # pragma: no cover - the regex admits only valid literals
        return None


@lru_cache(maxsize=4096)
def parse_date(text: str) -> float | None:
    """A point in time as POSIX seconds, else None.

    Accepts epoch seconds (all digits, optionally with a fraction) and the W3C profiles of ISO 8601
    (``2020-01``, ``2020-01-01``, ``2020-01-01T00:00Z``, ``2020-01-01T00:00:01.5+02:00``, ...).
    A time without a zone is taken as UTC. A bare four-digit year is read as epoch seconds.
    """
    text = text.strip()
    if _EPOCH_RE.match(text):
        return float(text)
    ym = _YEAR_MONTH_RE.match(text)
    try:
        if ym:
            moment = datetime(int(ym.group(1)), int(ym.group(2)), 1, tzinfo=UTC)
        else:
            moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        return moment.timestamp()
    except (OverflowError, ValueError):  # pragma: no cover - extreme years on some platforms
        return None


@lru_cache(maxsize=4096)
def parse_ip(text: str) -> tuple[int, int] | None:
    """An IP address as (version, integer), else None."""
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    return address.version, int(address)


def _b64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


# --- compilers: policy values -> positive test of one request value ---------------------------


def _malformed(operator: str, key: str, why: str) -> MalformedPolicyDocumentException:
    return MalformedPolicyDocumentException(f"Condition {operator} on key {key}: {why}")


def _string_equals(values: tuple[str, ...], op: str, key: str) -> Test:
    wanted = frozenset(values)
    return wanted.__contains__


def _string_equals_ignore_case(values: tuple[str, ...], op: str, key: str) -> Test:
    wanted = frozenset(v.casefold() for v in values)
    return lambda v: v.casefold() in wanted


def _string_like(values: tuple[str, ...], op: str, key: str) -> Test:
    return GlobSet(values).matches_folded


def _ordered(parse: Callable[[str], Any], what: str
             ) -> Callable[[Callable[[Any, Any], bool]], Callable[[tuple[str, ...], str, str], Test]]:
    """Operators that compare parsed values (Numeric*, Date*): policy values are parsed once at
    compile time; a request value that does not parse never matches."""
    def operator(compare: Callable[[Any, Any], bool]) -> Callable[[tuple[str, ...], str, str], Test]:
        def compile_ordered(values: tuple[str, ...], op: str, key: str) -> Test:
            bounds = []
            for value in values:
                parsed = parse(value)
                if parsed is None:
                    raise _malformed(op, key, f"{value!r} is not {what}")
                bounds.append(parsed)

            def test(v: str) -> bool:
                parsed = parse(v)
                return parsed is not None and any(compare(parsed, b) for b in bounds)

            return test

        return compile_ordered

    return operator


_numeric = _ordered(parse_number, "a number")
_date = _ordered(parse_date, "an ISO 8601 date or epoch time")


def _bool(values: tuple[str, ...], op: str, key: str) -> Test:
    wanted = set()
    for value in values:
        if value.lower() not in ("true", "false"):
            raise _malformed(op, key, f"{value!r} is not true or false")
        wanted.add(value.lower())
    frozen = frozenset(wanted)
    return lambda v: v.lower() in frozen


def _ip(values: tuple[str, ...], op: str, key: str) -> Test:
    ranges: list[tuple[int, int, int]] = []  # (version, first, last) as integers
    for value in values:
        try:
            network = ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            raise _malformed(op, key, f"{value!r} is not an IP address or CIDR block") from None
        ranges.append((network.version, int(network.network_address), int(network.broadcast_address)))

    def test(v: str) -> bool:
        address = parse_ip(v)
        if address is None:
            return False
        version, number = address
        return any(v == version and first <= number <= last for v, first, last in ranges)

    return test


class _ArnPattern:
    """``ArnLike``/``ArnEquals``: each of the six colon-separated ARN parts matched on its own.

    A ``*`` or ``?`` cannot reach across a colon in the first five parts; the sixth (the resource
    part) may itself contain colons. A policy value with fewer than six parts (``*``) is matched
    as one wildcard pattern over the whole value.
    """

    __slots__ = ("parts", "whole")

    def __init__(self, pattern: str) -> None:
        split = pattern.split(":", 5)
        self.whole = Glob(pattern) if len(split) < 6 else None
        self.parts = tuple(Glob(p) for p in split) if len(split) == 6 else ()

    def matches(self, value: str) -> bool:
        if self.whole is not None:
            return self.whole.matches(value)
        split = value.split(":", 5)
        return len(split) == 6 and all(g.matches(s) for g, s in zip(self.parts, split, strict=True))


def _arn(values: tuple[str, ...], op: str, key: str) -> Test:
    patterns = tuple(_ArnPattern(v) for v in values)
    return lambda v: any(p.matches(v) for p in patterns)


def _binary(values: tuple[str, ...], op: str, key: str) -> Test:
    wanted = set()
    for value in values:
        decoded = _b64(value)
        if decoded is None:
            raise _malformed(op, key, f"{value!r} is not base64")
        wanted.add(decoded)
    frozen = frozenset(wanted)

    def test(v: str) -> bool:
        decoded = _b64(v)
        return decoded is not None and decoded in frozen

    return test


def _never(value: str) -> bool:  # pragma: no cover - Null conditions test presence, not values
    return False


def _null(values: tuple[str, ...], op: str, key: str) -> Test:
    return _never


Compiler = Callable[[tuple[str, ...], str, str], Test]

#: operator name (lower-case) -> (canonical name, compiler, negated)
OPERATORS: Mapping[str, tuple[str, Compiler, bool]] = {
    name.lower(): (name, compiler, negated)
    for name, compiler, negated in (
        ("StringEquals", _string_equals, False),
        ("StringNotEquals", _string_equals, True),
        ("StringEqualsIgnoreCase", _string_equals_ignore_case, False),
        ("StringNotEqualsIgnoreCase", _string_equals_ignore_case, True),
        ("StringLike", _string_like, False),
        ("StringNotLike", _string_like, True),
        ("NumericEquals", _numeric(lambda a, b: a == b), False),
        ("NumericNotEquals", _numeric(lambda a, b: a == b), True),
        ("NumericLessThan", _numeric(lambda a, b: a < b), False),
        ("NumericLessThanEquals", _numeric(lambda a, b: a <= b), False),
        ("NumericGreaterThan", _numeric(lambda a, b: a > b), False),
        ("NumericGreaterThanEquals", _numeric(lambda a, b: a >= b), False),
        ("DateEquals", _date(lambda a, b: a == b), False),
        ("DateNotEquals", _date(lambda a, b: a == b), True),
        ("DateLessThan", _date(lambda a, b: a < b), False),
        ("DateLessThanEquals", _date(lambda a, b: a <= b), False),
        ("DateGreaterThan", _date(lambda a, b: a > b), False),
        ("DateGreaterThanEquals", _date(lambda a, b: a >= b), False),
        ("Bool", _bool, False),
        ("BinaryEquals", _binary, False),
        ("IpAddress", _ip, False),
        ("NotIpAddress", _ip, True),
        ("ArnEquals", _arn, False),
        ("ArnLike", _arn, False),
        ("ArnNotEquals", _arn, True),
        ("ArnNotLike", _arn, True),
        ("Null", _null, False),
    )
}

_SET_PREFIXES = {"forallvalues": SetOperator.FOR_ALL_VALUES, "foranyvalue": SetOperator.FOR_ANY_VALUE}
_IF_EXISTS = "ifexists"


def _value_text(value: object, operator: str, key: str) -> str:
    """A JSON scalar as IAM sees it: strings as they are, numbers and booleans as their JSON text."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    raise _malformed(operator, key, "values must be strings, numbers or booleans")


def compile_operator(name: str) -> tuple[str, Compiler, bool, SetOperator, bool]:
    """Split ``ForAnyValue:StringLikeIfExists`` into its parts: (canonical base name, compiler,
    negated, set operator, if_exists). Unknown operators make the document malformed."""
    set_operator = SetOperator.NONE
    base = name
    if ":" in name:
        prefix, base = name.split(":", 1)
        if prefix.lower() not in _SET_PREFIXES:
            raise MalformedPolicyDocumentException(f"Unknown condition set operator: {prefix!r} in {name!r}")
        set_operator = _SET_PREFIXES[prefix.lower()]
    lowered = base.lower()
    if_exists = False
    if lowered not in OPERATORS and lowered.endswith(_IF_EXISTS):
        lowered = lowered[: -len(_IF_EXISTS)]
        if_exists = True
    if lowered not in OPERATORS:
        raise MalformedPolicyDocumentException(f"Unknown condition operator: {name!r}")
    canonical, compiler, negated = OPERATORS[lowered]
    if canonical == "Null" and (if_exists or set_operator is not SetOperator.NONE):
        raise MalformedPolicyDocumentException(
            f"Condition operator {name!r}: Null takes neither IfExists nor a set operator"
        )
    return canonical, compiler, negated, set_operator, if_exists


def compile_condition_block(block: object) -> tuple[Condition, ...]:
    """Compile a statement's ``Condition`` element (a JSON object) into its conditions."""
    if not isinstance(block, dict):
        raise MalformedPolicyDocumentException("Condition must be a JSON object")
    conditions: list[Condition] = []
    for operator, pairs in block.items():
        canonical, compiler, negated, set_operator, if_exists = compile_operator(operator)
        if not isinstance(pairs, dict):
            raise MalformedPolicyDocumentException(f"Condition {operator}: must map condition keys to values")
        for key, raw in pairs.items():
            if not key:
                raise MalformedPolicyDocumentException(f"Condition {operator}: empty condition key")
            listed = raw if isinstance(raw, list) else [raw]
            if not listed:
                raise _malformed(operator, key, "no values")
            values = tuple(_value_text(v, operator, key) for v in listed)
            if canonical == "Null":
                flags = {v.lower() for v in values}
                if not flags <= {"true", "false"} or len(flags) != 1:
                    raise _malformed(operator, key, "Null takes exactly one of true or false")
                null: bool | None = flags == {"true"}
                test: Test = _never
            else:
                null = None
                test = compiler(values, operator, key)
            conditions.append(
                Condition(
                    operator=operator,
                    key=key.lower(),
                    values=values,
                    set_operator=set_operator,
                    if_exists=if_exists,
                    negated=negated,
                    null=null,
                    test=test,
                )
            )
    return tuple(conditions)
