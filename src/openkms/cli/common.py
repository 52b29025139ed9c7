"""What the client commands (`admin`, `audit`, `byok`) share with the AWS CLI: the common options,
where the endpoint, credentials, region and CA bundle come from, and `file://`/`fileb://` values.

Precedence is the AWS CLI's: a command-line option, then an environment variable, then the
shared credentials or config file, then the default.

    endpoint     --endpoint-url > OPENKMS_ENDPOINT_URL > AWS_ENDPOINT_URL_KMS > AWS_ENDPOINT_URL
                 > the profile's endpoint_url (config file) > http://127.0.0.1:8080
    credentials  --credentials-file or --profile: that file's profile (AWS_ACCESS_KEY_ID and
                 AWS_SECRET_ACCESS_KEY are then ignored, as `aws --profile` ignores them)
                 > AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY > the shared credentials file's profile
    the file     --credentials-file > AWS_SHARED_CREDENTIALS_FILE > <data-dir>/credentials (the one
                 `openkms serve` writes, if it exists) > ~/.aws/credentials
    profile      --profile > AWS_PROFILE > default
    region       --region > AWS_REGION > AWS_DEFAULT_REGION > the profile's region (credentials file,
                 then config file) > us-east-1
    CA bundle    --no-verify-ssl; --ca-bundle > AWS_CA_BUNDLE > the profile's ca_bundle > the system's CAs
    config file  AWS_CONFIG_FILE > ~/.aws/config (sections [default] and [profile NAME])

The same option may be given before or after the subcommand (`openkms admin --profile ops
list-accounts` and `openkms admin list-accounts --profile ops`): the subcommand's copy of each
option defaults to "not given" (argparse.SUPPRESS), so it never overwrites the one given before.
"""

from __future__ import annotations

import argparse
import configparser
import os
import ssl
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import DEFAULT_DATA_DIR

DEFAULT_ENDPOINT = "http://127.0.0.1:8080"
DEFAULT_REGION = "us-east-1"


class CliError(Exception):
    """A failure to report as one line on stderr (`openkms: <message>`) with an exit status."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


# -- file:// and fileb:// ----------------------------------------------------------------------------


def read_param_file(value: str) -> str | bytes | None:
    """The contents a `file://` (text) or `fileb://` (bytes) value names, as the AWS CLI reads
    them; None for any other value. A file that cannot be read is an argparse error (one line)."""
    for prefix, binary in (("fileb://", True), ("file://", False)):
        if value.startswith(prefix):
            path = Path(os.path.expanduser(value[len(prefix):]))
            try:
                return path.read_bytes() if binary else path.read_text()
            except FileNotFoundError:
                raise argparse.ArgumentTypeError(f"cannot read {value}: no such file") from None
            except IsADirectoryError:
                raise argparse.ArgumentTypeError(f"cannot read {value}: it is a directory") from None
            except UnicodeDecodeError:
                raise argparse.ArgumentTypeError(f"cannot read {value}: not UTF-8 text (fileb:// reads bytes)") \
                    from None
            except OSError as exc:
                raise argparse.ArgumentTypeError(f"cannot read {value}: {exc.strerror or exc}") from None
    return None


def text_value(value: str) -> str:
    """An argparse type: the value itself, or the text of the file a file:// or fileb:// value names."""
    contents = read_param_file(value)
    if contents is None:
        return value
    if isinstance(contents, bytes):
        try:
            return contents.decode()
        except UnicodeDecodeError:
            raise argparse.ArgumentTypeError(f"cannot read {value}: not UTF-8 text") from None
    return contents


def path_value(value: str) -> Path:
    """An argparse type for a file the command reads itself: a path, file://path or fileb://path."""
    for prefix in ("fileb://", "file://"):
        if value.startswith(prefix):
            value = value[len(prefix):]
            break
    return Path(os.path.expanduser(value))


# -- the common options ------------------------------------------------------------------------------


def add_client_options(parser: argparse.ArgumentParser, *, repeated: bool = False, output: bool = True) -> None:
    """The AWS CLI's common options. `repeated`: this is a subcommand's copy of options its parent
    command takes too; a value given here wins, and leaving it out keeps the parent's."""
    default: Any = argparse.SUPPRESS if repeated else None
    group = parser.add_argument_group("common options (before or after the subcommand)")
    group.add_argument("--endpoint-url", default=default,
                       help=f"server URL [OPENKMS_ENDPOINT_URL, AWS_ENDPOINT_URL, {DEFAULT_ENDPOINT}]")
    group.add_argument("--profile", default=default,
                       help="profile of the credentials file [AWS_PROFILE, default]")
    group.add_argument("--credentials-file", default=default,
                       help="AWS-format credentials file [AWS_SHARED_CREDENTIALS_FILE, <data-dir>/credentials "
                            "if it exists, ~/.aws/credentials]")
    group.add_argument("--region", default=default,
                       help=f"region to sign for [AWS_REGION, AWS_DEFAULT_REGION, the profile's, {DEFAULT_REGION}]")
    group.add_argument("--ca-bundle", default=default,
                       help="CA certificates (PEM) to verify an https:// server with [AWS_CA_BUNDLE]")
    group.add_argument("--no-verify-ssl", action="store_true", default=default,
                       help="do not verify the server's certificate (for a test server only)")
    if output:
        from .output import FORMATS, compile_query

        group.add_argument("--output", default=default, choices=FORMATS,
                           help="json, text or table [AWS_DEFAULT_OUTPUT, json]")
        group.add_argument("--query", default=default, type=compile_query,
                           help="a JMESPath expression applied to the result, as in the AWS CLI")


def _option(args: argparse.Namespace, name: str) -> Any:
    return getattr(args, name, None)


def data_dir_credentials(environ: Mapping[str, str]) -> Path:
    return Path(environ.get("OPENKMS_DATA_DIR") or DEFAULT_DATA_DIR) / "credentials"


def _read_ini(path: Path, what: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
    except FileNotFoundError:
        raise CliError(f"no {what} file at {path}: pass --credentials-file or set AWS_SHARED_CREDENTIALS_FILE "
                       "(`openkms serve` writes one to <data-dir>/credentials)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read the {what} file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    except configparser.Error as exc:
        first = str(exc).splitlines()[0]
        raise CliError(f"the {what} file {path} is not in the AWS format ([profile] sections of key = value): "
                       f"{first}") from None
    return parser


@dataclass(frozen=True)
class ClientConfig:
    endpoint_url: str
    access_key_id: str
    secret_access_key: str
    session_token: str | None
    region: str
    ca_bundle: str | None
    verify: bool

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.endpoint_url.startswith("https:"):
            return None
        if not self.verify:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        try:
            return ssl.create_default_context(cafile=self.ca_bundle)
        except FileNotFoundError:
            raise CliError(f"no CA bundle at {self.ca_bundle} (--ca-bundle or AWS_CA_BUNDLE)") from None
        except (ssl.SSLError, OSError) as exc:
            raise CliError(f"cannot use the CA bundle {self.ca_bundle}: {exc}: give a PEM file of CA "
                           "certificates") from None


def check_endpoint(url: str) -> str:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise CliError(f"bad endpoint URL {url!r}: give a URL with its scheme, e.g. http://127.0.0.1:8080 "
                       "(--endpoint-url, OPENKMS_ENDPOINT_URL or AWS_ENDPOINT_URL)")
    try:
        parsed.port  # noqa: B018 -- raises ValueError for a port that is not a number from 0 to 65535
    except ValueError:
        raise CliError(f"bad endpoint URL {url!r}: its port is not a number from 1 to 65535") from None
    return url


def resolve_client(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ClientConfig:
    """Endpoint, credentials, region and TLS settings, in the AWS CLI's order (see the module's docstring)."""
    env = os.environ if environ is None else environ
    profile = _option(args, "profile") or env.get("AWS_PROFILE") or "default"
    explicit_profile = bool(_option(args, "profile"))

    config_path = Path(os.path.expanduser(env.get("AWS_CONFIG_FILE") or "~/.aws/config"))
    config: Mapping[str, str] = {}
    if config_path.is_file():
        parsed_config = _read_ini(config_path, "config")
        name = "default" if profile == "default" else f"profile {profile}"
        if parsed_config.has_section(name):
            config = parsed_config[name]

    credentials_file = _option(args, "credentials_file") or env.get("AWS_SHARED_CREDENTIALS_FILE")
    if credentials_file:
        credentials_path = Path(os.path.expanduser(credentials_file))
    elif data_dir_credentials(env).is_file():
        credentials_path = data_dir_credentials(env)
    else:
        credentials_path = Path(os.path.expanduser("~/.aws/credentials"))

    akid, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    token = env.get("AWS_SESSION_TOKEN") or None
    file_region = None
    if _option(args, "credentials_file") or explicit_profile or not (akid and secret):
        parser = _read_ini(credentials_path, "credentials")
        if not parser.has_option(profile, "aws_access_key_id") or \
                not parser.has_option(profile, "aws_secret_access_key"):
            raise CliError(f"{credentials_path} has no profile [{profile}] with aws_access_key_id and "
                           "aws_secret_access_key: pass --profile (or set AWS_PROFILE) to one it has")
        section = parser[profile]
        akid, secret = section["aws_access_key_id"], section["aws_secret_access_key"]
        token = section.get("aws_session_token") or None
        file_region = section.get("region")
    assert akid and secret

    endpoint = (_option(args, "endpoint_url") or env.get("OPENKMS_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL_KMS")
                or env.get("AWS_ENDPOINT_URL") or config.get("endpoint_url") or DEFAULT_ENDPOINT)
    region = (_option(args, "region") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or file_region
              or config.get("region") or DEFAULT_REGION)
    ca_bundle = _option(args, "ca_bundle") or env.get("AWS_CA_BUNDLE") or config.get("ca_bundle") or None
    return ClientConfig(check_endpoint(endpoint), akid, secret, token, region,
                        os.path.expanduser(ca_bundle) if ca_bundle else None, not _option(args, "no_verify_ssl"))


def admin_client(args: argparse.Namespace, user_agent: str | None = None) -> Any:
    from .. import __version__
    from ..client.admin import AdminClient

    config = resolve_client(args)
    return AdminClient(config.endpoint_url, config.access_key_id, config.secret_access_key, config.region,
                       session_token=config.session_token, ssl_context=config.ssl_context(),
                       user_agent=user_agent or f"openkms-cli/{__version__}")
