"""Checks audit chains, digests and archives, and says exactly what is wrong.

For each node's chain, in sequence order (archived records first, then the store's):
- a record whose text does not hash to its stored hash was **altered**;
- a record that holds another sequence number than its place was **reordered** or records were
  **inserted**/renumbered before it;
- a gap in the sequence means records were **removed**;
- a record whose "prev" is not the hash of the record before it does not follow it (a record was
  removed, inserted or rewritten there);
- every digest's Ed25519 signature must verify with the audit public key, each digest must chain
  to the one before, and the record it names must exist with the hash it names: a digest naming
  records past the end of the chain means the log was **truncated**.
Records written after the newest digest are protected by the chain alone (a forger who can write
the store can append to it); digests are written every `audit_digest_interval` and at shutdown.
Verification needs the store (read only) and the public key, never the root key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..crypto import signing
from ..storage import Store
from .chain import GENESIS, index_columns
from .log import PUBLIC_KEY_META, digest_line


@dataclass
class Row:
    seq: int
    record: str
    hash: str
    # The stored query columns (event_time, then index_columns order); None for archived records.
    columns: tuple[Any, ...] | None = None


# The event_time column is the commit time; eventTime is the request's second. They differ by the
# batch's latency; a tampered time (hiding a record from a time-range query) differs by far more.
EVENT_TIME_TOLERANCE = 300.0
COLUMN_NAMES = ("event_time", "event_id", "event_name", "caller_account", "owner_account", "principal_arn",
                "key_id", "error_code")


@dataclass
class Digest:
    digest_seq: int
    body: str
    signature: bytes


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    records: int = 0
    digests: int = 0
    chains: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def archive_files(archive_dir: Path | None, node_id: str) -> list[Path]:
    if archive_dir is None or not archive_dir.is_dir():
        return []
    files = list(archive_dir.glob(f"{node_id}-*.jsonl"))
    return sorted(files, key=lambda p: int(p.stem.split("-")[-2]))


def read_archive(path: Path) -> Iterator[Row | Digest]:
    with path.open() as f:
        for line in f:
            item = json.loads(line)
            if item["type"] == "record":
                yield Row(item["seq"], item["record"], item["hash"])
            else:
                yield Digest(item["digest_seq"], item["body"], base64.b64decode(item["signature"]))


def _wrong_columns(event: dict[str, Any], columns: tuple[Any, ...]) -> list[str]:
    wrong = [name for name, stored, expected in zip(COLUMN_NAMES[1:], columns[1:], index_columns(event), strict=True)
             if stored != expected]
    try:
        event_second = datetime.strptime(event["eventTime"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
        if abs(float(columns[0]) - event_second) > EVENT_TIME_TOLERANCE:
            wrong.insert(0, "event_time")
    except (KeyError, TypeError, ValueError):
        wrong.insert(0, "event_time")
    return wrong


def _held_seq(row: Row) -> Any:
    """The seq a row's hashed record holds (None if it does not parse)."""
    try:
        return json.loads(row.record).get("seq")
    except (ValueError, AttributeError):
        return None


def verify_chain(node_id: str, rows: Sequence[Row], digests: Iterable[Digest], public_key: bytes,
                 report: Report) -> None:
    prefix = f"node {node_id}: "
    hashes: dict[int, str] = {}  # by the seq each record holds, so digests still match renumbered rows
    expected_seq, prev = 1, GENESIS
    last_held = 0
    shift = 0  # how far the records hold seqs past their positions, after records were removed and renumbered
    for i, row in enumerate(rows):
        report.records += 1
        problem_here = False
        if row.seq > expected_seq:
            span = f"record {expected_seq}" if row.seq == expected_seq + 1 else f"records {expected_seq}-{row.seq - 1}"
            report.problems.append(f"{prefix}{span} removed (sequence jumps from {expected_seq - 1} to {row.seq})")
            problem_here = True
        elif row.seq < expected_seq:
            report.problems.append(f"{prefix}record {row.seq} appears twice or out of order")
            problem_here = True
        try:
            content = json.loads(row.record)
            held_seq, held_prev = content.get("seq"), content.get("prev")
        except (ValueError, AttributeError):
            content, held_seq, held_prev = None, None, None
        actual = _sha(row.record)
        intact = content is not None and actual == row.hash
        if not intact:
            report.problems.append(f"{prefix}record {row.seq} altered (its content does not match its hash)")
            problem_here = True
            actual = row.hash  # judge the next link by the hash the chain had
        elif row.columns is not None and (wrong := _wrong_columns(content["event"], row.columns)):
            report.problems.append(f"{prefix}record {row.seq} altered (its {', '.join(wrong)} column"
                                   f"{'s do' if len(wrong) > 1 else ' does'} not match the hashed record)")
            problem_here = True
        elif held_seq != row.seq and not (isinstance(held_seq, int) and held_seq - row.seq == shift):
            following = rows[i + 1] if i + 1 < len(rows) else None
            if isinstance(held_seq, int) and held_seq - row.seq > shift and (
                    following is None or _held_seq(following) == following.seq + held_seq - row.seq):
                # From here on every record sits (held_seq - row.seq) places early: some were
                # deleted and the later ones renumbered to close the gap.
                first = row.seq + shift  # the first record missing, as first numbered
                span = f"record {first}" if first == held_seq - 1 else f"records {first}-{held_seq - 1}"
                report.problems.append(f"{prefix}{span} removed, and the records after renumbered to close "
                                       f"the gap (record {held_seq} is at position {row.seq})")
                shift = held_seq - row.seq
            else:
                how = "inserted before it" if isinstance(held_seq, int) and held_seq < row.seq else "reordered"
                report.problems.append(f"{prefix}record at position {row.seq} is record {held_seq}: records {how}")
            problem_here = True
        if not problem_here and held_prev != prev:
            report.problems.append(
                f"{prefix}record {row.seq} does not follow record {row.seq - 1} "
                f"(a record was inserted, removed or rewritten between them)")
        held = held_seq if intact and isinstance(held_seq, int) else row.seq
        hashes[held] = actual
        last_held = max(last_held, held)
        prev, expected_seq = actual, max(expected_seq, row.seq + 1)
    last_seq = max(expected_seq - 1, last_held)
    prev_digest = GENESIS
    for d in digests:
        report.digests += 1
        name = f"{prefix}digest {d.digest_seq}"
        if not signing.verify(public_key, d.signature, d.body.encode()):
            report.problems.append(f"{name}: signature does not verify with the audit public key")
            continue
        body = json.loads(d.body)
        if body.get("prev_digest") != prev_digest:
            report.problems.append(f"{name}: does not follow the digest before it (a digest was removed)")
        prev_digest = _sha(d.body)
        seq, expected_hash = body["record_seq"], body["record_hash"]
        if seq > last_seq:
            report.problems.append(
                f"{prefix}log truncated: digest {d.digest_seq} covers records up to {seq}, "
                f"but the chain ends at record {last_seq}")
        elif seq not in hashes:
            report.problems.append(f"{name}: record {seq} that it covers is missing")
        elif hashes[seq] != expected_hash:
            report.problems.append(f"{name}: records up to {seq} do not match the signed digest (rewritten)")


def exported_digests(digest_dir: Path | None) -> dict[str, dict[int, Digest]]:
    """node id -> digest_seq -> digest, from the digest files the nodes export (<node>.jsonl)."""
    found: dict[str, dict[int, Digest]] = {}
    if digest_dir is None or not digest_dir.is_dir():
        return found
    for path in sorted(digest_dir.glob("*.jsonl")):
        for item in read_archive(path):
            if isinstance(item, Digest):
                found.setdefault(path.stem, {})[item.digest_seq] = item
    return found


def verify_store(store: Store, public_key: bytes | None = None, archive_dir: Path | None = None,
                 digest_dir: Path | None = None) -> Report:
    report = Report()
    with store.begin() as tx:
        if public_key is None:
            public_key = tx.meta.get(PUBLIC_KEY_META)
        nodes = tx.audit.nodes()
    if public_key is None:
        report.problems.append("no audit public key: pass --public-key or use the store that wrote the log")
        return report
    archived_nodes = {p.name.rsplit("-", 2)[0] for p in archive_dir.glob("*.jsonl")} if archive_dir and \
        archive_dir.is_dir() else set()
    exported = exported_digests(digest_dir)
    for node_id in sorted(set(nodes) | archived_nodes | set(exported)):
        report.chains += 1
        rows: list[Row] = []
        digests: dict[int, Digest] = {}
        for path in archive_files(archive_dir, node_id):
            for item in read_archive(path):
                if isinstance(item, Row):
                    rows.append(item)
                else:
                    digests[item.digest_seq] = item
        after = rows[-1].seq if rows else 0
        with store.begin() as tx:
            while True:
                batch = tx.audit.chain(node_id, after_seq=after, limit=10_000)
                rows.extend(Row(int(r.seq), r.record, r.hash, tuple(getattr(r, c) for c in COLUMN_NAMES))
                            for r in batch)
                if len(batch) < 10_000:
                    break
                after = int(batch[-1].seq)
            for d in tx.audit.digests(node_id):
                digests[int(d.digest_seq)] = Digest(int(d.digest_seq), d.body, bytes(d.signature))
        for digest_seq, copy in sorted(exported.get(node_id, {}).items()):
            held = digests.get(digest_seq)
            if held is None:
                report.problems.append(f"node {node_id}: digest {digest_seq} missing from the store "
                                       f"(checked against its exported copy)")
                digests[digest_seq] = copy
            elif (held.body, held.signature) != (copy.body, copy.signature):
                report.problems.append(f"node {node_id}: digest {digest_seq} in the store differs from "
                                       f"its exported copy")
        verify_chain(node_id, rows, [digests[k] for k in sorted(digests)], public_key, report)
    return report


def archive(store: Store, node_id: str, cutoff: float, archive_dir: Path) -> int:
    """Move this node's records older than `cutoff` (epoch seconds) to a JSON Lines file, with the
    digests that cover them, then delete them from the store. Returns how many were moved.

    The file is fsynced and renamed into place before the rows are deleted. A crash in between
    leaves the rows in both places; the next run deletes them from the store first instead of
    archiving them a second time."""
    existing = archive_files(archive_dir, node_id)
    archived = max(int(p.stem.rsplit("-", 1)[1]) for p in existing) if existing else 0
    if archived:
        with store.begin() as tx:
            tx.audit.archive_up_to(node_id, archived)
    with store.begin() as tx:
        up_to = tx.audit.oldest_before(node_id, cutoff)
        head = tx.audit.head(node_id)
        if up_to is None or head is None:
            return 0
        # The newest record stays in the store: it is where the writer continues the chain after
        # a restart (with an empty store it would start again at record 1).
        up_to = min(up_to, head[0] - 1)
        if up_to < 1:
            return 0
        rows = tx.audit.chain(node_id, after_seq=0, limit=up_to + 1)
        rows = [r for r in rows if r.seq <= up_to]
        digests = [d for d in tx.audit.digests(node_id) if d.record_seq <= up_to]
    if not rows:
        return 0
    archive_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = archive_dir / f"{node_id}-{rows[0].seq}-{rows[-1].seq}.jsonl"
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for r in rows:
            f.write(json.dumps({"type": "record", "seq": r.seq, "record": r.record, "hash": r.hash}) + "\n")
        for d in digests:
            f.write(digest_line(d.digest_seq, d.body, bytes(d.signature)))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    with store.begin() as tx:
        tx.audit.archive_up_to(node_id, rows[-1].seq)
    return len(rows)


def summary(report: Report) -> str:
    head = (f"{report.chains} chain(s), {report.records} record(s), {report.digests} digest(s): "
            + ("OK" if report.ok else f"{len(report.problems)} problem(s)"))
    return "\n".join([head, *report.problems])


