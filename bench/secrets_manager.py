"""GetSecretValue throughput and latency of openkms's Secrets Manager against moto_server's, in the same run, with wrk.

    python bench/secrets_manager.py [--duration 10] [--connections 64] [--repeat 3] [--skip-moto]
                                    [--storage-url URL] [--json]

Starts a real `openkms serve` (embedded SQLite unless --storage-url; auditing on, its default) and
`moto_server` on loopback ports, creates on each a secret whose SecretString is 1,024 random
printable characters (`secretsmanager.CreateSecret`), signs one `secretsmanager.GetSecretValue` of
it (SigV4, service `secretsmanager`), checks that it answers 200 with the secret, and has wrk replay
it: a warm-up per server, then the measured runs, openkms and moto in turn. Prints req/s, p50 and
p99 per server, the openkms/moto ratio of req/s, and whether the issue's targets are met. It prints;
it asserts nothing about timing. Exit status: 0 measured, 1 a run failed (a server, a non-200
answer), 2 a tool is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import string
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from random import SystemRandom
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._load import (
    REGION,
    ErrorAnswer,
    LoadOptions,
    SignedRequest,
    WrkStats,
    check_replay,
    format_ratio,
    measure_alternating,
    median_stats,
    met_text,
    parse_load_args,
    ratio,
    run_bench,
    signed_request,
    table_header,
    table_row,
)
from bench._moto import KmsServer, openkms_hint, running_servers

SECRET_CHARS = 1024
PRINTABLE = string.ascii_letters + string.digits + string.punctuation  # printable ASCII, no whitespace
SECRET_NAME = "bench/get-secret-value"
# The targets for openkms on this workload.
TARGET_REQ_PER_SEC = 3000.0
TARGET_RATIO = 10.0


def secret_string(body: bytes) -> Any:
    """The SecretString of a GetSecretValue answer's body, or None."""
    with contextlib.suppress(ValueError):
        answer = json.loads(body)
        return answer.get("SecretString") if isinstance(answer, dict) else None
    return None


@dataclass
class Target:
    """One server under load: where it is, how to sign for it, its secret, and what was measured."""

    label: str  # "openkms" or "moto"
    server: KmsServer
    secret_value: str = ""
    runs: list[WrkStats] = field(default_factory=list)

    def signed(self, operation: str, payload: dict[str, Any]) -> SignedRequest:
        return signed_request(self.server.endpoint, f"secretsmanager.{operation}", payload, self.server.access_key_id,
                              self.server.secret_access_key, region=REGION, service="secretsmanager")

    def create_secret(self, hint: str = "") -> None:
        """CreateSecret with a new random value, sent as one signed request (it must answer 200)."""
        self.secret_value = "".join(SystemRandom().choices(PRINTABLE, k=SECRET_CHARS))
        payload = {"Name": SECRET_NAME, "SecretString": self.secret_value, "ClientRequestToken": str(uuid.uuid4()),
                   "Description": "bench/secrets.py"}
        try:
            check_replay(self.signed("CreateSecret", payload), self.label)
        except ErrorAnswer as exc:
            raise ErrorAnswer(f"{exc}{hint}", exc.answer) from exc

    def request(self) -> SignedRequest:
        """A freshly signed GetSecretValue of the secret (a signature replays for 5 minutes)."""
        return self.signed("GetSecretValue", {"SecretId": SECRET_NAME})

    def check_answer(self) -> None:
        """One GetSecretValue, which must answer 200 with the very SecretString that was stored."""
        body = check_replay(self.request(), self.label)
        if secret_string(body) != self.secret_value:
            raise ErrorAnswer(f"{self.label}: GetSecretValue answered 200 without the secret's SecretString: "
                              f"{body[:300].decode(errors='replace')}", "HTTP 200 without the secret")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return parse_load_args(__doc__, argv)


def run(args: argparse.Namespace, workdir: Path) -> list[Target]:
    with running_servers(workdir, storage_url=args.storage_url, moto=not args.skip_moto) as servers:
        targets = [Target(name, server) for name, server in servers]
        for target in targets:
            target.create_secret(openkms_hint(args.storage_url) if target.label == "openkms" else "")
            target.check_answer()
        # Rounds alternate openkms and moto, so that drift of the box costs both about the same.
        measure_alternating(targets, LoadOptions.from_args(args))
    return targets


def summarize(targets: list[Target], args: argparse.Namespace, load_before: float) -> dict[str, Any]:
    medians = {t.label: median_stats(t.runs) for t in targets}
    ours = medians["openkms"]
    ours_over_moto = ratio(ours, medians.get("moto"))
    return {
        "benchmark": "secrets",
        "operation": "secretsmanager.GetSecretValue",
        "secret_string_chars": SECRET_CHARS,
        "auditing": "on",
        "storage": "postgresql" if args.storage_url else "sqlite (embedded)",
        # Other work on the box skews every figure: how busy it was before the servers started, and after.
        "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
        "wrk": LoadOptions.from_args(args).summary(),
        "results": {t.label: {"median": medians[t.label], "runs": t.runs} for t in targets},
        "ratio_req_per_sec": ours_over_moto,
        # Round by round (openkms and moto measured back to back): how steady the ratio was.
        "ratio_per_round": [ratio(a, b) for a, b in zip(targets[0].runs, targets[1].runs, strict=True)]
        if len(targets) > 1 else [],
        "targets": {
            "req_per_sec": {"want": f">= {TARGET_REQ_PER_SEC:g}", "value": ours["requests_per_sec"],
                            "met": ours["requests_per_sec"] >= TARGET_REQ_PER_SEC},
            "ratio_vs_moto": {"want": f">= {TARGET_RATIO:g}", "value": ours_over_moto,
                              "met": None if ours_over_moto is None else ours_over_moto >= TARGET_RATIO},
        },
    }


def print_table(summary: dict[str, Any], load: LoadOptions) -> None:
    print(f"GetSecretValue of a {summary['secret_string_chars']:,}-character SecretString, auditing on, "
          f"{load.describe()}, {load.repeat} measured run(s) per server (medians, rounds alternating), "
          f"openkms storage: {summary['storage']}, load average before {summary['load_average_before']:.2f}, "
          f"after {summary['load_average_after']:.2f}")
    print(table_header())
    for name, result in summary["results"].items():
        print(table_row(name, result["median"]))
    for name, result in summary["results"].items():
        print(f"  {name} runs req/s: " + " / ".join(f"{r['requests_per_sec']:,.0f}" for r in result["runs"]))
    ratio_text = format_ratio(summary["ratio_req_per_sec"])
    rounds = ", ".join(format_ratio(r) for r in summary["ratio_per_round"])
    print(f"openkms/moto req/s: {ratio_text}" + (f" (per round: {rounds})" if rounds else ""))
    t = summary["targets"]
    print(f"issue targets: >= {TARGET_REQ_PER_SEC:,.0f} GetSecretValue/s {met_text(t['req_per_sec']['met'])} "
          f"({t['req_per_sec']['value']:,.0f}); >= {TARGET_RATIO:g}x moto_server "
          f"{met_text(t['ratio_vs_moto']['met'])} ({ratio_text})")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    return run_bench("bench/secrets.py", args, lambda tmp: summarize(run(args, tmp), args, load_before),
                     lambda summary: print_table(summary, LoadOptions.from_args(args)),
                     needs_moto=not args.skip_moto)


if __name__ == "__main__":
    sys.exit(main())
