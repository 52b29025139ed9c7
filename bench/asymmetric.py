"""Sign (ECC P-256) and GenerateMac (HMAC-256) throughput of openkms against moto_server, with wrk.

    python bench/asymmetric.py [--duration 10] [--connections 64] [--repeat 3] [--skip-moto] [--json]

Starts a real `openkms serve` (embedded SQLite unless --storage-url) and `moto_server` on loopback
ports and creates two keys on each with boto3: ECC_NIST_P256 / SIGN_VERIFY and HMAC_256 /
GENERATE_VERIFY_MAC. For each operation, `TrentService.Sign` (ECDSA_SHA_256, MessageType RAW) and
`TrentService.GenerateMac` (HMAC_SHA_256), of a 32-byte message, it signs one request per server and
has wrk replay it: a short warm-up, then the measured run(s). Prints req/s, p50 and p99 per server,
the openkms/moto ratio of req/s, and whether the issue's targets are met. An operation moto_server
rejects is reported as "n/a" in its row rather than failing the run. It prints; it asserts nothing
about timing. Exit status: 0 measured, 1 a run failed (a server, an openkms error answer), 2 a tool
is missing.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The repository root, for `tests.server` and `bench` when run as `python bench/asymmetric.py`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._load import (
    REGION,
    ErrorAnswer,
    LoadOptions,
    SignedRequest,
    WrkStats,
    check_replay,
    create_key,
    format_ratio,
    measure,
    median_stats,
    met_text,
    parse_load_args,
    progress,
    ratio,
    run_bench,
    signed_request,
    table_header,
    table_row,
)
from bench._moto import KmsServer, openkms_hint, running_servers

MESSAGE_BYTES = 32


@dataclass(frozen=True)
class Operation:
    """One KMS operation under load, the key it needs, and the issue's throughput target for openkms."""

    name: str  # "Sign": the X-Amz-Target is TrentService.<name>
    key_params: dict[str, str]  # CreateKey's KeySpec and KeyUsage
    fields: dict[str, str]  # the request's parameters besides KeyId and Message
    response_field: str  # what a 200 answer must carry
    target_label: str  # how the issue names the target
    target_req_per_sec: float

    @property
    def target(self) -> str:
        return f"TrentService.{self.name}"

    def describe(self) -> str:
        key = "/".join(self.key_params.values())
        return f"{self.name} of {MESSAGE_BYTES} bytes, {key} key, " + ", ".join(
            f"{name} {value}" for name, value in self.fields.items())


OPERATIONS = (
    Operation("Sign", {"KeySpec": "ECC_NIST_P256", "KeyUsage": "SIGN_VERIFY"},
              {"SigningAlgorithm": "ECDSA_SHA_256", "MessageType": "RAW"}, "Signature",
              "Sign ECC P-256", 3000.0),
    Operation("GenerateMac", {"KeySpec": "HMAC_256", "KeyUsage": "GENERATE_VERIFY_MAC"},
              {"MacAlgorithm": "HMAC_SHA_256"}, "Mac", "GenerateMac", 5000.0),
)


@dataclass
class Result:
    """One operation on one server: the measured runs, or why it could not be measured there."""

    server: str
    runs: list[WrkStats] = field(default_factory=list)
    not_measured: str | None = None


@dataclass
class Load:
    """One operation against one server: what to sign requests with, and what came of it."""

    operation: Operation
    name: str
    server: KmsServer
    key_id: str = ""
    result: Result = field(init=False)

    def __post_init__(self) -> None:
        self.result = Result(self.name)

    @property
    def label(self) -> str:
        return f"{self.name} {self.operation.name}"

    def request(self) -> SignedRequest:
        """A freshly signed request over new random bytes (a signature replays for 5 minutes)."""
        payload = {"KeyId": self.key_id, "Message": base64.b64encode(os.urandom(MESSAGE_BYTES)).decode(),
                   **self.operation.fields}
        return signed_request(self.server.endpoint, self.operation.target, payload, self.server.access_key_id,
                              self.server.secret_access_key, region=REGION)

    def check_answer(self) -> None:
        """One request, which must answer 200 with the operation's result (a Signature, a Mac)."""
        body = check_replay(self.request(), self.label)
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if not isinstance(answer, dict) or not answer.get(self.operation.response_field):
            raise ErrorAnswer(f"{self.label}: HTTP 200 without {self.operation.response_field}: "
                              f"{body[:300].decode(errors='replace')}",
                              f"HTTP 200 without {self.operation.response_field}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return parse_load_args(__doc__, argv)


def give_up(load: Load, exc: ErrorAnswer) -> None:
    """Record that the peer cannot do this operation; openkms failing it fails the run."""
    if load.name == "openkms":
        raise exc
    load.result = Result(load.name, not_measured=f"{load.name} answered {exc.answer}")
    progress(f"{load.label}: not measured, {str(exc).splitlines()[0]}")


def run(args: argparse.Namespace, workdir: Path) -> dict[str, list[Result]]:
    """Every operation on every server: {operation name: [Result per server, openkms first]}."""
    options = LoadOptions.from_args(args)
    with running_servers(workdir, storage_url=args.storage_url, moto=not args.skip_moto) as servers:
        loads = [Load(operation, name, server) for operation in OPERATIONS for name, server in servers]
        for load in loads:
            hint = openkms_hint(args.storage_url) if load.name == "openkms" else ""
            try:
                load.key_id = create_key(load.name, load.server.client(), hint,
                                         Description=f"bench/asymmetric.py {load.operation.name}",
                                         **load.operation.key_params)
            except ErrorAnswer as exc:
                give_up(load, exc)
        # Operation by operation, so that the two servers of a comparison run close together in time.
        for load in loads:
            if load.result.not_measured is not None:
                continue
            try:
                load.check_answer()
                load.result.runs = measure(load.label, load.request, options)
            except ErrorAnswer as exc:
                give_up(load, exc)
    results: dict[str, list[Result]] = {}
    for load in loads:
        results.setdefault(load.operation.name, []).append(load.result)
    return results


def summarize(results: dict[str, list[Result]], args: argparse.Namespace, load_before: float) -> dict[str, Any]:
    operations: dict[str, Any] = {}
    for operation in OPERATIONS:
        medians = {r.server: median_stats(r.runs) for r in results[operation.name] if r.runs}
        ours = medians["openkms"]
        rate = ours["requests_per_sec"]
        operations[operation.name] = {
            "operation": operation.target,
            "key": operation.key_params,
            "parameters": operation.fields,
            "message_bytes": MESSAGE_BYTES,
            "results": {r.server: ({"median": medians[r.server], "runs": r.runs} if r.runs
                                   else {"not_measured": r.not_measured}) for r in results[operation.name]},
            "ratio_req_per_sec": ratio(ours, medians.get("moto")),
            "target": {"name": operation.target_label, "want": f">= {operation.target_req_per_sec:g} req/s",
                       "value": rate, "met": rate >= operation.target_req_per_sec},
        }
    return {
        "benchmark": "asymmetric",
        "storage": "postgresql" if args.storage_url else "sqlite (embedded)",
        # Other work on the box skews every figure: how busy it was just before the servers started.
        "load_average_before": round(load_before, 2),
        "wrk": LoadOptions.from_args(args).summary(),
        "operations": operations,
    }


def print_table(summary: dict[str, Any]) -> None:
    wrk = summary["wrk"]
    load = LoadOptions(duration=wrk["duration_s"], warmup=wrk["warmup_s"], connections=wrk["connections"],
                       threads=wrk["threads"], repeat=wrk["runs"])
    print(f"Sign and GenerateMac, {load.describe()}, {wrk['runs']} measured run(s) per server and operation "
          f"(medians), openkms storage: {summary['storage']}, "
          f"load average before {summary['load_average_before']:.2f}")
    targets = []
    for operation in OPERATIONS:
        entry = summary["operations"][operation.name]
        print()
        print(operation.describe())
        print(table_header())
        for name, result in entry["results"].items():
            print(table_row(name, result["median"]) if "median" in result
                  else f"{name:<10}  n/a: {result['not_measured']}")
        ratio_text = format_ratio(entry["ratio_req_per_sec"])
        print(f"openkms/moto req/s: {ratio_text}")
        target = entry["target"]
        targets.append(f"{target['name']} >= {operation.target_req_per_sec:,.0f}/s {met_text(target['met'])} "
                       f"({target['value']:,.0f})")
    print()
    print("issue targets: " + "; ".join(targets))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    return run_bench("bench/asymmetric.py", args, lambda tmp: summarize(run(args, tmp), args, load_before),
                     print_table, needs_moto=not args.skip_moto)

if __name__ == "__main__":
    sys.exit(main())
