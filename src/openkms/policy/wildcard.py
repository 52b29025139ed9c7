"""IAM wildcard patterns (``*`` any run of characters, ``?`` exactly one), matched without regex.

A pattern is split at its ``*`` into fixed-width pieces. The first piece must sit at the start, the
last at the end, and each middle piece is found at its leftmost position after the previous one;
for ``*``-only globs the leftmost choice is always safe, so matching costs O(len(value) x
len(pattern)) in the worst case and never backtracks exponentially, whatever a policy author
writes. Pieces without ``?`` use plain ``str`` operations; pieces with ``?`` use a fixed-width
regex (no quantifiers, so no backtracking either).
"""

from __future__ import annotations

import re
from collections.abc import Iterable


def _piece_regex(piece: str) -> re.Pattern[str]:
    return re.compile("".join("." if ch == "?" else re.escape(ch) for ch in piece), re.DOTALL)


class _Piece:
    """A run of literal characters and ``?``; knows how to match at, end at, or find itself."""

    __slots__ = ("regex", "size", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.size = len(text)
        self.regex = _piece_regex(text) if "?" in text else None

    def at(self, value: str, pos: int) -> bool:
        if self.regex is None:
            return value.startswith(self.text, pos)
        return self.regex.match(value, pos) is not None

    def find(self, value: str, start: int, end: int) -> int:
        if self.regex is None:
            return value.find(self.text, start, end)
        found = self.regex.search(value, start, end)
        return -1 if found is None else found.start()


class Glob:
    """One wildcard pattern. ``fold=True`` compares case-insensitively (lower-cases both sides)."""

    __slots__ = ("fold", "head", "middle", "min_size", "pattern", "star", "tail")

    def __init__(self, pattern: str, *, fold: bool = False) -> None:
        self.pattern = pattern
        self.fold = fold
        text = pattern.lower() if fold else pattern
        pieces = text.split("*")
        self.star = len(pieces) > 1
        self.head = _Piece(pieces[0])
        self.tail = _Piece(pieces[-1]) if self.star else None
        self.middle = tuple(_Piece(p) for p in pieces[1:-1] if p)
        self.min_size = sum(len(p) for p in pieces)

    def matches(self, value: str) -> bool:
        """Whether ``value`` matches the whole pattern (already lower-cased if ``fold``)."""
        if not self.star:
            return len(value) == self.head.size and self.head.at(value, 0)
        if len(value) < self.min_size or not self.head.at(value, 0):
            return False
        assert self.tail is not None
        end = len(value) - self.tail.size
        if not self.tail.at(value, end):
            return False
        pos = self.head.size
        for piece in self.middle:
            found = piece.find(value, pos, end)
            if found < 0:
                return False
            pos = found + piece.size
        return True


class GlobSet:
    """A set of wildcard patterns ORed together: literals by hash lookup, the rest one by one.

    ``fold=True`` makes it case-insensitive; callers pass values already lower-cased (the request
    context lower-cases the action once) or use :meth:`matches`, which folds for them.
    """

    __slots__ = ("everything", "fold", "globs", "literals", "patterns", "prefixes")

    def __init__(self, patterns: Iterable[str], *, fold: bool = False) -> None:
        self.patterns = tuple(patterns)
        self.fold = fold
        literals: set[str] = set()
        prefixes: list[str] = []  # "kms:Encrypt*": one str.startswith call covers them all
        globs: list[Glob] = []
        everything = False
        for pattern in self.patterns:
            text = pattern.lower() if fold else pattern
            if pattern == "*":
                everything = True
            elif "?" not in text and "*" not in text:
                literals.add(text)
            elif "?" not in text and text.index("*") == len(text) - 1:
                prefixes.append(text[:-1])
            else:
                globs.append(Glob(pattern, fold=fold))
        self.everything = everything
        self.literals = frozenset(literals)
        self.prefixes = tuple(prefixes)
        self.globs = tuple(globs)

    def matches_folded(self, value: str) -> bool:
        """Match a value that is already lower-cased when the set folds case."""
        if self.everything or value in self.literals or value.startswith(self.prefixes):
            return True
        return any(g.matches(value) for g in self.globs) if self.globs else False

    def matches(self, value: str) -> bool:
        return self.matches_folded(value.lower() if self.fold else value)

    def __repr__(self) -> str:
        return f"GlobSet({list(self.patterns)!r})"
