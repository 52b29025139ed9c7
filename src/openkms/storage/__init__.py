"""Database access. SQLite by default, PostgreSQL for shared deployments.

store.py: the Store (engine, transactions, migrations, commit listeners) and Tx; repos.py: one
repository per aggregate and `Changes`; audit.py: the audit log's appender and repository;
schema.py: the tables.
"""

from .repos import Changes, from_ts, to_ts
from .store import Store, Tx, before_commit, normalize_url

__all__ = ["Changes", "Store", "Tx", "before_commit", "from_ts", "normalize_url", "to_ts"]
