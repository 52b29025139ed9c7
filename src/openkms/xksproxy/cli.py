"""`openkms xks-proxy`: serve, make and list the token's keys, print AWS KMS's proxy configuration file.

    openkms xks-proxy --config xks-proxy.toml                       # serve
    openkms xks-proxy keys create --config xks-proxy.toml --label foo [--encrypt-only|--decrypt-only]
    openkms xks-proxy keys list --config xks-proxy.toml [--json]
    openkms xks-proxy config-file --config xks-proxy.toml --prefix /example [--endpoint https://host]

Only argparse is imported at parser-building time: the proxy's dependencies (httptools, python-pkcs11)
load when a command runs. Every failure is one line on stderr, exit status 2 for what stops the
proxy from starting (the file, the PIN, the module, the token, the address) and 1 for a command
that was refused; no traceback reaches the terminal.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

PROG = "openkms xks-proxy"


def add_parser(sub: Any) -> None:
    """The `xks-proxy` command and its subcommands, on the `openkms` parser's subparsers."""
    xks = sub.add_parser("xks-proxy", help="an XKS proxy (AWS KMS external key store API) in front of a PKCS#11 token",
                         description="Serve the XKS proxy API v1.0.3 for the keys of a PKCS#11 token.")
    xks.add_argument("--config", default=argparse.SUPPRESS, help="the proxy's TOML file (serve)")
    commands = xks.add_subparsers(dest="xks_command")

    keys = commands.add_parser("keys", help="make and list the token's AES-256 keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="make a non-extractable AES-256 key in the token")
    create.add_argument("--config", required=True, help="the proxy's TOML file")
    create.add_argument("--label", required=True, help="its CKA_LABEL: the external key id AWS KMS will send")
    usage = create.add_mutually_exclusive_group()
    usage.add_argument("--encrypt-only", action="store_true", help="CKA_DECRYPT false")
    usage.add_argument("--decrypt-only", action="store_true", help="CKA_ENCRYPT false")
    listing = key_commands.add_parser("list", help="list the token's AES-256 keys and what they may do")
    listing.add_argument("--config", required=True, help="the proxy's TOML file")
    listing.add_argument("--json", action="store_true", help="one JSON document instead of a table")

    file = commands.add_parser("config-file", help="print the proxy configuration file AWS KMS's console accepts")
    file.add_argument("--config", required=True, help="the proxy's TOML file")
    file.add_argument("--prefix", required=True, help="the external key store's uri_path_prefix")
    file.add_argument("--endpoint", help="the proxy's URI endpoint, https://host[:port] (checked, and shown)")
    file.add_argument("--access-key-id", help="which of the prefix's credentials (default: the last one listed)")
    xks.set_defaults(func=main)


def _fail(message: str, status: int = 2) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return status


def main(args: argparse.Namespace) -> int:
    from .config import ConfigError

    try:
        if args.xks_command == "keys":
            return _keys(args)
        if args.xks_command == "config-file":
            return _config_file(args)
        if not getattr(args, "config", None):
            return _fail("--config FILE is required (the proxy's TOML file)")
        return _serve(args.config)
    except ConfigError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a fault of the proxy itself: one line, never a traceback on the terminal
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        return _fail(f"unexpected error: {type(exc).__name__}{': ' + first if first else ''}", 1)


def _open_token(config: Any) -> Any:
    """The token's keys, logged in with the PIN from the environment; ConfigError if it cannot be."""
    import os

    from ..keystore.pkcs11 import ConnectError, TokenSession
    from .config import PIN_VARIABLE, ConfigError, read_pin
    from .keys import TokenKeys

    pin = read_pin(os.environ, config.pkcs11.token_label)
    os.environ.pop(PIN_VARIABLE, None)  # held as a SecretStr from here on; not left for a child or a dump
    try:
        session = TokenSession(config.pkcs11.module, config.pkcs11.token_label, pin)
        session.check()
    except ConnectError as exc:
        reason = f"the PIN in {PIN_VARIABLE} is not the token user's PIN" if exc.code == "INVALID_CREDENTIALS" \
            else exc.message
        raise ConfigError(f"cannot open token {config.pkcs11.token_label!r} of {config.pkcs11.module}: "
                          f"{reason}") from None
    return TokenKeys(session)


def _keys(args: argparse.Namespace) -> int:
    from .config import load
    from .errors import XksError
    from .keys import KeyExists

    config = load(args.config)
    keys = _open_token(config)
    try:
        if args.keys_command == "create":
            info = keys.create(args.label, encrypt=not args.decrypt_only, decrypt=not args.encrypt_only)
            print(f"created {info.label}: AES-256 in token {config.pkcs11.token_label}, usage "
                  f"{', '.join(info.usage)}, CKA_ID {info.object_id}, sensitive, not extractable")
            return 0
        listed = keys.list_keys()
    except (KeyExists, ValueError) as exc:
        return _fail(f"keys {args.keys_command}: {exc}", 1)
    except XksError as exc:
        return _fail(f"keys {args.keys_command}: {exc.message}", 1)
    from .config import valid_key_id

    rows = [{"label": info.label, "usage": info.usage, "id": info.object_id,
             "note": "health check test key" if info.label == config.health.test_key_label
             else "" if valid_key_id(info.label) else "label is not an external key id"} for info in listed]
    if args.json:
        print(json.dumps({"Keys": rows}, indent=2))
        return 0
    width = max([len("LABEL"), *(len(row["label"]) for row in rows)])
    print(f"{'LABEL':<{width}}  {'USAGE':<16}  {'CKA_ID':<32}  NOTE")
    for row in rows:
        print(f"{row['label']:<{width}}  {','.join(row['usage']) or '-':<16}  {row['id']:<32}  {row['note']}".rstrip())
    return 0


def _config_file(args: argparse.Namespace) -> int:
    from .config import API_PATH, load

    config = load(args.config)
    prefix = args.prefix[:-len(API_PATH)] if args.prefix.endswith(API_PATH) else args.prefix
    store = config.key_store(prefix.rstrip("/"))
    if store is None:
        known = ", ".join(repr(s.uri_path_prefix) for s in config.key_stores)
        return _fail(f"config-file: no external key store with uri_path_prefix {args.prefix!r} in {config.path} "
                     f"(it has {known})")
    if args.access_key_id:
        credential = next((c for c in store.credentials if c.access_key_id == args.access_key_id), None)
        if credential is None:
            return _fail(f"config-file: the prefix {store.uri_path_prefix!r} has no credential {args.access_key_id}")
    else:
        credential = store.credentials[-1]  # rotation appends the new credential: hand that one out
    if args.endpoint is not None:
        match = re.fullmatch(r"https://([A-Za-z0-9.-]+)(?::(\d{1,5}))?/?", args.endpoint)
        if match is None:
            return _fail("config-file: --endpoint must be https://host or https://host:port")
        host, port = match.group(1), match.group(2)
        print(f"Proxy URI endpoint: https://{host}  Proxy URI path: {store.uri_path}  (public endpoint)",
              file=sys.stderr)
        if port is not None and port != "443":
            print(f"note: AWS KMS connects to port 443 only; port {port} suits openkms's own external key "
                  "stores, or a load balancer in front that listens on 443", file=sys.stderr)
    # The file the AWS KMS console takes, exactly as the spec shows it ("XKS proxy configuration in
    # AWS KMS console"): the URI path and one credential.
    print(json.dumps({"XksProxyUriPath": store.uri_path,
                      "XksProxyAuthenticationCredential": {
                          "AccessKeyId": credential.access_key_id,
                          "RawSecretAccessKey": credential.secret_access_key.reveal()}}, indent=4))
    return 0


def _logging() -> None:
    import logging
    import time

    handler = logging.StreamHandler(sys.stderr)
    formatter = logging.Formatter("%(asctime)s.%(msecs)03dZ %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S")
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger("openkms")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False


class StartupSighup:
    """SIGHUP while the proxy starts (the file read, the token opened, the test key checked), before
    the event loop's handler is in place, where its default action would kill the proxy: only
    noted. The server reloads once as soon as it runs if one arrived (server.py, ProxyServer.run)."""

    def __init__(self) -> None:
        import signal

        self.arrived = False
        signal.signal(signal.SIGHUP, self._note)

    def _note(self, signum: int, frame: Any) -> None:
        self.arrived = True


def _serve(path: str) -> int:
    startup = StartupSighup()  # first: from here on a SIGHUP must not kill the proxy while it starts
    import asyncio
    import logging

    from .. import heap
    from ..api.listener import bind
    from ..errors import ConfigurationError
    from .app import XksApp
    from .config import ConfigError, exposure_warning, load
    from .errors import XksError
    from .keys import KeyExists
    from .server import ProxyServer, ssl_context
    from .worker import TokenWorker

    config = load(path)
    context = ssl_context(config.tls) if config.tls is not None else None
    keys = _open_token(config)
    label = config.health.test_key_label
    try:
        if keys.ensure(label):
            print(f"{PROG}: made the health check's test key {label!r} in token {config.pkcs11.token_label}",
                  file=sys.stderr)
    except XksError as exc:
        raise ConfigError(f"the health check's test key {label!r}: {exc.message}") from None
    except KeyExists as exc:
        raise ConfigError(f"the health check's test key {label!r}: {exc}, and it is no AES-256 key") from None
    try:
        sock = bind(config.server.host, config.server.port)
    except ConfigurationError as exc:
        raise ConfigError(str(exc)) from None
    _logging()  # from here on: the startup checks above each end in one line of their own
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    scheme = "https" if context is not None else "http"
    mtls = ""
    if config.tls is not None and config.tls.client_ca is not None:
        mtls = f", client certificates from {config.tls.client_ca}" + (
            f" naming {config.tls.client_dns_name}" if config.tls.client_dns_name else " (any name)")
    print(f"openkms xks-proxy serving on {scheme}://{shown}:{port}{mtls}", flush=True)
    print(f"  token:  {config.pkcs11.token_label} ({config.pkcs11.module})")
    print(f"  region: {config.server.region}")
    for store in config.key_stores:
        keys_text = ", ".join(sorted(store.xks_key_id_set)) if store.xks_key_id_set is not None else \
            "every AES-256 key" + (" no other store lists" if len(config.key_stores) > 1 else "")
        print(f"  {store.uri_path}: {len(store.credentials)} credential(s), keys: {keys_text}")
    sys.stdout.flush()
    exposed = exposure_warning(config.path)
    if exposed is not None:
        logging.getLogger("openkms.xksproxy").warning("%s", exposed)

    worker = TokenWorker()
    app = XksApp(config, keys, worker)  # logs, too, if a store may use keys meant for another
    server = ProxyServer(config, app, sock, context, lambda: startup.arrived)
    heap.freeze_startup()  # what the proxy holds from now on is never walked by the GC
    try:
        asyncio.run(server.run())
    finally:
        worker.close()
        sock.close()
    return 0
