"""The audit log: one CloudTrail-shaped record per API call, hash-chained, signed, never lost.

- record.py  builds the record of a call (no plaintext, key material or secrets in it)
- log.py     the append-only chain and its group-commit writer; signed digests
- usage.py   last cryptographic use of each key (GetKeyLastUsage), kept off the hot path
- verify.py  checks chains, digests and archives, and says exactly what is wrong
"""
