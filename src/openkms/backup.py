"""Backups of a node's SQLite store, and restoring one onto a fresh data dir.

A backup (`openkms backup --out FILE`) is one POSIX tar file, written with mode 0600 and atomically
(a temporary file, fsynced, renamed into place):

    manifest.json                       what it is (format, versions, when, the store's root key
                                        source and region) and each member's size and SHA-256,
                                        with a SHA-256 of the manifest itself
    openkms.db                          a consistent copy of the store, made with SQLite's online
                                        backup API in one step (one read transaction: a running
                                        server goes on writing meanwhile)
    audit-digests/<node>.jsonl          the signed digests the nodes exported
    audit-archive/<node>-<a>-<b>.jsonl  the archived audit records

The store holds every key's material and every secret sealed under the root key, and the root key
is never in a backup: not `root.key` (a backup beside its root key file is the store in the
clear), nor a passphrase or a PIN, which openkms never writes down. Nor are:

- `credentials`: the bootstrap administrator's secret access key in plaintext. The access keys
  themselves are in the store (sealed), so the old credentials still work after a restore;
- `node-id`: it names the node's audit chain. A restored node is another node: it gets an id of
  its own and starts a chain of its own, so that the chain the old node went on writing after
  the backup and the restored node's never share a name. The old chains stay in the store and
  verify as before;
- `serve.lock`, the store's `-wal` and `-shm` files (the copy is one self-contained file).

The order of the copies keeps them consistent with the store's copy without stopping anything.
A digest is stored before it is exported, so the digest files are copied *before* the store:
every digest in the copies is in the store's copy (only complete lines are taken: a digest may be
being appended). Audit records are archived to a file before they are deleted from the store, so
the archives are copied *after* it: a record gone from the store's copy is in an archive's copy
(records in both places are harmless, `openkms audit verify` reads the archives first).

Restoring (`openkms restore FILE --data-dir DIR`) reads the whole file and checks the manifest and
every member's checksum before it writes anything; it refuses a data dir that holds anything but
the root key file (put back beforehand) and its lock, and takes the data dir's lock, so that no
server runs there meanwhile. The store goes into place last, so a restore that stops half way
leaves no store that a server would start on. Calls that had committed their change but not yet
their audit record when the backup was made left an intent in the store (`audit_pending`); they
are handed to the new node id, whose first start records them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import sqlite3
import tarfile
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from . import __version__
from .errors import ConfigurationError
from .files import replace_file, sync_directory

FORMAT = "openkms-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STORE = "openkms.db"
DIGESTS = "audit-digests"
ARCHIVE = "audit-archive"
KEY_FILE = "root.key"
NODE_ID = "node-id"
LOCK_FILE = "serve.lock"  # node.LOCK_FILE (not imported: node pulls in the whole server)
# What a restore may find in its data dir: the lock it takes, and the root key file put back first.
MAY_BE_THERE = frozenset({LOCK_FILE, KEY_FILE})
MAX_MANIFEST_BYTES = 1 << 20
CHUNK = 1 << 20
# Member names: the store, or a .jsonl file directly under one of the two audit dirs.
MEMBER_NAME = re.compile(rf"\A(?:{re.escape(STORE)}|(?:{DIGESTS}|{ARCHIVE})/[A-Za-z0-9][A-Za-z0-9._-]*\.jsonl)\Z")
COUNTED = (("keys", "kms_keys"), ("aliases", "aliases"), ("grants", "grants"), ("secrets", "secrets"),
           ("audit records", "audit_events"))


@dataclass(frozen=True)
class Member:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    created: str
    openkms_version: str
    schema_version: int
    store: str
    root_source: str
    region: str
    counts: dict[str, int]
    members: tuple[Member, ...]

    def body(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "created": self.created,
                "openkms_version": self.openkms_version, "schema_version": self.schema_version,
                "store": self.store, "root_source": self.root_source, "region": self.region,
                "counts": self.counts,
                "members": [{"name": m.name, "size": m.size, "sha256": m.sha256} for m in self.members]}

    def encode(self) -> bytes:
        body = self.body()
        body["manifest_sha256"] = hashlib.sha256(_canonical(body)).hexdigest()
        return json.dumps(body, indent=1, sort_keys=True).encode() + b"\n"

    def summary(self) -> str:
        return ", ".join(f"{what} {n}" for what, n in self.counts.items())


@dataclass(frozen=True)
class Restored:
    manifest: Manifest
    node_id: str
    intents: int  # unrecorded calls' intents handed to the new node
    root_key_in_place: bool


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _fail(message: str) -> ConfigurationError:
    return ConfigurationError(message)


# -- backup ---------------------------------------------------------------------------------------


def backup(data_dir: Path, out: Path) -> Manifest:
    """Write a backup of the SQLite store in `data_dir` (and its audit files) to `out`."""
    store = data_dir / STORE
    if not store.is_file():
        raise _fail(f"no store at {data_dir} (no {STORE} in it): give the server's --data-dir")
    out = Path(os.path.abspath(out))
    if _within(out, data_dir):
        raise _fail(f"--out {out} is inside the data dir: keep backups elsewhere, and never beside the root key")
    if out.is_dir():
        raise _fail(f"--out {out} is a directory: give a file name")
    if not out.parent.is_dir():
        raise _fail(f"--out {out}: no directory {out.parent}")
    with tempfile.TemporaryDirectory(prefix=".openkms-backup-", dir=out.parent) as tmp:
        staging = Path(tmp)
        files: list[tuple[str, Path]] = []
        for src in _audit_files(data_dir, DIGESTS):  # before the store: see the module's docstring
            dst = staging / DIGESTS / src.name
            dst.parent.mkdir(mode=0o700, exist_ok=True)
            data = src.read_bytes()
            dst.write_bytes(data[:data.rfind(b"\n") + 1])
            files.append((f"{DIGESTS}/{src.name}", dst))
        copy = staging / STORE
        _snapshot(store, copy)
        schema_version, meta, counts = _describe(copy, f"the copy of {store}")
        files.insert(0, (STORE, copy))
        for src in _audit_files(data_dir, ARCHIVE):  # after the store
            dst = staging / ARCHIVE / src.name
            dst.parent.mkdir(mode=0o700, exist_ok=True)
            shutil.copyfile(src, dst)
            files.append((f"{ARCHIVE}/{src.name}", dst))
        members = tuple(Member(name, path.stat().st_size, _sha256_file(path)) for name, path in files)
        manifest = Manifest(created=datetime.now(UTC).isoformat(timespec="seconds"), openkms_version=__version__,
                            schema_version=schema_version, store="sqlite",
                            root_source=meta.get("root_source", "unknown"), region=meta.get("region", ""),
                            counts=counts, members=members)
        _write_tar(out, manifest, files, staging)
    return manifest


def _within(path: Path, directory: Path) -> bool:
    try:
        Path(os.path.realpath(path)).relative_to(os.path.realpath(directory))
    except ValueError:
        return False
    return True


def _audit_files(data_dir: Path, name: str) -> list[Path]:
    directory = data_dir / name
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("*.jsonl") if p.is_file() and MEMBER_NAME.match(f"{name}/{p.name}"))


def _snapshot(store: Path, copy: Path) -> None:
    """A consistent copy of a live WAL-mode store: the online backup API in one step (pages=-1),
    so the whole copy is read in one read transaction, which never blocks the server's writes."""
    try:
        # mode=rw: never create a store where there is none. (Not mode=ro: a read-only
        # connection leaves -wal and -shm files behind, owned by whoever ran the backup.)
        source = sqlite3.connect(f"{store.absolute().as_uri()}?mode=rw", uri=True, timeout=30)
    except sqlite3.Error as exc:
        raise _fail(f"cannot open {store}: {exc}") from None
    try:
        target = sqlite3.connect(copy)
        try:
            source.backup(target, pages=-1)
            target.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal
            target.commit()
        finally:
            target.close()
    except sqlite3.DatabaseError as exc:
        raise _fail(f"cannot copy {store}: {exc}") from None
    finally:
        source.close()
    os.chmod(copy, 0o600)


def _describe(db: Path, what: str) -> tuple[int, dict[str, str], dict[str, int]]:
    """A store file's schema version, its text meta rows (root source, region) and what it holds;
    refuses a file that is not a sound openkms store."""
    try:
        conn = sqlite3.connect(f"{db.absolute().as_uri()}?mode=rw", uri=True)
    except sqlite3.Error as exc:
        raise _fail(f"cannot open {what}: {exc}") from None
    try:
        check = conn.execute("PRAGMA integrity_check").fetchall()
        if check != [("ok",)]:
            raise _fail(f"{what} fails SQLite's integrity check: {str(check[0][0])[:200]}")
        try:
            rows = dict(conn.execute("SELECT name, value FROM openkms_meta WHERE name IN "
                                     "('schema_version', 'root_source', 'region')").fetchall())
        except sqlite3.Error:
            raise _fail(f"{what} is not an openkms store") from None
        if "schema_version" not in rows:
            raise _fail(f"{what} is not an openkms store (no schema version)")
        meta = {name: bytes(value).decode(errors="replace") for name, value in rows.items()}
        counts = {}
        for label, table in COUNTED:
            with contextlib.suppress(sqlite3.Error):  # a table an older schema does not have yet
                counts[label] = int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
        return int(meta.pop("schema_version")), meta, counts
    except sqlite3.DatabaseError as exc:
        raise _fail(f"{what} is damaged: {exc}") from None
    finally:
        conn.close()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _tarinfo(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o600, mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _write_tar(out: Path, manifest: Manifest, files: list[tuple[str, Path]], staging: Path) -> None:
    """The tar file: into a temporary file (0600) beside `out`, fsynced, renamed over `out`."""
    tmp = staging / "backup.tar"
    mtime = int(datetime.now(UTC).timestamp())
    encoded = manifest.encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(_tarinfo(MANIFEST, len(encoded), mtime), io.BytesIO(encoded))
            for name, path in files:
                with path.open("rb") as data:
                    tar.addfile(_tarinfo(name, path.stat().st_size, mtime), data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)  # the staging dir is in out's directory: one file system
    sync_directory(out.parent)


# -- reading and checking a backup -----------------------------------------------------------------


def _parse_manifest(raw: bytes, where: str) -> Manifest:
    try:
        body = json.loads(raw)
        if not isinstance(body, dict):
            raise ValueError
    except ValueError:
        raise _fail(f"{where}: its manifest is damaged") from None
    if body.get("format") != FORMAT:
        raise _fail(f"{where} is not an openkms backup")
    if body.get("format_version") != FORMAT_VERSION:
        raise _fail(f"{where} is a backup of format {body.get('format_version')!r}; this openkms reads "
                    f"format {FORMAT_VERSION}: restore it with the openkms version that made it "
                    f"({body.get('openkms_version')!r})")
    claimed = body.pop("manifest_sha256", None)
    if claimed != hashlib.sha256(_canonical(body)).hexdigest():
        raise _fail(f"{where}: its manifest is damaged (checksum mismatch)")
    try:
        members = tuple(Member(str(m["name"]), int(m["size"]), str(m["sha256"])) for m in body["members"])
        manifest = Manifest(created=str(body["created"]), openkms_version=str(body["openkms_version"]),
                            schema_version=int(body["schema_version"]), store=str(body["store"]),
                            root_source=str(body["root_source"]), region=str(body["region"]),
                            counts={str(k): int(v) for k, v in body["counts"].items()}, members=members)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise _fail(f"{where}: its manifest is damaged") from None
    names = [m.name for m in members]
    if STORE not in names or len(set(names)) != len(names) or not all(MEMBER_NAME.match(n) for n in names):
        raise _fail(f"{where}: its manifest is damaged (bad member list)")
    return manifest


def _members(path: Path) -> Iterator[tuple[tarfile.TarInfo, IO[bytes]]]:
    """The tar file's members in order, each with its data; one-line errors for a damaged file."""
    started = False
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                started = True
                if not info.isreg():
                    raise _fail(f"{path}: unexpected entry {info.name!r} (not a regular file)")
                data = tar.extractfile(info)
                assert data is not None
                yield info, data
    except ConfigurationError:
        raise
    except FileNotFoundError:
        raise _fail(f"{path}: no such file") from None
    except IsADirectoryError:
        raise _fail(f"{path} is a directory, not a backup") from None
    except PermissionError:
        raise _fail(f"{path}: permission denied") from None
    except (tarfile.TarError, EOFError, OSError, UnicodeError) as exc:
        if not started:
            raise _fail(f"{path} is not an openkms backup (not a tar file: {str(exc) or type(exc).__name__})"
                        ) from None
        raise _fail(f"{path} is not a complete openkms backup (truncated or damaged: {str(exc) or type(exc).__name__})"
                    ) from None


def check_backup(path: Path, extract_to: Path | None = None) -> Manifest:
    """Read the whole backup and check its manifest and every member against it; with
    `extract_to`, write the members there (after the same checks, made again as they are read).
    Raises ConfigurationError (one line) for anything that is not a complete, intact backup."""
    manifest: Manifest | None = None
    expected: dict[str, Member] = {}
    seen: set[str] = set()
    for info, data in _members(path):
        if manifest is None:
            if info.name != MANIFEST or info.size > MAX_MANIFEST_BYTES:
                raise _fail(f"{path} is not an openkms backup (it does not start with its manifest)")
            manifest = _parse_manifest(data.read(), str(path))
            expected = {m.name: m for m in manifest.members}
            continue
        member = expected.get(info.name)
        if member is None or info.name in seen:
            raise _fail(f"{path}: unexpected member {info.name!r} (not in its manifest)")
        if info.size != member.size:
            raise _fail(f"{path}: {info.name} is {info.size} bytes, its manifest says {member.size}: damaged")
        seen.add(info.name)
        digest = hashlib.sha256()
        out: IO[bytes] | None = None
        if extract_to is not None:
            target = extract_to / info.name
            target.parent.mkdir(mode=0o700, exist_ok=True)
            out = open(target, "xb")  # noqa: SIM115 -- closed below
            os.chmod(target, 0o600)
        try:
            while True:
                try:
                    chunk = data.read(CHUNK)
                except (tarfile.TarError, EOFError, OSError) as exc:
                    raise _fail(f"{path} is not a complete openkms backup (truncated or damaged: "
                                f"{str(exc) or type(exc).__name__})") from None
                if not chunk:
                    break
                digest.update(chunk)
                if out is not None:
                    out.write(chunk)
            if out is not None:
                out.flush()
                os.fsync(out.fileno())
        finally:
            if out is not None:
                out.close()
        if digest.hexdigest() != member.sha256:
            raise _fail(f"{path}: {info.name} does not match its checksum: the backup is damaged")
    if manifest is None:
        raise _fail(f"{path} is not an openkms backup (empty)")
    missing = sorted(set(expected) - seen)
    if missing:
        raise _fail(f"{path} is not a complete openkms backup (truncated or damaged: {', '.join(missing)} missing)")
    return manifest


# -- restore ---------------------------------------------------------------------------------------


def _refuse_used(data_dir: Path) -> None:
    if data_dir.exists() and not data_dir.is_dir():
        raise _fail(f"data dir {data_dir} is not a directory")
    try:
        found = sorted(set(os.listdir(data_dir)) - MAY_BE_THERE) if data_dir.is_dir() else []
    except OSError as exc:
        raise _fail(f"cannot read data dir {data_dir}: {exc.strerror}") from None
    if STORE in found:
        raise _fail(f"data dir {data_dir} already has a store ({STORE}): restore onto a fresh data dir")
    if found:
        shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
        raise _fail(f"data dir {data_dir} is not empty (it holds {shown}): restore onto a fresh data dir "
                    f"(only {KEY_FILE} may be put there first)")


def restore(path: Path, data_dir: Path) -> Restored:
    """Restore the backup `path` into the fresh data dir `data_dir` (the server not running there)."""
    from .node import DataDirLock
    from .storage.schema import SCHEMA_VERSION

    _refuse_used(data_dir)
    manifest = check_backup(path)  # all of it, before anything is written
    if manifest.store != "sqlite":
        raise _fail(f"{path} is a backup of a {manifest.store} store; openkms restore reads SQLite backups")
    if manifest.schema_version > SCHEMA_VERSION:
        raise _fail(f"{path} holds a store of schema version {manifest.schema_version}, newer than this "
                    f"openkms ({SCHEMA_VERSION}): restore it with openkms {manifest.openkms_version} or newer")
    lock = DataDirLock(data_dir)  # makes the dir (0700); refuses if a server holds it
    try:
        _refuse_used(data_dir)  # again, under the lock
        staging = data_dir / f".restore-{uuid.uuid4().hex}"
        staging.mkdir(mode=0o700)
        try:
            check_backup(path, extract_to=staging)  # checked again as it is written: the file may have changed
            copy = staging / STORE
            _describe(copy, f"the store in {path}")
            node_id = str(uuid.uuid4())
            intents = _hand_over_intents(copy, node_id)
            for name in (DIGESTS, ARCHIVE):
                if (staging / name).is_dir():
                    sync_directory(staging / name)
                    os.rename(staging / name, data_dir / name)
            replace_file(data_dir / NODE_ID, f"{node_id}\n".encode(), mode=0o644)
            os.rename(copy, data_dir / STORE)  # last: with the store in place the restore is complete
            sync_directory(data_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        lock.release()
    return Restored(manifest, node_id, intents, (data_dir / KEY_FILE).exists())


def _hand_over_intents(db: Path, node_id: str) -> int:
    """Give the unrecorded calls' intents to the restored node, which records them at its first
    start (their own nodes are not this one: a restored node never writes another node's chain)."""
    conn = sqlite3.connect(db)
    try:
        with conn:
            try:
                moved = conn.execute("UPDATE audit_pending SET node_id = ?", (node_id,)).rowcount
            except sqlite3.OperationalError:  # a store of a schema without intents
                return 0
        return max(moved, 0)
    finally:
        conn.close()
