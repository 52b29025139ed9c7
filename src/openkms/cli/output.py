"""`--output json|text|table` and `--query` (JMESPath), as the AWS CLI prints results.

json is the default (indented, keys sorted: what `openkms admin` always printed). text is the
AWS CLI's tab-separated format (a port of awscli/text.py, Apache-2.0): a dict's scalar values
on one line in key order, prefixed by the upper-cased key it was found under; lists of dicts one
line per element. table draws the same data in boxes, one table per nested level.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, TextIO

import jmespath
import jmespath.exceptions
from jmespath.parser import ParsedResult

FORMATS = ("json", "text", "table")


def compile_query(expression: str) -> ParsedResult:
    """An argparse type: a bad expression is refused before any request is made."""
    try:
        return jmespath.compile(expression)
    except jmespath.exceptions.JMESPathError as exc:
        first = str(exc).splitlines()[0]
        raise argparse.ArgumentTypeError(f"bad JMESPath expression {expression!r}: {first}") from None


def output_format(args: argparse.Namespace) -> str:
    chosen = getattr(args, "output", None) or os.environ.get("AWS_DEFAULT_OUTPUT") or "json"
    if chosen not in FORMATS:
        from .common import CliError

        raise CliError(f"bad output format {chosen!r} (AWS_DEFAULT_OUTPUT): json, text or table")
    return str(chosen)


def apply_query(args: argparse.Namespace, data: Any) -> Any:
    query: ParsedResult | None = getattr(args, "query", None)
    return data if query is None else query.search(data)


def write(data: Any, fmt: str, out: TextIO, title: str = "", compact: bool = False) -> None:
    if fmt == "json":
        if compact:
            out.write(json.dumps(data, sort_keys=True) + "\n")
        elif data is not None:  # as the AWS CLI: a query that selects nothing prints nothing
            out.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    elif fmt == "text":
        if data is not None:
            _text(data, out)
    else:
        out.write("".join(_table(title, data)))


# -- text (after awscli/text.py) ----------------------------------------------------------------------


def _text(item: Any, out: TextIO, identifier: str | None = None, scalar_keys: list[str] | None = None) -> None:
    if isinstance(item, dict):
        scalars, nested = _partition(item, scalar_keys)
        if scalars:
            out.write("\t".join(([identifier.upper()] if identifier is not None else []) + scalars) + "\n")
        for key, value in nested:
            _text(value, out, key)
    elif isinstance(item, list):
        if any(isinstance(e, dict) for e in item):
            keys = sorted({k for e in item if isinstance(e, dict) for k, v in e.items()
                           if not isinstance(v, (dict, list))})
            for element in item:
                _text(element, out, identifier, keys)
        else:
            plain = [e for e in item if not isinstance(e, list)]
            if plain:
                if identifier is not None:
                    out.writelines(f"{identifier.upper()}\t{_scalar(e)}\n" for e in plain)
                else:
                    out.write("\t".join(_scalar(e) for e in plain) + "\n")
            for element in item:
                if isinstance(element, list):
                    _text(element, out, identifier)
    else:
        out.write(_scalar(item) + "\n")


def _scalar(value: Any) -> str:
    return str(value)


def _partition(item: dict[str, Any], scalar_keys: list[str] | None) -> tuple[list[str], list[tuple[str, Any]]]:
    if scalar_keys is None:
        scalars = [_scalar(v) for _, v in sorted(item.items()) if not isinstance(v, (dict, list))]
        nested = [(k, v) for k, v in sorted(item.items()) if isinstance(v, (dict, list))]
    else:
        scalars = [_scalar(item.get(k, "")) for k in scalar_keys]
        nested = [(k, item[k]) for k in sorted(set(item) - set(scalar_keys))]
    return scalars, nested


# -- table ---------------------------------------------------------------------------------------------


def _box(title: str, header: list[str] | None, rows: list[list[str]]) -> list[str]:
    columns = max([len(header or [])] + [len(r) for r in rows] + [1])
    cells = ([header] if header else []) + rows
    widths = [max([len(r[i]) if i < len(r) else 0 for r in cells] + [1]) for i in range(columns)]
    inner = sum(w + 4 for w in widths) + columns - 1
    if title and len(title) + 4 > inner:  # widen the last column to fit the title
        widths[-1] += len(title) + 4 - inner
        inner = len(title) + 4
    rule = "+" + "+".join("-" * (w + 4) for w in widths) + "+\n"
    lines = []
    if title:
        lines += ["-" * (inner + 2) + "\n", "|" + title.center(inner) + "|\n"]
    if not header and not rows:  # a title over the tables of its members
        return lines
    lines.append(rule)

    def line(row: list[str]) -> str:
        padded = row + [""] * (columns - len(row))
        return "|" + "|".join(f"  {c.ljust(w)}  " for c, w in zip(padded, widths, strict=True)) + "|\n"

    if header:
        lines += [line(header), rule]
    lines += [line(r) for r in rows]
    if rows:
        lines.append(rule)
    return lines


def _table(title: str, data: Any) -> list[str]:
    if isinstance(data, dict):
        scalars = [[k, _scalar(v)] for k, v in sorted(data.items()) if not isinstance(v, (dict, list))]
        lines = _box(title, None, scalars) if scalars or title else []
        for key, value in sorted(data.items()):
            if isinstance(value, (dict, list)):
                lines += _table(key, value)
        return lines
    if isinstance(data, list):
        if any(isinstance(e, dict) for e in data):
            keys = sorted({k for e in data if isinstance(e, dict) for k, v in e.items()
                           if not isinstance(v, (dict, list))})
            rows = [[_scalar(e.get(k, "")) for k in keys] if isinstance(e, dict) else [_scalar(e)] for e in data]
            lines = _box(title, keys, rows)
            for element in data:
                if isinstance(element, dict):
                    for key, value in sorted(element.items()):
                        if isinstance(value, (dict, list)):
                            lines += _table(key, value)
            return lines
        return _box(title, None, [[_scalar(e)] for e in data if not isinstance(e, list)])
    if data is None:
        return []
    return _box(title, None, [[_scalar(data)]])
