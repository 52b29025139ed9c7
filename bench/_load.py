"""Replaying one SigV4-signed AWS JSON request with wrk, and reading wrk's report.

boto3 tops out near 500 calls/s from one thread, so it cannot load a fast server. Instead a
benchmark signs ONE request with botocore, checks that it succeeds, and has wrk replay it: the
server accepts a signed request again and again within its 5-minute clock-skew window, so sign
afresh before each wrk run.

    request = signed_request(endpoint, "TrentService.Encrypt", {"KeyId": key_id, "Plaintext": b64},
                             access_key_id, secret_access_key)
    check_replay(request)                     # one real request: HTTP 200 or BenchError
    stats = run_wrk(request, duration=10, connections=64)   # BenchError on any non-2xx/3xx answer

It also holds what every benchmark script shares: the command-line options (`add_load_arguments`,
`LoadOptions`), the warm-up-then-measure loop (`measure`), key creation (`create_key`) and the
table rows (`table_header`, `table_row`). A server that answers errors raises `ErrorAnswer`, a
BenchError that says in a few words what the server answered, so that a script can report an
operation a peer does not support instead of failing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypedDict
from urllib.parse import urlsplit

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import BotoCoreError, ClientError

REGION = "us-east-1"
AMZ_JSON = "application/x-amz-json-1.1"
PERCENTILES = (50, 75, 90, 99)  # what `wrk --latency` prints


class BenchError(Exception):
    """A benchmark cannot produce a meaningful figure (a tool is missing, requests fail, ...)."""


class ErrorAnswer(BenchError):
    """A server answered the benchmark's request with an error, so the operation cannot be measured there.

    `answer` says what it answered in a few words ("HTTP 400 UnsupportedOperationException"), for a
    table cell; the message has the details.
    """

    def __init__(self, message: str, answer: str) -> None:
        super().__init__(message)
        self.answer = answer


def error_type(body: bytes) -> str:
    """The AWS error code in an error body (`{"__type": ...}`), or the start of the body."""
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if isinstance(document, dict) and isinstance(document.get("__type"), str):
        return str(document["__type"]).rsplit("#", 1)[-1]
    text = " ".join(body[:60].decode(errors="replace").split())
    return text or "(empty body)"


@dataclass(frozen=True)
class SignedRequest:
    """One fully signed HTTP request, ready to be sent as-is any number of times."""

    method: str
    url: str
    headers: dict[str, str]
    body: bytes
    ca_bundle: str | None = None  # https: the CA the check's urllib trusts (wrk verifies no certificate)

    @property
    def target(self) -> str:
        return self.headers.get("X-Amz-Target", "")


def signed_request(endpoint: str, target: str, payload: Mapping[str, Any], access_key_id: str,
                   secret_access_key: str, *, region: str = REGION, service: str = "kms",
                   ca_bundle: str | None = None) -> SignedRequest:
    """An AWS JSON 1.1 `POST /` for `target` (e.g. "TrentService.Encrypt"), signed with SigV4 now."""
    url = endpoint.rstrip("/") + "/"
    body = json.dumps(payload, separators=(",", ":")).encode()
    # Host is set (and so signed) explicitly, so what wrk and urllib send is exactly what was signed.
    request = AWSRequest(method="POST", url=url, data=body, headers={
        "Host": urlsplit(url).netloc, "Content-Type": AMZ_JSON, "X-Amz-Target": target})
    SigV4Auth(Credentials(access_key_id, secret_access_key), service, region).add_auth(request)
    headers = {name: str(value) for name, value in request.headers.items()}
    return SignedRequest("POST", url, headers, body, ca_bundle)


def replay_once(request: SignedRequest, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send the request once; returns (HTTP status, body), error statuses included."""
    req = urllib.request.Request(request.url, data=request.body, headers=request.headers,
                                 method=request.method)
    context = None
    if request.ca_bundle:
        import ssl

        context = ssl.create_default_context(cafile=request.ca_bundle)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def check_replay(request: SignedRequest, label: str = "") -> bytes:
    """Send the request once and raise BenchError unless it answers 200: never benchmark errors."""
    status, body = replay_once(request)
    if status != 200:
        raise ErrorAnswer(f"{label or request.url}: {request.target} answered HTTP {status}, not 200: "
                          f"{body[:300].decode(errors='replace')}", f"HTTP {status} {error_type(body)}")
    return body


def lua_string(value: str | bytes) -> str:
    """A double-quoted Lua string literal for any bytes (non-printables as decimal escapes)."""
    data = value.encode() if isinstance(value, str) else value
    out = []
    for byte in data:
        char = chr(byte)
        if char in '"\\':
            out.append("\\" + char)
        elif 32 <= byte < 127:
            out.append(char)
        else:
            out.append(f"\\{byte:03d}")
    return '"' + "".join(out) + '"'


def wrk_lua(request: SignedRequest) -> str:
    """A wrk script that replays `request`: a static request, so wrk builds it once per thread."""
    lines = [f"wrk.method = {lua_string(request.method)}",
             f"wrk.body = {lua_string(request.body)}",
             "wrk.headers = {}"]
    # wrk computes Content-Length from the body itself.
    lines += [f"wrk.headers[{lua_string(name)}] = {lua_string(value)}"
              for name, value in request.headers.items() if name.lower() != "content-length"]
    return "\n".join(lines) + "\n"


def require_wrk() -> str:
    """The path of the wrk binary, or BenchError saying how to get it."""
    path = shutil.which("wrk")
    if path is None:
        raise BenchError("wrk is not installed (it is the load generator these benchmarks use); "
                         "install it, e.g. `apt-get install wrk`, and run again")
    return path


class WrkStats(TypedDict):
    """What one wrk run measured. Latencies are in milliseconds, keyed by percentile ("50", "99")."""

    requests_per_sec: float
    requests: int
    duration_s: float
    latency_ms: dict[str, float]
    non_2xx_3xx: int
    socket_errors: dict[str, int]


_TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_PERCENTILE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.MULTILINE)
_TOTAL_RE = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h)", re.MULTILINE)
_RATE_RE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_SOCKET_RE = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON_2XX_RE = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def parse_wrk(output: str) -> WrkStats:
    """Read the text report of `wrk --latency` (wrk 4.x)."""
    rate, total = _RATE_RE.search(output), _TOTAL_RE.search(output)
    if rate is None or total is None:
        raise BenchError(f"cannot read wrk's report:\n{output}")
    latency = {f"{float(p):g}": float(v) * _TIME_UNITS[unit] for p, v, unit in _PERCENTILE_RE.findall(output)}
    socket = _SOCKET_RE.search(output)
    non_2xx = _NON_2XX_RE.search(output)
    return WrkStats(
        requests_per_sec=float(rate.group(1)),
        requests=int(total.group(1)),
        duration_s=float(total.group(2)) * _TIME_UNITS[total.group(3)] / 1e3,
        latency_ms=latency,
        non_2xx_3xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=dict(zip(("connect", "read", "write", "timeout"),
                               (int(n) for n in socket.groups()), strict=True)) if socket
        else {"connect": 0, "read": 0, "write": 0, "timeout": 0},
    )


def run_wrk(request: SignedRequest, *, duration: int, connections: int = 64, threads: int = 2,
            timeout_s: int = 5, allow_errors: bool = False) -> WrkStats:
    """Load the server with `request` for `duration` seconds (wrk's `--timeout` is `timeout_s`).

    Unless `allow_errors`, a run in which wrk saw any "Non-2xx or 3xx responses" raises BenchError:
    its figures would measure error answers, not the operation.
    """
    wrk = require_wrk()
    with tempfile.TemporaryDirectory(prefix="openkms-wrk-") as tmp:
        script = Path(tmp) / "request.lua"
        script.write_text(wrk_lua(request))
        cmd = [wrk, f"-t{min(threads, connections)}", f"-c{connections}", f"-d{duration}s",
               f"--timeout={timeout_s}s", "--latency", "-s", str(script), request.url]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, check=False)
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"wrk did not finish within {duration + 60} s") from exc
    if done.returncode != 0:
        raise BenchError(f"wrk exited with {done.returncode}:\n{done.stdout}{done.stderr}")
    stats = parse_wrk(done.stdout)
    if stats["non_2xx_3xx"] and not allow_errors:
        raise ErrorAnswer(f"{request.url} {request.target}: wrk reported Non-2xx or 3xx responses: "
                          f"{stats['non_2xx_3xx']} of {stats['requests']} requests, so the figures are "
                          f"not valid:\n{done.stdout}",
                          f"non-2xx to {stats['non_2xx_3xx']:,} of {stats['requests']:,} requests under load")
    return stats


def median_stats(runs: Sequence[WrkStats]) -> WrkStats:
    """The per-figure median of several runs of the same load (counts are summed)."""
    if not runs:
        raise ValueError("no runs")
    keys = runs[0]["latency_ms"].keys()
    return WrkStats(
        requests_per_sec=statistics.median(r["requests_per_sec"] for r in runs),
        requests=sum(r["requests"] for r in runs),
        duration_s=sum(r["duration_s"] for r in runs),
        latency_ms={k: statistics.median(r["latency_ms"][k] for r in runs) for k in keys},
        non_2xx_3xx=sum(r["non_2xx_3xx"] for r in runs),
        socket_errors={k: sum(r["socket_errors"][k] for r in runs) for k in runs[0]["socket_errors"]},
    )


# --- What the benchmark scripts share: options, the measuring loop, keys, the printed table. ---


@dataclass(frozen=True)
class LoadOptions:
    """The wrk load of a benchmark script, from its command line (see `add_load_arguments`)."""

    duration: int = 10
    warmup: int = 2
    connections: int = 64
    threads: int = 2
    repeat: int = 1

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LoadOptions:
        return cls(duration=args.duration, warmup=args.warmup, connections=args.connections,
                   threads=args.threads, repeat=args.repeat)

    def describe(self) -> str:
        """How wrk is run, as a command line would say it: "wrk -t2 -c64 -d10s"."""
        return f"wrk -t{min(self.threads, self.connections)} -c{self.connections} -d{self.duration}s"

    def summary(self) -> dict[str, int]:
        """The "wrk" entry of a script's JSON output."""
        return {"threads": self.threads, "connections": self.connections, "duration_s": self.duration,
                "warmup_s": self.warmup, "runs": self.repeat}


_LOAD_OPTION_NAMES = ("duration", "warmup", "connections", "threads", "repeat")


def add_load_arguments(parser: argparse.ArgumentParser, defaults: LoadOptions | None = None, *,
                       peer: bool = True) -> None:
    """The options every benchmark script takes: the wrk load, --skip-moto, --storage-url and --json.

    `defaults` replaces the usual wrk load defaults (LoadOptions()); `peer=False` leaves out
    --skip-moto, for a script that measures openkms against itself.
    """
    defaults = defaults or LoadOptions()
    parser.add_argument("--duration", type=int, default=defaults.duration,
                        help=f"seconds of each measured wrk run ({defaults.duration})")
    parser.add_argument("--warmup", type=int, default=defaults.warmup,
                        help=f"seconds of the warm-up run per server ({defaults.warmup})")
    parser.add_argument("--connections", type=int, default=defaults.connections,
                        help=f"wrk connections ({defaults.connections})")
    parser.add_argument("--threads", type=int, default=defaults.threads, help=f"wrk threads ({defaults.threads})")
    parser.add_argument("--repeat", type=int, default=defaults.repeat,
                        help=f"measured runs per server; figures are the medians ({defaults.repeat})")
    if peer:
        parser.add_argument("--skip-moto", action="store_true", help="bench openkms only (no ratio)")
    parser.add_argument("--storage-url", default=None,
                        help="openkms storage, e.g. postgresql://user@host/db (an EMPTY database: the "
                             "benchmark bootstraps its admin into it); default embedded SQLite")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")


def check_load_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject (through `parser.error`) load options below 1."""
    for name in _LOAD_OPTION_NAMES:
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")


def parse_load_args(doc: str | None, argv: Sequence[str] | None = None, *, peer: bool = True) -> argparse.Namespace:
    """The command line of a benchmark that takes only the common options (its docstring's first
    line is the description)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    add_load_arguments(parser, peer=peer)
    args = parser.parse_args(argv)
    check_load_arguments(parser, args)
    return args


def progress(message: str) -> None:
    """Progress goes to stderr, so that stdout holds only the table or the JSON document."""
    print(message, file=sys.stderr, flush=True)


def measure(label: str, make_request: Callable[[], SignedRequest], load: LoadOptions) -> list[WrkStats]:
    """A warm-up run, then `load.repeat` measured runs, each replaying a request signed just before it.

    Every signed request is sent once first and must answer 200 (`check_replay`), and a run with any
    non-2xx answer is rejected (`run_wrk`): both raise ErrorAnswer.
    """
    progress(f"{label}: warm-up {load.warmup} s")
    request = make_request()
    check_replay(request, label)
    run_wrk(request, duration=load.warmup, connections=load.connections, threads=load.threads)
    runs = []
    for i in range(load.repeat):
        progress(f"{label}: measuring {load.duration} s ({i + 1}/{load.repeat})")
        request = make_request()
        check_replay(request, label)
        runs.append(run_wrk(request, duration=load.duration, connections=load.connections,
                            threads=load.threads))
    return runs


class Alternating(Protocol):
    """A load that `measure_alternating` runs: a label, a way to sign its request, its runs."""

    label: str
    runs: list[WrkStats]

    def request(self) -> SignedRequest: ...


def measure_alternating(loads: Sequence[Alternating], options: LoadOptions,
                        around: Callable[[Alternating], AbstractContextManager[Any]] | None = None) -> None:
    """A warm-up per load, then `options.repeat` rounds of one measured run per load, in turn forward
    and backward (A B, B A, ...), so that slow drift of the box costs every load about the same.
    `around(load)`, if given, is entered for each measured run (its run is `load.runs[-1]` on exit).

    Every signed request is sent once first and must answer 200, and a run with any non-2xx answer
    is rejected: both raise ErrorAnswer (a BenchError).
    """
    for load in loads:
        progress(f"{load.label}: warm-up {options.warmup} s")
        request = load.request()
        check_replay(request, load.label)
        run_wrk(request, duration=options.warmup, connections=options.connections, threads=options.threads)
    for i in range(options.repeat):
        for load in loads if i % 2 == 0 else list(reversed(loads)):
            progress(f"{load.label}: measuring {options.duration} s ({i + 1}/{options.repeat})")
            request = load.request()
            check_replay(request, load.label)
            with around(load) if around is not None else contextlib.nullcontext():
                load.runs.append(run_wrk(request, duration=options.duration, connections=options.connections,
                                         threads=options.threads))


def process_cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of a process and every process below it, now (Linux's /proc);
    a process that is gone counts 0."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()  # after the command's name
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
            ticks[int(entry.name)] = int(fields[11]) + int(fields[12])
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        total += ticks.get(current, 0)
        todo.extend(children.get(current, ()))
    return total / os.sysconf("SC_CLK_TCK")


# The quotas every account gets on a benchmark's servers: far above what this machine serves, so
# that a run measures the server (the quota check included), not AWS's 10,000 Encrypts a second.
LIFTED_QUOTAS = ("kms:symmetric", "kms:rsa", "kms:ecc", "secretsmanager:GetSecretValue")


def lift_quotas(server: Any) -> None:
    """Raise the shared request quotas of every account of an openkms `server` (tests.server.ServerProcess)."""
    from openkms.client.admin import AdminClient

    admin = AdminClient(server.endpoint, server.access_key_id, server.secret_access_key, REGION,
                        ssl_context=server.ssl_context())
    for name in LIFTED_QUOTAS:
        admin.call("PutRequestQuota", AccountId="*", QuotaName=name, Value=1_000_000.0)


def create_key(label: str, client: Any, hint: str = "", **params: Any) -> str:
    """CreateKey through boto3 (`params` as CreateKey takes them); returns the key id.

    A server's error answer raises ErrorAnswer ("CreateKey answered <code>"); anything else BenchError.
    `hint` is appended to the message.
    """
    try:
        return str(client.create_key(**params)["KeyMetadata"]["KeyId"])
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "?")
        raise ErrorAnswer(f"{label}: CreateKey failed: {exc}{hint}", f"CreateKey {code}") from exc
    except BotoCoreError as exc:
        raise BenchError(f"{label}: CreateKey failed: {exc}{hint}") from exc


def log_tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def ratio(ours: WrkStats, peer: WrkStats | None) -> float | None:
    """openkms req/s over the peer's, or None when the peer was not measured."""
    if peer is None or not peer["requests_per_sec"]:
        return None
    return ours["requests_per_sec"] / peer["requests_per_sec"]


def format_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}x"


def met_text(met: bool | None) -> str:
    return "not measured" if met is None else ("met" if met else "NOT met")


def table_header(name_width: int = 10) -> str:
    return f"{'target':<{name_width}}{'req/s':>12}{'p50 ms':>10}{'p99 ms':>10}{'requests':>11}{'sock err':>10}"


def table_row(name: str, stats: WrkStats, name_width: int = 10) -> str:
    """One line of figures under `table_header`: req/s, p50, p99, requests and socket errors."""
    return (f"{name:<{name_width}}{stats['requests_per_sec']:>12,.0f}{stats['latency_ms']['50']:>10.2f}"
            f"{stats['latency_ms']['99']:>10.2f}{stats['requests']:>11,}"
            f"{sum(stats['socket_errors'].values()):>10,}")


def run_bench(name: str, args: Any, measure: Callable[[Path], dict[str, Any]],
              show: Callable[[dict[str, Any]], None], needs_moto: bool) -> int:
    """The common frame of every benchmark script: check the tools, run in a temporary directory,
    print a table or JSON. Exit 2: a tool is missing; 1: a run failed; 0: measured (targets or not)."""
    import json
    import signal
    import sys
    import tempfile

    from bench._moto import moto_command

    # The servers run in their own sessions: turn SIGTERM into SystemExit so `finally` stops them.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        require_wrk()
        if needs_moto:
            moto_command()
    except BenchError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="openkms-bench-") as tmp:
        try:
            summary = measure(Path(tmp))
        except BenchError as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        show(summary)
    return 0
