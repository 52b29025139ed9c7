"""The `openkms` command: `serve` runs the server, `admin` manages accounts, users and access keys,
`audit` reads and checks the audit log, `byok` wraps key material for import, `root` moves the root
key, `xks-proxy` runs an external key store proxy in front of a PKCS#11 token.

No traceback reaches a user: `main()` runs the whole command and turns every failure into one line
on stderr. Exit status: 0 done; 1 a check that failed (`audit verify` found problems); 2 a bad
argument, setting, file, or a server that cannot be reached; 254 the server answered with an error
(printed as the AWS CLI v2 prints it, with the AWS CLI v2's status; v1 uses 255); 130 interrupted.
`OPENKMS_DEBUG=1` lets an unexpected error's traceback through, for a bug report.

Subcommands plug in with an `add_parser(sub)` hook, as `xksproxy.cli` does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn, TextIO

from ..config import DEFAULT_DATA_DIR, Settings
from ..files import write_file
from ..wrapping import WRAPPING_ALGORITHMS
from .common import CliError, add_client_options, admin_client, path_value, text_value
from .output import apply_query, output_format, write
from .progress import Progress

EXIT_USAGE = 2
EXIT_SERVER_ERROR = 254  # the AWS CLI v2's status for an error answered by the service


def _cannot_start(reason: str) -> int:
    print(f"openkms: cannot start: {reason}", file=sys.stderr)
    return EXIT_USAGE


def _serve(args: argparse.Namespace) -> int:
    from ..config import Settings
    from ..errors import ConfigurationError

    if args.dev:
        return _serve_dev(args)
    if args.dev_account_id:
        return _cannot_start("--dev-account-id goes with --dev")
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
    except ConfigurationError as exc:
        return _cannot_start(str(exc))
    return _run_server(settings)


# What `serve --dev` does not take: its store, root key and listener are its own.
DEV_REFUSED_FLAGS = ("data_dir", "storage_url", "tls_cert", "tls_key", "tls_client_ca", "insecure_http",
                     "root_pkcs11_module", "root_pkcs11_token_label", "root_pkcs11_key_label")
# ... and the variables it ignores (cleared for its worker, which reads its settings from OPENKMS_*).
DEV_IGNORED_VARIABLES = ("OPENKMS_STORAGE_URL", "OPENKMS_ROOT_PASSPHRASE", "OPENKMS_ROOT_PKCS11_MODULE",
                         "OPENKMS_ROOT_PKCS11_TOKEN_LABEL", "OPENKMS_ROOT_PKCS11_KEY_LABEL", "OPENKMS_ROOT_PKCS11_PIN",
                         "OPENKMS_TLS_CERT", "OPENKMS_TLS_KEY", "OPENKMS_TLS_CLIENT_CA", "OPENKMS_INSECURE_HTTP",
                         "OPENKMS_BOOTSTRAP_ACCOUNT_ID", "OPENKMS_BOOTSTRAP_ACCESS_KEY_ID",
                         "OPENKMS_BOOTSTRAP_SECRET_ACCESS_KEY")


def _serve_dev(args: argparse.Namespace) -> int:
    """`serve --dev`: a server over a temporary data dir, deleted when it stops however it is
    stopped short of SIGKILL (SIGTERM, SIGINT, a failed start)."""
    import shutil
    import signal
    import tempfile

    from ..api import dev
    from ..config import Settings, is_loopback
    from ..errors import ConfigurationError

    given = [f"--{name.replace('_', '-')}" for name in DEV_REFUSED_FLAGS if getattr(args, name)]
    if given:
        return _cannot_start(f"--dev keeps a temporary store of its own, on loopback, without TLS: drop "
                             f"{', '.join(given)}")
    try:
        account_id = dev.checked_account_id(args.dev_account_id or os.environ.get("OPENKMS_DEV_ACCOUNT_ID")
                                            or dev.DEFAULT_ACCOUNT_ID)
        host = args.host or os.environ.get("OPENKMS_HOST") or "127.0.0.1"
        if not is_loopback(host):
            raise ConfigurationError(f"--dev listens only on loopback (127.0.0.1, ::1, localhost), not {host}: "
                                     "it lets anyone in as an administrator")
    except ConfigurationError as exc:
        return _cannot_start(str(exc))
    for name in DEV_IGNORED_VARIABLES:
        os.environ.pop(name, None)
    os.environ.setdefault("OPENKMS_QUOTAS", "off")  # test suites make keys faster than AWS's quotas allow

    def stop(signum: int, _frame: object) -> None:  # until granian takes the signals over
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    data_dir = Path(tempfile.mkdtemp(prefix="openkms-dev-"))  # mode 0700
    try:
        dev.mark_data_dir(data_dir, account_id)
        try:
            settings = Settings.from_env(host=host, port=args.port, data_dir=data_dir, region=args.region,
                                         reuse_port=True if args.reuse_port else None,
                                         metrics_listen=args.metrics_listen)
        except ConfigurationError as exc:
            return _cannot_start(str(exc))
        return _run_server(settings, dev_account_id=account_id)
    finally:
        for _ in range(50):  # the worker's audit writer may still be closing its last file
            shutil.rmtree(data_dir, ignore_errors=True)
            if not data_dir.exists():
                break
            time.sleep(0.1)


def _run_server(settings: Settings, dev_account_id: str | None = None) -> int:
    # Server imports stay here so that `openkms admin` needs only the client's dependencies.
    from ..api import listener
    from ..errors import ConfigurationError, KMSError
    from ..node import DataDirLock, NodeClaim, claim_node_id, node_id, open_node, write_credentials

    try:
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
                if dev_account_id is not None:  # its administrator's own key: the banner's `test` is any other
                    issued = node.accounts.bootstrap(dev_account_id, None, None)
                else:
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
        return _cannot_start(str(exc))
    except KMSError as exc:
        return _cannot_start(f"{exc.code}: {exc.message}")
    except OSError as exc:
        return _cannot_start(f"{exc.strerror}: {exc.filename}")

    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    endpoint = f"{settings.scheme}://{host}:{settings.port}"
    if dev_account_id is not None:
        from ..api import dev

        print("\n".join(dev.banner(endpoint, settings, dev_account_id, settings.data_dir)), flush=True)
    else:
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
            # dev mode's app is its own factory: nothing of it is reachable from a normal server's
            "openkms.api.dev:create_app" if dev_account_id is not None else "openkms.api.app:create_app", sock,
            interface=Interfaces.RSGI,
            loop=Loops.uvloop,  # ~50% more requests/s than asyncio's loop on this workload
            factory=True,
            workers=1,
            log_level=LogLevels.warning,
            tls_check=(lambda: listener.tls_options(settings)) if tls else None,
            **tls,
        )
    finally:
        for hold in reversed(held):
            hold.release()
    return 0
# -- admin -------------------------------------------------------------------------------------------


def _command(value: str) -> list[str]:
    """--command: a JSON list of strings, or a single program path."""
    value = text_value(value)
    if value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except ValueError:
            raise argparse.ArgumentTypeError("not a JSON list of strings") from None
        if not isinstance(parsed, list) or not all(isinstance(p, str) for p in parsed):
            raise argparse.ArgumentTypeError("not a JSON list of strings")
        return parsed
    return [value]


def _json_document(value: str) -> str:
    """A JSON document (a policy) given inline or as file://path: refused here if it is not JSON,
    before anything is sent."""
    text = text_value(value)
    try:
        json.loads(text)
    except ValueError as exc:
        where = f" in {value}" if value.startswith(("file://", "fileb://")) else ""
        raise argparse.ArgumentTypeError(f"not a JSON document{where}: {exc}") from None
    return text


def _number(value: str) -> int:
    text = text_value(value).strip()
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _rate(value: str) -> float:
    text = text_value(value).strip()
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of requests per second") from None


@dataclass(frozen=True)
class AdminCommand:
    operation: str
    description: str
    example: str
    options: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


_ACCOUNT = ("--account-id", {"required": True, "dest": "AccountId", "help": "the 12-digit account id"})
_USER = ("--user-name", {"required": True, "dest": "UserName"})
_POLICY = ("--policy-name", {"required": True, "dest": "PolicyName"})

ADMIN_COMMANDS: dict[str, AdminCommand] = {
    "create-account": AdminCommand(
        "CreateAccount", "Create an account (operators only). It has no users until you create them.",
        "openkms admin create-account --name team-a --query Account.AccountId --output text",
        [("--name", {"required": True, "dest": "Name"}),
         ("--account-id", {"dest": "AccountId", "help": "12 digits of your choice (default: random)"})]),
    "delete-account": AdminCommand(
        "DeleteAccount", "Delete an account with its users; refused while it holds keys not yet deleted.",
        "openkms admin delete-account --account-id 123456789012", [_ACCOUNT]),
    "list-accounts": AdminCommand(
        "ListAccounts", "List the accounts you may see: every account for an operator, your own otherwise.",
        "openkms admin list-accounts --output table"),
    "create-user": AdminCommand(
        "CreateUser", "Create a user. It may do nothing until an identity policy allows it (put-user-policy); "
        "--admin makes an account administrator, --operator an operator.",
        "openkms admin create-user --account-id 123456789012 --user-name app",
        [_ACCOUNT, _USER,
         ("--admin", {"action": "store_true", "dest": "Admin", "help": "an administrator of its account"}),
         ("--operator", {"action": "store_true", "dest": "Operator", "help": "an operator of every account"})]),
    "get-user": AdminCommand(
        "GetUser", "Show a user and its level; without options, the caller itself (who am I).",
        "openkms admin get-user --query '[AccountId,UserName,Level]' --output text",
        [("--account-id", {"dest": "AccountId"}), ("--user-name", {"dest": "UserName"})]),
    "delete-user": AdminCommand(
        "DeleteUser", "Delete a user with its access keys (which stop working at once) and policies.",
        "openkms admin delete-user --account-id 123456789012 --user-name app", [_ACCOUNT, _USER]),
    "list-users": AdminCommand(
        "ListUsers", "List an account's users and their levels.",
        "openkms admin list-users --account-id 123456789012 --query 'Users[].UserName'", [_ACCOUNT]),
    "create-access-key": AdminCommand(
        "CreateAccessKey", "Make an access key pair for a user. The secret is shown this once.",
        "openkms admin create-access-key --account-id 123456789012 --user-name app \\\n"
        "    --query 'AccessKey.[AccessKeyId,SecretAccessKey]' --output text", [_ACCOUNT, _USER]),
    "list-access-keys": AdminCommand(
        "ListAccessKeys", "List a user's access keys and their status (never the secrets).",
        "openkms admin list-access-keys --account-id 123456789012 --user-name app", [_ACCOUNT, _USER]),
    "update-access-key": AdminCommand(
        "UpdateAccessKey", "Switch an access key off (Inactive) or on again (Active).",
        "openkms admin update-access-key --access-key-id AKIA... --status Inactive",
        [("--access-key-id", {"required": True, "dest": "AccessKeyId"}),
         ("--status", {"required": True, "dest": "Status", "choices": ["Active", "Inactive"]})]),
    "delete-access-key": AdminCommand(
        "DeleteAccessKey", "Delete an access key; it stops working at once.",
        "openkms admin delete-access-key --access-key-id AKIA...",
        [("--access-key-id", {"required": True, "dest": "AccessKeyId"})]),
    "put-user-policy": AdminCommand(
        "PutUserPolicy", "Attach (or replace) a user's named identity policy: what the user may do, as in IAM.",
        "openkms admin put-user-policy --account-id 123456789012 --user-name app --policy-name kms-use \\\n"
        "    --policy-document file://app-policy.json",
        [_ACCOUNT, _USER, _POLICY,
         ("--policy-document", {"required": True, "dest": "PolicyDocument", "type": _json_document,
                                "help": "the policy (JSON), inline or as file://path"})]),
    "get-user-policy": AdminCommand(
        "GetUserPolicy", "Show one of a user's identity policies.",
        "openkms admin get-user-policy --account-id 123456789012 --user-name app --policy-name kms-use "
        "--query PolicyDocument --output text", [_ACCOUNT, _USER, _POLICY]),
    "delete-user-policy": AdminCommand(
        "DeleteUserPolicy", "Remove one of a user's identity policies.",
        "openkms admin delete-user-policy --account-id 123456789012 --user-name app --policy-name kms-use",
        [_ACCOUNT, _USER, _POLICY]),
    "list-user-policies": AdminCommand(
        "ListUserPolicies", "List the names of a user's identity policies.",
        "openkms admin list-user-policies --account-id 123456789012 --user-name app", [_ACCOUNT, _USER]),
    "create-hsm-cluster": AdminCommand(
        "CreateHsmCluster", "Register a PKCS#11 token as an HSM cluster that one account's custom key stores "
        "may use (operators only).",
        "openkms admin create-hsm-cluster --pkcs11-module /usr/lib/softhsm/libsofthsm2.so --token-label kms \\\n"
        "    --trust-anchor-certificate file://customerCA.crt --account-id 123456789012",
        [("--pkcs11-module", {"required": True, "dest": "Pkcs11Module", "help": "the module's path on the server"}),
         ("--token-label", {"required": True, "dest": "TokenLabel"}),
         ("--trust-anchor-certificate", {"required": True, "dest": "TrustAnchorCertificate",
                                         "help": "the cluster's CA certificate (PEM), inline or as file://path"}),
         ("--account-id", {"required": True, "dest": "AccountId",
                           "help": "the tenant account whose custom key stores may use the token"})]),
    "list-hsm-clusters": AdminCommand(
        "ListHsmClusters", "List the registered HSM clusters (operators only).",
        "openkms admin list-hsm-clusters --output table"),
    "describe-hsm-cluster": AdminCommand(
        "DescribeHsmCluster", "Show one HSM cluster.", "openkms admin describe-hsm-cluster --cluster-id cluster-...",
        [("--cluster-id", {"required": True, "dest": "ClusterId"})]),
    "delete-hsm-cluster": AdminCommand(
        "DeleteHsmCluster", "Remove an HSM cluster; refused while a custom key store uses it.",
        "openkms admin delete-hsm-cluster --cluster-id cluster-...",
        [("--cluster-id", {"required": True, "dest": "ClusterId"})]),
    "create-rotation-function": AdminCommand(
        "CreateRotationFunction", "Register a Secrets Manager rotation function for an account: a webhook, a "
        "command on the server (operators only), or a built-in kind.",
        "openkms admin create-rotation-function --account-id 123456789012 --function-name rand \\\n"
        "    --kind random-password --password-length 32",
        [_ACCOUNT,
         ("--function-name", {"required": True, "dest": "FunctionName"}),
         ("--kind", {"required": True, "dest": "Kind", "choices": ["webhook", "command", "random-password",
                                                                   "postgresql-single-user",
                                                                   "postgresql-alternating-users"]}),
         ("--url", {"dest": "Url", "help": "webhook: the https:// URL each step is POSTed to"}),
         ("--command", {"dest": "Command", "type": _command,
                        "help": 'command: a JSON list, e.g. \'["/usr/local/bin/rotate", "--verbose"]\', or one path'}),
         ("--env", {"dest": "Environment", "action": "append", "metavar": "NAME=VALUE",
                    "help": "command: a variable to set (repeatable); kept sealed"}),
         ("--timeout-seconds", {"dest": "TimeoutSeconds", "type": _number}),
         ("--password-length", {"dest": "PasswordLength", "type": _number}),
         ("--exclude-characters", {"dest": "ExcludeCharacters"}),
         ("--allowed-hosts", {"dest": "AllowedHosts", "nargs": "+", "metavar": "HOST[:PORT]",
                              "help": "PostgreSQL: the databases its secrets may name (port 5432 if left out)"}),
         ("--master-secret-arn", {"dest": "MasterSecretArn",
                                  "help": "alternating users: the secret of the user who creates and changes them"})]),
    "list-rotation-functions": AdminCommand(
        "ListRotationFunctions", "List an account's rotation functions.",
        "openkms admin list-rotation-functions --account-id 123456789012", [_ACCOUNT]),
    "delete-rotation-function": AdminCommand(
        "DeleteRotationFunction", "Remove a rotation function.",
        "openkms admin delete-rotation-function --account-id 123456789012 --function-name rand",
        [_ACCOUNT, ("--function-name", {"required": True, "dest": "FunctionName"})]),
    "put-request-quota": AdminCommand(
        "PutRequestQuota", "Set a request quota of an account, or of every account ('*'), in requests per second "
        "per node (operators only).",
        "openkms admin put-request-quota --account-id 123456789012 --quota-name kms:symmetric --value 20000",
        [("--account-id", {"required": True, "dest": "AccountId", "help": "an account id, or '*' for every account"}),
         ("--quota-name", {"required": True, "dest": "QuotaName", "help": "e.g. kms:symmetric, kms:CreateKey"}),
         ("--value", {"required": True, "dest": "Value", "type": _rate, "help": "requests per second, per node"})]),
    "delete-request-quota": AdminCommand(
        "DeleteRequestQuota", "Put a quota an operator set back to its default (operators only).",
        "openkms admin delete-request-quota --account-id 123456789012 --quota-name kms:symmetric",
        [("--account-id", {"required": True, "dest": "AccountId", "help": "an account id, or '*'"}),
         ("--quota-name", {"required": True, "dest": "QuotaName"})]),
    "list-request-quotas": AdminCommand(
        "ListRequestQuotas", "List every request quota of an account: its value, AWS's default and where the value "
        "comes from.",
        "openkms admin list-request-quotas --account-id 123456789012",
        [("--account-id", {"required": True, "dest": "AccountId", "help": "an account id, or '*'"})]),
}


def _call(client: Any, operation: str, **params: Any) -> dict[str, Any]:
    """One admin API call; not reaching the server is a one-line CliError that says what to check."""
    import ssl

    try:
        return client.call(operation, **params)  # type: ignore[no-any-return]
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise CliError(f"the server at {client.endpoint_url} has a certificate that does not verify "
                           f"({reason.verify_message}): pass --ca-bundle (or set AWS_CA_BUNDLE) to the CA that "
                           "issued it") from None
        if isinstance(reason, ssl.SSLError):
            raise CliError(f"TLS with the server at {client.endpoint_url} failed ({reason.reason or reason}): "
                           "is it serving https:// there, and does it want a client certificate?") from None
        raise CliError(f"cannot reach the server at {client.endpoint_url} ({_reason(reason)}): is `openkms serve` "
                       "running there? (--endpoint-url, OPENKMS_ENDPOINT_URL or AWS_ENDPOINT_URL)") from None
    except (ConnectionError, TimeoutError) as exc:
        raise CliError(f"lost the server at {client.endpoint_url} ({_reason(exc)}): is `openkms serve` "
                       "running there?") from None
    except ValueError as exc:  # a 200 answer that is not JSON: something else listens there
        raise CliError(f"the server at {client.endpoint_url} did not answer as openkms does ({exc}): is the "
                       "endpoint URL right?") from None


def _reason(reason: object) -> str:
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def _admin(args: argparse.Namespace) -> int:
    command = ADMIN_COMMANDS[args.admin_command]
    params = {opt["dest"]: getattr(args, opt["dest"]) for _, opt in command.options}
    for flag in ("Admin", "Operator"):
        if params.get(flag) is False:
            params.pop(flag)
    if params.get("Environment") is not None:
        pairs = [item.partition("=") for item in params["Environment"]]
        if any(not name or not sep for name, sep, _ in pairs):
            raise CliError("--env takes NAME=VALUE")
        params["Environment"] = {name: value for name, _, value in pairs}
    fmt = output_format(args)
    result = _call(admin_client(args), command.operation, **params)
    write(apply_query(args, result), fmt, sys.stdout, title=command.operation)
    return 0


# -- byok --------------------------------------------------------------------------------------------


def _byok_wrap(args: argparse.Namespace) -> int:
    from ..client.byok import wrap_key_material

    def read(path: Path, what: str) -> bytes:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise CliError(f"no {what} file at {path}") from None
        except OSError as exc:
            raise CliError(f"cannot read the {what} file {path}: {exc.strerror or exc}") from None

    public_key, material = read(args.public_key, "public key"), read(args.material, "key material")
    try:
        wrapped = wrap_key_material(public_key, args.algorithm, material)
    except ValueError as exc:
        raise CliError(f"cannot wrap: {exc}") from None
    try:
        write_file(args.out, wrapped)
    except OSError as exc:
        raise CliError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    print(f"wrote {len(wrapped)} bytes of wrapped key material to {args.out}", file=sys.stderr)
    return 0


# -- audit -------------------------------------------------------------------------------------------


def _epoch(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        pass
    from datetime import UTC, datetime

    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a time: give ISO 8601 (2026-11-22, 2026-11-22T08:00:00Z) or epoch seconds") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # as the AWS CLI reads a time without a zone: UTC
    return moment.timestamp()


def _tail_user_agent() -> str:
    """The User-Agent of one `audit tail`'s own polling calls: recorded in their audit records like
    any other caller's, and how this tail recognises them to leave them out."""
    import secrets

    from .. import __version__

    return f"openkms-cli/{__version__} audit-tail/{secrets.token_hex(6)}"


def _audit(args: argparse.Namespace) -> int:
    command = args.audit_command
    tailing = command == "tail"
    own_agent = _tail_user_agent() if tailing else None
    fmt = output_format(args)
    if command != "public-key" and fmt == "table" and command != "query":
        raise CliError(f"--output table is for `audit query`; `audit {command}` prints json or text")
    client = admin_client(args, user_agent=own_agent)
    if command == "public-key":
        sys.stdout.write(_call(client, "GetAuditPublicKey")["PublicKeyPem"])
        return 0
    if tailing and args.since is None:
        args.since = time.time() - args.window  # recent records, not the whole log
    filters = {"StartTime": args.since, "EndTime": args.until, "AccountId": args.account_id,
               "PrincipalArn": args.principal_arn, "KeyId": args.key_id, "EventName": args.event_name,
               "ErrorCode": args.error_code}
    hide_own = tailing and not args.include_own_polls
    written = 0
    exporting = command == "export"
    with contextlib.ExitStack() as stack:
        out: TextIO = sys.stdout
        progress = None
        if exporting:
            try:
                out = stack.enter_context(open(args.out, "w", encoding="utf-8"))
            except OSError as exc:
                raise CliError(f"cannot write {args.out}: {exc.strerror or exc}") from None
            progress = stack.enter_context(Progress("exporting audit records"))
        table: list[Any] = []
        token = getattr(args, "next_token", None)
        try:
            while True:
                page = _call(client, "QueryAuditEvents", Limit=args.limit, NextToken=token, **filters)
                for event in page["Events"]:
                    if hide_own and event.get("userAgent") == own_agent:
                        continue
                    written += 1
                    shown = apply_query(args, event)
                    if exporting:
                        out.write(json.dumps(event, sort_keys=True) + "\n")
                    elif fmt == "table":
                        table.append(shown)
                    else:
                        write(shown, fmt, out, compact=True)
                out.flush()
                if progress is not None:
                    progress.update(written)
                if page.get("NextToken") and command != "query":
                    token = page["NextToken"]
                    continue
                if tailing and args.follow:
                    token = page.get("Cursor") or token
                    time.sleep(args.interval)
                    continue
                break
        except KeyboardInterrupt:
            if not tailing:
                raise
    if table:
        write(table, "table", sys.stdout, title="QueryAuditEvents")
    if command == "query" and page.get("NextToken"):
        print(f"# more: --next-token {page['NextToken']}", file=sys.stderr)
    if exporting:
        print(f"wrote {written} record{'' if written == 1 else 's'} to {args.out}", file=sys.stderr)
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    from ..audit.log import PUBLIC_KEY_META
    from ..audit.verify import exported_digests, summary, verify_store
    from ..crypto.signing import fingerprint
    from ..storage import Store

    settings = Settings.from_env(data_dir=Path(args.data_dir) if args.data_dir else None,
                                 storage_url=args.storage_url)
    if settings.is_embedded and not (settings.data_dir / "openkms.db").exists():
        raise CliError(f"no store at {settings.data_dir}: pass --data-dir (or --storage-url) of the server's store")
    try:
        public_key = args.public_key.read_bytes() if args.public_key else None
    except OSError as exc:
        raise CliError(f"cannot read the public key {args.public_key}: {exc.strerror or exc}") from None
    archive_dir = Path(args.archive_dir) if args.archive_dir else settings.data_dir / "audit-archive"
    digest_dir = Path(args.digest_dir) if args.digest_dir else settings.data_dir / "audit-digests"
    store = Store.open(settings.database_url)
    try:
        with Progress("verifying the audit log"):
            report = verify_store(store, public_key, archive_dir, digest_dir)
        trusted = public_key
        if trusted is None:
            with store.begin() as tx:
                trusted = tx.meta.get(PUBLIC_KEY_META)
    finally:
        store.close()
    print(summary(report))
    if trusted is not None:
        try:
            print_fingerprint = f"SHA-256 {fingerprint(trusted)}"
        except ValueError:
            print_fingerprint = "not a public key"
        if args.public_key:
            print(f"public key: {args.public_key} ({print_fingerprint})")
        else:
            print(f"public key: the one in the store ({print_fingerprint}); someone who can write the store "
                  "could replace it: pass --public-key with a copy kept apart (`openkms audit public-key`)")
    copies = sum(len(d) for d in exported_digests(digest_dir).values())
    if copies:
        print(f"digest copies: {copies} read from {digest_dir}")
    else:
        print(f"warning: no exported digest copies in {digest_dir}: the digests were checked against the "
              "store alone; pass --digest-dir where the nodes export them", file=sys.stderr)
    return 0 if report.ok else 1


# -- root --------------------------------------------------------------------------------------------


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




# -- the parser --------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line that names the help to read (not the usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def _help(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """A command given without its subcommand prints its help (and exits 2: nothing was done)."""
    def show(_: argparse.Namespace) -> int:
        parser.print_help()
        return EXIT_USAGE
    return show


def _subparsers(parser: argparse.ArgumentParser, dest: str, title: str = "commands") -> Any:
    sub = parser.add_subparsers(dest=dest, title=title, metavar="<command>", parser_class=_Parser)
    parser.set_defaults(func=_help(parser))
    return sub


def _command_parser(sub: Any, name: str, help: str, description: str | None = None,
                    example: str | None = None) -> argparse.ArgumentParser:
    epilog = f"example:\n  {example}" if example else None
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help, description=description or help[:1].upper() + help[1:] + ".", epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    return parser


# What each setting without a flag of `openkms serve` does; `serve --help` lists them all, and a
# test checks that none is left out.
ENVIRONMENT_SETTINGS: dict[str, str] = {
    "root_passphrase": "root key from this passphrase (scrypt) instead of <data-dir>/root.key",
    "root_pkcs11_pin": "the PIN of the root key's PKCS#11 token",
    "scheduler_interval": "seconds between looks for keys whose deletion or rotation is due",
    "cache_ttl": "seconds a node trusts its cached view of keys and access keys, should it miss another node's "
                 "change notification",
    "quotas": "off: no request quotas (AWS's per-account rates, per node; on by default)",
    "log_level": "debug, info, warning or error",
    "log_format": "text or json (one object a line)",
    "access_log": "on: a line per API call in the log openkms.access (costs throughput)",
    "audit": "off records nothing (for measuring its cost, never for production)",
    "audit_digest_interval": "seconds between signed digests of the audit chain",
    "audit_retention_days": "days records stay in the store before they are archived (0: never)",
    "metrics_token": "serve GET /metrics on the API port to `Authorization: Bearer <token>` (16+ chars)",
    "xks_ca_bundle": "CA bundle (PEM) to verify XKS proxies with [the system's]",
    "xks_client_cert": "client certificate (PEM) for XKS proxies that require mTLS",
    "xks_client_key": "its private key (PEM)",
    "xks_allow_http": "allow http:// XKS proxy endpoints",
    "xks_timeout_ms": "time limit of each XKS proxy call, a retry included (10-60000)",
    "xks_rate_limit": "calls per second to each external key store from this node",
    "hsm_rate_limit": "cryptographic calls per second to each HSM key store on this node",
    "xks_health_interval": "seconds between health checks of each connected XKS proxy",
    "blocking_threads": "threads for calls that wait on the store or an XKS proxy (1-1024); XKS and HSM crypto "
                        "do not use them",
    "rotation_ca_bundle": "CA bundle (PEM) to verify webhook rotation functions with [the system's]",
    "rotation_allow_http": "allow http:// webhook URLs",
    "rotation_allowed_networks": "CIDRs, comma-separated, a webhook may be on besides public addresses",
}
BOOTSTRAP_SETTINGS = {
    "OPENKMS_BOOTSTRAP_ACCOUNT_ID": "the first account's id (12 digits), at first start only",
    "OPENKMS_BOOTSTRAP_ACCESS_KEY_ID": "its administrator's access key id, at first start only",
    "OPENKMS_BOOTSTRAP_SECRET_ACCESS_KEY": "and secret",
}


def _environment_only(serve: argparse.ArgumentParser) -> str:
    flags = {action.dest for action in serve._actions}
    lines = ["settings only as environment variables [default]:"]
    for f in fields(Settings):
        if f.name in flags:
            continue
        default = f.default if f.default not in ("", None) else None
        if isinstance(default, bool):
            default = "on" if default else "off"
        shown = f" [{default}]" if default is not None else ""
        lines.append(f"  OPENKMS_{f.name.upper():<30} {ENVIRONMENT_SETTINGS.get(f.name, '')}{shown}")
    lines += [f"  {name:<38} {text}" for name, text in BOOTSTRAP_SETTINGS.items()]
    return "\n".join(lines)


def _add_serve(sub: Any) -> None:
    serve = _command_parser(sub, "serve", "run the server (SQLite in ./openkms-data unless told otherwise)",
                            example="openkms serve --data-dir /var/lib/openkms\n"
                                    "  openkms serve --dev   # for a laptop or a test suite")
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
    serve.add_argument("--dev", action="store_true",
                       help="dev mode, for laptops and test suites: a temporary store deleted at exit, on loopback "
                       "only, NOT authenticated (any access key id with any secret, e.g. test/test, is the dev "
                       "account's administrator), request quotas off, POST /_openkms/reset empties the store; "
                       "prints the lines to export. Takes no --data-dir, --storage-url, --tls-* or --root-pkcs11-*")
    serve.add_argument("--dev-account-id", metavar="ID",
                       help="with --dev: the account's id (12 digits) [OPENKMS_DEV_ACCOUNT_ID, 000000000000]")
    serve.epilog = _environment_only(serve) + "\n\n" + (serve.epilog or "")
    serve.set_defaults(func=_serve)


def _add_root(sub: Any) -> None:
    root = _command_parser(sub, "root", "the root key: move it to another source, with the server stopped")
    root_sub = _subparsers(root, "root_command")
    migrate = _command_parser(root_sub, "migrate", "re-wrap the root key for another source (never the key "
                              "material)", example="OPENKMS_NEW_ROOT_PASSPHRASE=... openkms root migrate --to "
                              "passphrase --data-dir ./openkms-data")
    migrate.add_argument("--to", required=True, choices=["file", "passphrase", "pkcs11"], dest="target")
    migrate.add_argument("--data-dir", help=f"data directory [OPENKMS_DATA_DIR, {DEFAULT_DATA_DIR}]")
    migrate.add_argument("--storage-url", help="the PostgreSQL store [OPENKMS_STORAGE_URL]")
    _add_root_pkcs11_options(migrate, "root-pkcs11", "OPENKMS_ROOT_PKCS11", "the current")
    _add_root_pkcs11_options(migrate, "pkcs11", "OPENKMS_NEW_ROOT_PKCS11", "the new (--to pkcs11)")
    migrate.set_defaults(func=_root_migrate)


def _add_admin(sub: Any) -> None:
    admin = _command_parser(sub, "admin", "manage accounts, users and access keys through the admin API",
                            description="Manage accounts, users, access keys, HSM clusters and rotation functions "
                            "through the admin API, signed with an administrator's access key. Prints JSON (or "
                            "--output text/table, filtered with --query) as the AWS CLI does.",
                            example="openkms admin --profile ops list-users --account-id 123456789012")
    add_client_options(admin)
    admin_sub = _subparsers(admin, "admin_command")
    for name, command in ADMIN_COMMANDS.items():
        help = command.description.split(". ")[0].rstrip(".")
        cmd = _command_parser(admin_sub, name, help[:1].lower() + help[1:], command.description, command.example)
        for flag, kwargs in command.options:
            if "type" not in kwargs and kwargs.get("action") is None:
                kwargs = {**kwargs, "type": text_value}  # file:// and fileb:// as in the AWS CLI
            cmd.add_argument(flag, **kwargs)
        add_client_options(cmd, repeated=True)
        cmd.set_defaults(func=_admin)


def _add_byok(sub: Any) -> None:
    byok = _command_parser(sub, "byok", "customer-side tools for importing your own key material")
    byok_sub = _subparsers(byok, "byok_command")
    wrap = _command_parser(byok_sub, "wrap", "wrap key material with the wrapping key from GetParametersForImport",
                           description="Wrap key material with the wrapping public key that GetParametersForImport "
                           "returned, for ImportKeyMaterial. Files are paths, file:// or fileb:// as in the AWS CLI.",
                           example="openkms byok wrap --public-key wrapping.der --algorithm RSAES_OAEP_SHA_256 "
                           "--material key.bin --out wrapped.bin")
    wrap.add_argument("--public-key", required=True, type=path_value, help="the wrapping public key (DER or PEM)")
    wrap.add_argument("--algorithm", required=True, choices=list(WRAPPING_ALGORITHMS))
    wrap.add_argument("--material", required=True, type=path_value,
                      help="the raw key material (32 bytes, or PKCS#8 DER)")
    wrap.add_argument("--out", required=True, type=path_value, help="where to write the wrapped material (mode 0600)")
    wrap.set_defaults(func=_byok_wrap)


AUDIT_EXAMPLES = {
    "query": "openkms audit query --key-id 1234abcd-... --event-name Decrypt --since 2026-11-22T00:00:00Z",
    "export": "openkms audit export --since 2026-11-01 --until 2026-12-01 --out november.jsonl",
    "tail": "openkms audit tail -f --event-name Decrypt",
}


def _add_audit(sub: Any) -> None:
    audit = _command_parser(sub, "audit", "query, export, follow and verify the audit log",
                            example="openkms audit tail -f")
    add_client_options(audit)
    audit_sub = _subparsers(audit, "audit_command")
    for name, text in (("query", "print matching records, one JSON object a line"),
                       ("export", "write every matching record to a JSON Lines file (for a SIEM)"),
                       ("tail", "print recent records; -f keeps following new ones")):
        cmd = _command_parser(audit_sub, name, text, example=AUDIT_EXAMPLES[name])
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
            cmd.add_argument("--include-own-polls", action="store_true",
                             help="also print the records of this tail's own QueryAuditEvents calls")
        add_client_options(cmd, repeated=True, output=name != "export")
        cmd.set_defaults(func=_audit)
    pub = _command_parser(audit_sub, "public-key", "print the audit signing public key (PEM)",
                          example="openkms audit public-key > audit-public.pem   # keep it apart from the server")
    add_client_options(pub, repeated=True, output=False)
    pub.set_defaults(func=_audit)
    verify = _command_parser(audit_sub, "verify", "check the hash chains, signed digests and archives",
                             description="Check the hash chains, signed digests and archives of a store, read "
                             "directly (the server may run). Exit status 1 if a problem is found.",
                             example="openkms audit verify --data-dir ./openkms-data --public-key audit-public.pem")
    verify.add_argument("--data-dir", help=f"data directory [OPENKMS_DATA_DIR, {DEFAULT_DATA_DIR}]")
    verify.add_argument("--storage-url", help="the PostgreSQL store [OPENKMS_STORAGE_URL]")
    verify.add_argument("--archive-dir", help="archived records [<data-dir>/audit-archive]")
    verify.add_argument("--public-key", type=path_value,
                        help="audit public key PEM (default: the one in the store)")
    verify.add_argument("--digest-dir", help="digests the nodes exported [<data-dir>/audit-digests]")
    verify.set_defaults(func=_audit_verify)


def _add_completion(sub: Any) -> None:
    completion = _command_parser(sub, "completion", "print a shell completion script (bash or zsh)",
                                 example='eval "$(openkms completion bash)"   # in ~/.bashrc (zsh: ~/.zshrc)')
    completion.add_argument("shell", choices=["bash", "zsh"])
    completion.set_defaults(func=_completion)


def _completion(args: argparse.Namespace) -> int:
    from argcomplete.shell_integration import shellcode

    sys.stdout.write(shellcode(["openkms"], shell=args.shell))
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("openkms")
    except PackageNotFoundError:
        from .. import __version__

        return __version__


def build_parser(hooks: tuple[Callable[[Any], None], ...] = ()) -> argparse.ArgumentParser:
    """The `openkms` parser. `hooks`: more `add_parser(sub)` functions for commands of their own."""
    parser = _Parser(prog="openkms", description="A key management service that speaks the AWS KMS API.",
                     epilog="`openkms <command> --help` tells more. Exit status: 0 done, 1 a check failed, "
                            "2 a bad argument, setting or file, or no server, 254 the server answered an error.")
    parser.add_argument("--version", action="version", version=f"openkms {_version()}")
    sub = _subparsers(parser, "command")
    _add_serve(sub)
    _add_admin(sub)
    _add_audit(sub)
    _add_byok(sub)
    _add_root(sub)
    from ..xksproxy.cli import add_parser as add_xks_proxy  # argparse only; the proxy loads when it runs

    add_xks_proxy(sub)
    from .backup import add_parser as add_backup  # backup and restore: argparse only, like xks-proxy

    add_backup(sub)
    for hook in hooks:  # more commands from modules of their own, each with an add_parser(sub) like xks-proxy's
        hook(sub)
    _add_completion(sub)
    return parser


# -- main: every failure is one line -------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from ..client.admin import AdminError
    from ..errors import ConfigurationError, KMSError

    parser = build_parser()
    if os.environ.get("_ARGCOMPLETE"):  # only while the shell asks for completions
        import argcomplete

        argcomplete.autocomplete(parser)
    try:
        args = parser.parse_args(argv)
        return int(args.func(args))
    except CliError as exc:
        return _fail(exc.message, exc.status)
    except AdminError as exc:
        # As the AWS CLI prints a service's error (and exits 254, as the AWS CLI v2 does).
        print(f"An error occurred ({exc.code}) when calling the {exc.operation or 'admin'} operation: "
              f"{exc.message}", file=sys.stderr)
        return EXIT_SERVER_ERROR
    except ConfigurationError as exc:
        return _fail(str(exc))
    except KMSError as exc:
        return _fail(f"{exc.code}: {exc.message}")
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `openkms audit query | head`: stop quietly
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        what = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else (exc.strerror or str(exc))
        return _fail(what)
    except Exception as exc:
        if os.environ.get("OPENKMS_DEBUG"):
            raise
        return _fail(f"unexpected error: {type(exc).__name__}: {exc} (OPENKMS_DEBUG=1 shows where; "
                     "please report it)")


def _fail(message: str, status: int = EXIT_USAGE) -> int:
    line = " ".join(message.split()) or "failed"  # one line, whatever the message held
    print(f"openkms: {line}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
