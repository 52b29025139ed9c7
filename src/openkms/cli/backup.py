"""`openkms backup` and `openkms restore`: a node's SQLite store (and its audit files) to one file
and back onto a fresh data dir; PostgreSQL stores are backed up with pg_dump (the README).

Only argparse is imported at parser-building time. Every failure is one line on stderr and exit
status 2; no traceback reaches the terminal.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..config import DEFAULT_DATA_DIR
from .progress import Progress

BACKUP_EPILOG = """\
example (online: the server may go on running):
  openkms backup --data-dir /var/lib/openkms --out /srv/backups/openkms-$(date +%F).tar

The root key is not in a backup: keep root.key (or the passphrase, or the HSM token) apart from it.
A PostgreSQL store (--storage-url) is backed up with pg_dump instead; this command prints how."""

RESTORE_EPILOG = """\
example (onto a fresh data dir; then put the root key back and start the server):
  openkms restore /srv/backups/openkms-2026-11-22.tar --data-dir /var/lib/openkms
  install -m 600 /secure/place/root.key /var/lib/openkms/root.key
  openkms serve --data-dir /var/lib/openkms"""


def add_parser(sub: Any) -> None:
    """The `backup` and `restore` commands, on the `openkms` parser's subparsers."""
    backup = sub.add_parser("backup", help="copy the SQLite store and its audit files to one file, online",
                            description="Make a consistent copy of a node's SQLite store (SQLite's online backup\n"
                                        "API) with its exported audit digests and archives, in one tar file\n"
                                        "(mode 0600). Key material and secrets in it stay sealed under the root\n"
                                        "key, which is not in it.",
                            epilog=BACKUP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    backup.add_argument("--out", required=True, metavar="FILE", help="the backup file to write (atomically)")
    backup.add_argument("--data-dir", help=f"the node's data directory [OPENKMS_DATA_DIR, {DEFAULT_DATA_DIR}]")
    backup.add_argument("--storage-url", help="a PostgreSQL store: prints the pg_dump command [OPENKMS_STORAGE_URL]")
    backup.set_defaults(func=_backup)

    restore = sub.add_parser("restore", help="restore a backup onto a fresh data dir (the server stopped)",
                             description="Check a backup made by `openkms backup` (its manifest and every\n"
                                         "member's SHA-256) and restore it into a fresh data dir. Put the root\n"
                                         "key back (root.key, the passphrase or the HSM settings) before\n"
                                         "`openkms serve`.",
                             epilog=RESTORE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    restore.add_argument("file", metavar="FILE", help="the backup file")
    restore.add_argument("--data-dir", required=True,
                         help="the fresh data directory to restore into (empty, or holding only root.key)")
    restore.set_defaults(func=_restore)


def _fail(command: str, message: str) -> int:
    print(f"openkms {command}: {message}", file=sys.stderr)
    return 2


def _reason(exc: Exception) -> str:
    from ..errors import KMSError

    if isinstance(exc, KMSError):
        return f"{exc.code}: {exc.message}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__


def without_password(url: str) -> str:
    """A PostgreSQL URL fit to print: no password in its authority or its query."""
    parts = urlsplit(url.replace("postgresql+psycopg://", "postgresql://", 1))
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port:
        netloc += f":{parts.port}"
    if parts.username:
        netloc = f"{parts.username}@{netloc}"
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k.lower() != "password"])
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def _backup(args: argparse.Namespace) -> int:
    from ..backup import KEY_FILE, backup
    from ..config import Settings
    from ..errors import ConfigurationError

    try:
        settings = Settings.from_env(data_dir=Path(args.data_dir) if args.data_dir else None,
                                     storage_url=args.storage_url)
        if not settings.is_embedded:
            url = without_password(settings.storage_url)
            return _fail("backup", f"a PostgreSQL store is backed up with pg_dump, not openkms backup: "
                                   f"pg_dump --format=custom --file={args.out} '{url}' (the password from "
                                   "PGPASSWORD or ~/.pgpass; restore with pg_restore, see the README)")
        with Progress("copying the store and its audit files"):
            manifest = backup(settings.data_dir, Path(args.out))
    except ConfigurationError as exc:
        return _fail("backup", str(exc))
    except Exception as exc:  # one line, never a traceback
        return _fail("backup", _reason(exc))
    out = Path(args.out)
    print(f"openkms backup: wrote {out} ({out.stat().st_size} bytes, mode 0600): {manifest.summary()}")
    if manifest.root_source == "file":
        where = settings.data_dir.resolve() / KEY_FILE
        print(f"  the root key is NOT in it: keep a copy of {where} apart from this backup, never beside it; "
              "a restore needs both, and the two together open everything")
    elif manifest.root_source == "passphrase":
        print("  the root key is NOT in it: it comes from OPENKMS_ROOT_PASSPHRASE, which a restore needs; "
              "keep the passphrase apart from this backup")
    else:
        print(f"  the root key is NOT in it: it is wrapped by a key in an HSM token ({manifest.root_source}), "
              "which a restore needs, with its PIN")
    print("  not in it either: the credentials file (a secret access key in plaintext), node-id, serve.lock")
    return 0


def _restore(args: argparse.Namespace) -> int:
    from ..backup import KEY_FILE, restore
    from ..errors import ConfigurationError

    data_dir = Path(args.data_dir)
    try:
        with Progress("checking the backup and restoring it"):
            done = restore(Path(args.file), data_dir)
    except ConfigurationError as exc:
        return _fail("restore", str(exc))
    except Exception as exc:  # one line, never a traceback
        return _fail("restore", _reason(exc))
    manifest = done.manifest
    where = data_dir.resolve()
    print(f"openkms restore: restored {args.file} (made {manifest.created}, region {manifest.region}) into "
          f"{where}: {manifest.summary()}")
    if manifest.root_source == "file":
        if done.root_key_in_place:
            print(f"  root key: {where / KEY_FILE} is in place")
        else:
            print(f"  root key: copy the root.key you keep apart from the backup to {where / KEY_FILE} (mode 0600)")
    elif manifest.root_source == "passphrase":
        print("  root key: start the server with the store's passphrase in OPENKMS_ROOT_PASSPHRASE")
    else:
        print("  root key: start the server with the --root-pkcs11-* settings of the token that wraps it and "
              "OPENKMS_ROOT_PKCS11_PIN")
    print(f"  audit: this node's id is {done.node_id}, a new chain; the old chains are kept "
          f"(check them: openkms audit verify --data-dir {where})")
    if done.intents:
        print(f"  audit: {done.intents} call(s) had committed without their record yet; this node records them "
              "at its first start")
    print("  access keys are in the store (the credentials file is not in a backup: use the ones you have)")
    print(f"  then: openkms serve --data-dir {where}" + (f" --region {manifest.region}" if manifest.region and
                                                        manifest.region != "us-east-1" else ""))
    return 0
