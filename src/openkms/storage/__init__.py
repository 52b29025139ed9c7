"""Database access. SQLite by default, PostgreSQL for shared deployments."""

from .store import Store, Tx

__all__ = ["Store", "Tx"]
