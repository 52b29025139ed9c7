"""Progress on a terminal for long work (audit export and verify, backup and restore): a spinner on
stderr with `rich` where it is installed and stderr is a terminal, nothing at all in a pipe."""

from __future__ import annotations

import sys
from typing import Any


class Progress:
    """A spinner with a count on a terminal (stderr), nothing at all in a pipe."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._status: Any = None

    def __enter__(self) -> Progress:
        if sys.stderr.isatty():
            try:
                from rich.console import Console
            except ImportError:  # rich is optional: no progress, the summary line still comes
                return self
            self._status = Console(stderr=True).status(f"{self.what}...")
            self._status.start()
        return self

    def update(self, count: int) -> None:
        if self._status is not None:
            self._status.update(f"{self.what}: {count}")

    def __exit__(self, *exc: object) -> None:
        if self._status is not None:
            self._status.stop()
