"""The `openkms` command: `serve` runs the server, `admin` manages accounts, users and access keys,
`xks-proxy` runs an external key store proxy in front of a PKCS#11 token."""

from __future__ import annotations

import argparse
import configparser
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from ..config import DEFAULT_DATA_DIR
from ..files import write_file
from ..wrapping import WRAPPING_ALGORITHMS


def _serve(args: argparse.Namespace) -> int:
    # Server imports stay here so that `openkms admin` needs only the client's dependencies.
    from ..api import listener
    from ..config import Settings
    from ..errors import ConfigurationError, KMSError
    from ..node import DataDirLock, NodeClaim, claim_node_id, node_id, open_node, write_credentials

    def cannot_start(reason: str) -> int:
        print(f"openkms: cannot start: {reason}", file=sys.stderr)
        return 2

    try:
        settings = Settings.from_env(host=args.host, port=args.port,
                                     data_dir=Path(args.data_dir) if args.data_dir else None,
                                     storage_url=args.storage_url, region=args.region,
                                     reuse_port=True if args.reuse_port else None,
                                     root_pkcs11_module=args.root_pkcs11_module,
                                     root_pkcs11_token_label=args.root_pkcs11_token_label,
                                     root_pkcs11_key_label=args.root_pkcs11_key_label,
                                     tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
                                     insecure_http=True if args.insecure_http else None,
                                     metrics_listen=args.metrics_listen)
        # First the port, so that a server that cannot listen writes nothing at all; then what
        # must not be shared: the data dir, and on a shared store the node id.
        sock = listener.bind(settings.host, settings.port, settings.reuse_port)
        exposed = settings.check_exposure()
        if settings.metrics_listen:  # taken by the worker; a port in use stops the start here
            listener.bind(*settings.metrics_address()).close()
        tls = listener.tls_options(settings)  # the files are read now: a bad one stops the start here
        held: list[DataDirLock | NodeClaim] = [DataDirLock(settings.data_dir)]
        claim = claim_node_id(settings, node_id(settings.data_dir))
        if claim is not None:
            held.append(claim)
        node = open_node(settings)
        try:
            issued = None
            if node.accounts.is_empty():
                issued = node.accounts.bootstrap(
                    os.environ.get("OPENKMS_BOOTSTRAP_ACCOUNT_ID") or None,
                    os.environ.get("OPENKMS_BOOTSTRAP_ACCESS_KEY_ID") or None,
                    os.environ.get("OPENKMS_BOOTSTRAP_SECRET_ACCESS_KEY") or None)
                write_credentials(settings.data_dir / "credentials", issued, settings.region)
            accounts = node.accounts.list_accounts()
        finally:
            node.close()
            # The worker process is forked from this one and opens every PKCS#11 module itself
            # (PKCS#11 forbids a child to use its parent's sessions): leave none initialised.
            from ..keystore.pkcs11 import Module

            Module.finalize_all()
    except ConfigurationError as exc:
        return cannot_start(str(exc))
    except KMSError as exc:
        return cannot_start(f"{exc.code}: {exc.message}")
    except OSError as exc:
        return cannot_start(f"{exc.strerror}: {exc.filename}")

    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    endpoint = f"{settings.scheme}://{host}:{settings.port}"
    storage = "sqlite (embedded)" if settings.is_embedded else "postgresql"
    print(f"openkms serving on {endpoint}" + (", client certificates required" if settings.tls_client_ca else ""),
          flush=True)
    if exposed is not None:
        print(exposed, file=sys.stderr, flush=True)
    print(f"  region:      {settings.region}")
    print(f"  storage:     {storage}")
    if issued is not None:
        print(f"  account id:  {issued.principal.account_id} (created at first start)")
    elif accounts:
        print(f"  account ids: {', '.join(a.account_id for a in accounts[:5])}")
    creds = settings.data_dir / "credentials"
    if creds.exists():
        print(f"  credentials: {creds.resolve()}")
    sys.stdout.flush()

    # The worker process builds its own node from the same settings, passed as OPENKMS_* variables.
    for name, value in (("HOST", settings.host), ("PORT", settings.port),
                        ("DATA_DIR", str(settings.data_dir.resolve())),
                        ("STORAGE_URL", settings.storage_url), ("REGION", settings.region),
                        ("ROOT_PKCS11_MODULE", settings.root_pkcs11_module),
                        ("ROOT_PKCS11_TOKEN_LABEL", settings.root_pkcs11_token_label),
                        ("ROOT_PKCS11_KEY_LABEL", settings.root_pkcs11_key_label),
                        ("METRICS_LISTEN", settings.metrics_listen)):
        os.environ[f"OPENKMS_{name}"] = str(value)

    from granian.constants import Interfaces, Loops
    from granian.log import LogLevels

    try:
        listener.serve(
            "openkms.api.app:create_app", sock,
            interface=Interfaces.RSGI,
            loop=Loops.uvloop,  # ~50% more requests/s than asyncio's loop on this workload
            factory=True,
            workers=1,
            log_level=LogLevels.warning,
            **tls,
        )
    finally:
        for hold in reversed(held):
            hold.release()
    return 0


def _admin_client(args: argparse.Namespace) -> Any:
    from ..client.admin import AdminClient

    endpoint = args.endpoint_url or os.environ.get("OPENKMS_ENDPOINT_URL") or "http://127.0.0.1:8080"
    akid = os.environ.get("AWS_ACCESS_KEY_ID")
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    region = args.region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    creds_path = Path(args.credentials_file or Path(os.environ.get("OPENKMS_DATA_DIR") or DEFAULT_DATA_DIR)
                      / "credentials")
    if args.credentials_file or not (akid and secret):
        parser = configparser.ConfigParser()
        if not parser.read(creds_path):
            raise SystemExit(f"openkms admin: no credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                             f"or pass --credentials-file (looked for {creds_path})")
        if not parser.has_option(args.profile, "aws_access_key_id") or \
                not parser.has_option(args.profile, "aws_secret_access_key"):
            raise SystemExit(f"openkms admin: {creds_path} has no profile [{args.profile}] with "
                             "aws_access_key_id and aws_secret_access_key")
        section = parser[args.profile]
        akid, secret = section["aws_access_key_id"], section["aws_secret_access_key"]
        region = region or section.get("region")
    return AdminClient(endpoint, akid, secret, region or "us-east-1")


def _document(value: str) -> str:
    """A policy document given inline or as file://path, as the AWS CLI takes it."""
    if value.startswith("file://"):
        return Path(value[len("file://"):]).read_text()
    return value


def _command(value: str) -> list[str]:
    """--command: a JSON list of strings, or a single program path."""
    if value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except ValueError:
            raise argparse.ArgumentTypeError("not a JSON list of strings") from None
        if not isinstance(parsed, list) or not all(isinstance(p, str) for p in parsed):
            raise argparse.ArgumentTypeError("not a JSON list of strings")
        return parsed
    return [value]

ADMIN_COMMANDS: dict[str, tuple[str, list[tuple[str, dict[str, Any]]]]] = {
    "create-account": ("CreateAccount", [("--name", {"required": True, "dest": "Name"}),
                                         ("--account-id", {"dest": "AccountId"})]),
    "delete-account": ("DeleteAccount", [("--account-id", {"required": True, "dest": "AccountId"})]),
    "list-accounts": ("ListAccounts", []),
    "create-user": ("CreateUser", [("--account-id", {"required": True, "dest": "AccountId"}),
                                   ("--user-name", {"required": True, "dest": "UserName"}),
                                   ("--admin", {"action": "store_true", "dest": "Admin"}),
                                   ("--operator", {"action": "store_true", "dest": "Operator"})]),
    "get-user": ("GetUser", [("--account-id", {"dest": "AccountId"}), ("--user-name", {"dest": "UserName"})]),
    "delete-user": ("DeleteUser", [("--account-id", {"required": True, "dest": "AccountId"}),
                                   ("--user-name", {"required": True, "dest": "UserName"})]),
    "list-users": ("ListUsers", [("--account-id", {"required": True, "dest": "AccountId"})]),
    "create-access-key": ("CreateAccessKey", [("--account-id", {"required": True, "dest": "AccountId"}),
                                              ("--user-name", {"required": True, "dest": "UserName"})]),
    "list-access-keys": ("ListAccessKeys", [("--account-id", {"required": True, "dest": "AccountId"}),
                                            ("--user-name", {"required": True, "dest": "UserName"})]),
    "update-access-key": ("UpdateAccessKey", [("--access-key-id", {"required": True, "dest": "AccessKeyId"}),
                                              ("--status", {"required": True, "dest": "Status",
                                                            "choices": ["Active", "Inactive"]})]),
    "delete-access-key": ("DeleteAccessKey", [("--access-key-id", {"required": True, "dest": "AccessKeyId"})]),
    "put-user-policy": ("PutUserPolicy", [("--account-id", {"required": True, "dest": "AccountId"}),
                                          ("--user-name", {"required": True, "dest": "UserName"}),
                                          ("--policy-name", {"required": True, "dest": "PolicyName"}),
                                          ("--policy-document", {"required": True, "dest": "PolicyDocument",
                                                                 "type": _document})]),
    "get-user-policy": ("GetUserPolicy", [("--account-id", {"required": True, "dest": "AccountId"}),
                                          ("--user-name", {"required": True, "dest": "UserName"}),
                                          ("--policy-name", {"required": True, "dest": "PolicyName"})]),
    "delete-user-policy": ("DeleteUserPolicy", [("--account-id", {"required": True, "dest": "AccountId"}),
                                                ("--user-name", {"required": True, "dest": "UserName"}),
                                                ("--policy-name", {"required": True, "dest": "PolicyName"})]),
    "list-user-policies": ("ListUserPolicies", [("--account-id", {"required": True, "dest": "AccountId"}),
                                                ("--user-name", {"required": True, "dest": "UserName"})]),
    "create-hsm-cluster": ("CreateHsmCluster", [
        ("--pkcs11-module", {"required": True, "dest": "Pkcs11Module"}),
        ("--token-label", {"required": True, "dest": "TokenLabel"}),
        ("--trust-anchor-certificate", {"required": True, "dest": "TrustAnchorCertificate", "type": _document}),
        ("--account-id", {"required": True, "dest": "AccountId",
                          "help": "the tenant account whose custom key stores may use the token"})]),
    "list-hsm-clusters": ("ListHsmClusters", []),
    "describe-hsm-cluster": ("DescribeHsmCluster", [("--cluster-id", {"required": True, "dest": "ClusterId"})]),
    "delete-hsm-cluster": ("DeleteHsmCluster", [("--cluster-id", {"required": True, "dest": "ClusterId"})]),
    "create-rotation-function": ("CreateRotationFunction", [
        ("--account-id", {"required": True, "dest": "AccountId"}),
        ("--function-name", {"required": True, "dest": "FunctionName"}),
        ("--kind", {"required": True, "dest": "Kind", "choices": ["webhook", "command", "random-password",
                                                                   "postgresql-single-user",
                                                                   "postgresql-alternating-users"]}),
        ("--url", {"dest": "Url", "help": "webhook: the https:// URL each step is POSTed to"}),
        ("--command", {"dest": "Command", "type": _command,
                       "help": 'command: a JSON list, e.g. \'["/usr/local/bin/rotate", "--verbose"]\', or one path'}),
        ("--env", {"dest": "Environment", "action": "append", "metavar": "NAME=VALUE",
                   "help": "command: a variable to set (repeatable); kept sealed"}),
        ("--timeout-seconds", {"dest": "TimeoutSeconds", "type": int}),
        ("--password-length", {"dest": "PasswordLength", "type": int}),
        ("--exclude-characters", {"dest": "ExcludeCharacters"}),
        ("--allowed-hosts", {"dest": "AllowedHosts", "nargs": "+", "metavar": "HOST[:PORT]",
                             "help": "PostgreSQL: the databases its secrets may name (port 5432 if left out)"}),
        ("--master-secret-arn", {"dest": "MasterSecretArn",
                                 "help": "alternating users: the secret of the user who creates and changes them"})]),
    "list-rotation-functions": ("ListRotationFunctions", [("--account-id", {"required": True, "dest": "AccountId"})]),
    "delete-rotation-function": ("DeleteRotationFunction", [
        ("--account-id", {"required": True, "dest": "AccountId"}),
        ("--function-name", {"required": True, "dest": "FunctionName"})]),
    "put-request-quota": ("PutRequestQuota", [
        ("--account-id", {"required": True, "dest": "AccountId", "help": "an account id, or '*' for every account"}),
        ("--quota-name", {"required": True, "dest": "QuotaName", "help": "e.g. kms:symmetric, kms:CreateKey"}),
        ("--value", {"required": True, "dest": "Value", "type": float, "help": "requests per second, per node"})]),
    "delete-request-quota": ("DeleteRequestQuota", [
        ("--account-id", {"required": True, "dest": "AccountId"}),
        ("--quota-name", {"required": True, "dest": "QuotaName"})]),
    "list-request-quotas": ("ListRequestQuotas", [
        ("--account-id", {"required": True, "dest": "AccountId", "help": "an account id, or '*'"})]),
}



def _admin(args: argparse.Namespace) -> int:
    from ..client.admin import AdminError

    operation, options = ADMIN_COMMANDS[args.admin_command]
    params = {opt["dest"]: getattr(args, opt["dest"]) for _, opt in options}
    for flag in ("Admin", "Operator"):
        if params.get(flag) is False:
            params.pop(flag)
    if params.get("Environment") is not None:
        pairs = [item.partition("=") for item in params["Environment"]]
        if any(not name or not sep for name, sep, _ in pairs):
            print("openkms admin: --env takes NAME=VALUE", file=sys.stderr)
            return 2
        params["Environment"] = {name: value for name, _, value in pairs}
    client = _admin_client(args)
    try:
        result = client.call(operation, **params)
    except AdminError as exc:
        print(f"openkms admin: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"openkms admin: cannot reach {client.endpoint_url}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def _byok_wrap(args: argparse.Namespace) -> int:
    from ..client.byok import wrap_key_material

    try:
        wrapped = wrap_key_material(Path(args.public_key).read_bytes(), args.algorithm,
                                    Path(args.material).read_bytes())
    except (OSError, ValueError) as exc:
        print(f"openkms byok wrap: {exc}", file=sys.stderr)
        return 1
    write_file(args.out, wrapped)
    return 0


def _audit(args: argparse.Namespace) -> int:
    if args.audit_command == "verify":
        return _audit_verify(args)
    from ..client.admin import AdminError

    client = _admin_client(args)
    if args.audit_command == "tail" and args.since is None:
        args.since = time.time() - args.window  # recent records, not the whole log
    filters = {"StartTime": args.since, "EndTime": args.until, "AccountId": args.account_id,
               "PrincipalArn": args.principal_arn, "KeyId": args.key_id, "EventName": args.event_name,
               "ErrorCode": args.error_code} if args.audit_command != "public-key" else {}
    try:
        if args.audit_command == "public-key":
            sys.stdout.write(client.call("GetAuditPublicKey")["PublicKeyPem"])
            return 0
        with contextlib.ExitStack() as stack:
            out: TextIO = stack.enter_context(open(args.out, "w")) if getattr(args, "out", None) else sys.stdout
            token = getattr(args, "next_token", None)
            while True:
                page = client.call("QueryAuditEvents", Limit=args.limit, NextToken=token, **filters)
                for event in page["Events"]:
                    out.write(json.dumps(event, sort_keys=True) + "\n")
                out.flush()
                if page.get("NextToken") and args.audit_command != "query":
                    token = page["NextToken"]
                    continue
                if args.audit_command == "tail" and args.follow:
                    token = page.get("Cursor") or token
                    time.sleep(args.interval)
                    continue
                if args.audit_command == "query" and page.get("NextToken"):
                    print(f"# more: --next-token {page['NextToken']}", file=sys.stderr)
                return 0
    except AdminError as exc:
        print(f"openkms audit: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"openkms audit: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def _audit_verify(args: argparse.Namespace) -> int:
    from ..audit.verify import summary, verify_store
    from ..config import Settings
    from ..errors import ConfigurationError
    from ..storage import Store

    settings = Settings.from_env(data_dir=Path(args.data_dir) if args.data_dir else None,
                                 storage_url=args.storage_url)
    if settings.is_embedded and not (settings.data_dir / "openkms.db").exists():
        print(f"openkms audit verify: no store at {settings.data_dir}", file=sys.stderr)
        return 2
    try:
        store = Store.open(settings.database_url)
    except ConfigurationError as exc:
        print(f"openkms audit verify: {exc}", file=sys.stderr)
        return 2
    try:
        public_key = Path(args.public_key).read_bytes() if args.public_key else None
        archive_dir = Path(args.archive_dir) if args.archive_dir else settings.data_dir / "audit-archive"
        digest_dir = Path(args.digest_dir) if args.digest_dir else settings.data_dir / "audit-digests"
        report = verify_store(store, public_key, archive_dir, digest_dir)
    finally:
        store.close()
    print(summary(report))
    return 0 if report.ok else 1


def _add_root_pkcs11_options(parser: argparse.ArgumentParser, prefix: str, variable: str, which: str = "") -> None:
    which = f"{which} " if which else ""
    parser.add_argument(f"--{prefix}-module", help=f"{which}root key's PKCS#11 module [{variable}_MODULE]")
    parser.add_argument(f"--{prefix}-token-label", help=f"{which}root key's token [{variable}_TOKEN_LABEL]")
    parser.add_argument(f"--{prefix}-key-label",
                        help=f"{which}root key's wrapping key in the token [{variable}_KEY_LABEL, openkms-root]; "
                             f"the PIN only from {variable}_PIN")


def _root_migrate(args: argparse.Namespace) -> int:
    from ..config import Settings
    from ..errors import ConfigurationError, KMSError
    from ..node import DataDirLock
    from ..roots import migrate
    from ..storage import Store

    def reason(exc: Exception) -> str:
        if isinstance(exc, KMSError):
            return f"{exc.code}: {exc.message}"
        if isinstance(exc, OSError) and exc.strerror:
            return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
        return str(exc) or type(exc).__name__

    done: str | None = None  # set once the store holds the new source
    try:
        current = Settings.from_env(data_dir=Path(args.data_dir) if args.data_dir else None,
                                    storage_url=args.storage_url, root_pkcs11_module=args.root_pkcs11_module,
                                    root_pkcs11_token_label=args.root_pkcs11_token_label,
                                    root_pkcs11_key_label=args.root_pkcs11_key_label)
        new_env = {k.replace("OPENKMS_NEW_", "OPENKMS_", 1): v for k, v in os.environ.items()
                   if k.startswith("OPENKMS_NEW_ROOT_")}
        target = Settings.from_env(new_env, data_dir=current.data_dir, root_pkcs11_module=args.pkcs11_module,
                                   root_pkcs11_token_label=args.pkcs11_token_label,
                                   root_pkcs11_key_label=args.pkcs11_key_label)
        if current.is_embedded and not (current.data_dir / "openkms.db").exists():
            raise ConfigurationError(f"no store at {current.data_dir}")
        lock = DataDirLock(current.data_dir)  # the server must be stopped
        try:
            store = Store.open(current.database_url)
            try:
                done = migrate(current, store, args.target, target)
            finally:
                store.close()
        finally:
            lock.release()
    except (ConfigurationError, KMSError, OSError) as exc:
        # One line, never a traceback; after the commit, say that it is done and what is left.
        # (migrate's own errors after its commit already say "the migration is committed".)
        line = reason(exc) if done is None else f"the migration is committed ({done}), but then: {reason(exc)}"
        print(f"openkms root migrate: {line}", file=sys.stderr)
        return 2
    print(f"openkms root migrate: {done}")
    return 0


def _add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint-url", help="server URL [OPENKMS_ENDPOINT_URL, http://127.0.0.1:8080]")
    parser.add_argument("--credentials-file", help="AWS-format credentials file [<data-dir>/credentials]")
    parser.add_argument("--profile", default="default", help="section of the credentials file")
    parser.add_argument("--region", help="region to sign for [AWS_DEFAULT_REGION, the file's region]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openkms",
                                     description="A key management service that speaks the AWS KMS API.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server (SQLite in ./openkms-data unless told otherwise)")
    serve.add_argument("--host", help="address to listen on [OPENKMS_HOST, 127.0.0.1]")
    serve.add_argument("--port", help="port to listen on [OPENKMS_PORT, 8080]")
    serve.add_argument("--data-dir", help=f"data directory [OPENKMS_DATA_DIR, {DEFAULT_DATA_DIR}]")
    serve.add_argument("--storage-url", help="postgresql://... to keep state in PostgreSQL [OPENKMS_STORAGE_URL]")
    serve.add_argument("--region", help="region in ARNs and SigV4 scopes, fixed at first start "
                       "[OPENKMS_REGION, us-east-1]")
    serve.add_argument("--reuse-port", action="store_true",
                       help="share the port with other processes (SO_REUSEPORT) [OPENKMS_REUSE_PORT]")
    _add_root_pkcs11_options(serve, "root-pkcs11", "OPENKMS_ROOT_PKCS11")
    serve.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM, chain included) [OPENKMS_TLS_CERT]")
    serve.add_argument("--tls-key", help="the certificate's private key (PEM) [OPENKMS_TLS_KEY]")
    serve.add_argument("--tls-client-ca", help="require client certificates that chain to this CA (PEM): mTLS "
                       "[OPENKMS_TLS_CLIENT_CA]")
    serve.add_argument("--metrics-listen", metavar="HOST:PORT",
                       help="serve Prometheus metrics on this address (no authentication) [OPENKMS_METRICS_LISTEN]")
    serve.add_argument("--insecure-http", action="store_true",
                       help="allow plain HTTP on an address beyond loopback (warned about at every start) "
                       "[OPENKMS_INSECURE_HTTP]")
    serve.set_defaults(func=_serve)

    root = sub.add_parser("root", help="the root key: move it to another source, with the server stopped")
    root_sub = root.add_subparsers(dest="root_command", required=True)
    migrate = root_sub.add_parser("migrate", help="re-wrap the root key for another source (never the key material)")
    migrate.add_argument("--to", required=True, choices=["file", "passphrase", "pkcs11"], dest="target")
    migrate.add_argument("--data-dir", help=f"data directory [OPENKMS_DATA_DIR, {DEFAULT_DATA_DIR}]")
    migrate.add_argument("--storage-url", help="the PostgreSQL store [OPENKMS_STORAGE_URL]")
    _add_root_pkcs11_options(migrate, "root-pkcs11", "OPENKMS_ROOT_PKCS11", "the current")
    _add_root_pkcs11_options(migrate, "pkcs11", "OPENKMS_NEW_ROOT_PKCS11", "the new (--to pkcs11)")
    migrate.set_defaults(func=_root_migrate)

    admin = sub.add_parser("admin", help="manage accounts, users and access keys through the admin API")
    _add_client_options(admin)
    admin_sub = admin.add_subparsers(dest="admin_command", required=True)
    for name, (_, options) in ADMIN_COMMANDS.items():
        cmd = admin_sub.add_parser(name)
        for flag, kwargs in options:
            cmd.add_argument(flag, **kwargs)
    admin.set_defaults(func=_admin)

    byok = sub.add_parser("byok", help="customer-side tools for importing your own key material")
    byok_sub = byok.add_subparsers(dest="byok_command", required=True)
    wrap = byok_sub.add_parser("wrap", help="wrap key material with the wrapping key from GetParametersForImport")
    wrap.add_argument("--public-key", required=True, help="the wrapping public key (DER or PEM)")
    wrap.add_argument("--algorithm", required=True, choices=list(WRAPPING_ALGORITHMS))
    wrap.add_argument("--material", required=True, help="the raw key material (32 bytes, or PKCS#8 DER)")
    wrap.add_argument("--out", required=True, help="where to write the wrapped material (mode 0600)")
    wrap.set_defaults(func=_byok_wrap)

    audit = sub.add_parser("audit", help="query, export, follow and verify the audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    for name, text in (("query", "print matching records, one JSON object a line"),
                       ("export", "write every matching record to a JSON Lines file (for a SIEM)"),
                       ("tail", "print recent records; -f keeps following new ones")):
        cmd = audit_sub.add_parser(name, help=text)
        _add_client_options(cmd)
        cmd.add_argument("--since", type=_epoch, help="start time (ISO 8601 or epoch seconds)")
        cmd.add_argument("--until", type=_epoch, help="end time (ISO 8601 or epoch seconds)")
        cmd.add_argument("--account-id")
        cmd.add_argument("--principal-arn")
        cmd.add_argument("--key-id", help="key id or key ARN")
        cmd.add_argument("--event-name", help="operation, e.g. Decrypt")
        cmd.add_argument("--error-code", help="e.g. AccessDeniedException")
        cmd.add_argument("--limit", type=int, default=100, help="records per request (1-1000)")
        if name == "query":
            cmd.add_argument("--next-token", help="continue where a previous query's page ended")
        if name == "export":
            cmd.add_argument("--out", required=True, help="JSON Lines file to write")
        if name == "tail":
            cmd.add_argument("-f", "--follow", action="store_true", help="keep printing new records")
            cmd.add_argument("--window", type=float, default=60.0,
                             help="without --since, start this many seconds back [60]")
            cmd.add_argument("--interval", type=float, default=1.0, help="seconds between polls with -f")
    pub = audit_sub.add_parser("public-key", help="print the audit signing public key (PEM)")
    _add_client_options(pub)
    verify = audit_sub.add_parser("verify", help="check the hash chains, signed digests and archives")
    verify.add_argument("--data-dir", help=f"data directory [OPENKMS_DATA_DIR, {DEFAULT_DATA_DIR}]")
    verify.add_argument("--storage-url", help="the PostgreSQL store [OPENKMS_STORAGE_URL]")
    verify.add_argument("--archive-dir", help="archived records [<data-dir>/audit-archive]")
    verify.add_argument("--public-key", help="audit public key PEM (default: the one in the store)")
    verify.add_argument("--digest-dir", help="digests the nodes exported [<data-dir>/audit-digests]")
    audit.set_defaults(func=_audit)

    from ..xksproxy.cli import add_parser as add_xks_proxy  # argparse only; the proxy loads when it runs

    add_xks_proxy(sub)
    from .backup import add_parser as add_backup  # backup and restore: argparse only, like xks-proxy
    add_backup(sub)
    return parser


def _epoch(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        from datetime import datetime

        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
