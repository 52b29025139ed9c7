"""What auditing costs: Encrypt on openkms with the audit log on, with OPENKMS_AUDIT=off, and on moto_server.

    python bench/audit.py [--duration 10] [--connections 64] [--repeat 3] [--skip-moto] [--tls] [--json]

Starts, in one run, two real `openkms serve` processes (each freshly bootstrapped, embedded SQLite
unless --storage-url/--storage-url-off): one as deployed, recording every call in its hash-chained
audit log before answering, and one with OPENKMS_AUDIT=off; plus `moto_server` as the usual peer.
Creates a symmetric key on each with boto3, signs one `TrentService.Encrypt` of 32 random bytes per
server and has wrk replay it: a warm-up per server, then the measured runs, interleaved (audit on,
audit off, moto; the next round off first) so that the on/off pair sees the same machine. Prints
req/s, p50 and p99 per server, the audit cost (1 - on/off req/s, from the medians and per round),
the openkms/moto ratios, and whether the issue's targets are met. Afterwards it counts the Encrypt
records each openkms store holds, to show the audited server really recorded every call and the
other none. With --tls a third openkms (audit on) serves HTTPS with a certificate made by the
`openssl` binary for the run, measured in the same rounds as the plain one: the TLS cost is
1 - tls/plain req/s (wrk keeps its connections open, so this is the cost of encrypting each call,
not of handshakes). It prints; it asserts nothing about timing. Exit status: 0 measured, 1 a run
failed (a server, a non-200 answer), 2 a tool is missing.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The repository root, for `tests.server` and `bench` when run as `python bench/audit.py`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._load import (
    REGION,
    BenchError,
    LoadOptions,
    SignedRequest,
    WrkStats,
    add_load_arguments,
    check_load_arguments,
    check_replay,
    create_key,
    format_ratio,
    lift_quotas,
    log_tail,
    median_stats,
    met_text,
    progress,
    ratio,
    run_bench,
    run_wrk,
    signed_request,
    table_header,
    table_row,
)
from bench._moto import EMPTY_DB_HINT, KmsServer, MotoServer, bootstrap_env
from tests.server import ServerProcess

PLAINTEXT_BYTES = 32
# The targets: auditing costs at most 20% of Encrypt throughput, and openkms still serves
# at least 5,000 audited Encrypt/s.
TARGET_MAX_COST = 0.20
TARGET_AUDITED_REQ_PER_SEC = 5000.0
ON, OFF, MOTO, TLS = "audit on", "audit off", "moto", "audit on, TLS"


@dataclass
class Target:
    """One server under load: where it is, how to sign for it, and what was measured."""

    name: str
    server: KmsServer
    key_id: str = ""
    runs: list[WrkStats] = field(default_factory=list)
    answered: int = 0  # every Encrypt answered 200: checks, warm-up and measured runs

    def encrypt_request(self) -> SignedRequest:
        """A freshly signed Encrypt of new random bytes (a signature replays for 5 minutes)."""
        plaintext = base64.b64encode(os.urandom(PLAINTEXT_BYTES)).decode()
        return signed_request(self.server.endpoint, "TrentService.Encrypt",
                              {"KeyId": self.key_id, "Plaintext": plaintext},
                              self.server.access_key_id, self.server.secret_access_key, region=REGION,
                              ca_bundle=getattr(self.server, "ca_bundle", None))

    def load(self, load: LoadOptions, duration: int) -> WrkStats:
        request = self.encrypt_request()
        check_replay(request, self.name)
        stats = run_wrk(request, duration=duration, connections=load.connections, threads=load.threads)
        self.answered += 1 + stats["requests"]
        return stats


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add_load_arguments(parser)
    parser.add_argument("--storage-url-off", default=None,
                        help="with --storage-url: the OPENKMS_AUDIT=off server's store (another EMPTY database)")
    parser.add_argument("--tls", action="store_true",
                        help="also measure an audited openkms serving HTTPS (embedded SQLite), beside the plain one")
    args = parser.parse_args(argv)
    check_load_arguments(parser, args)
    if bool(args.storage_url) != bool(args.storage_url_off):
        parser.error("--storage-url and --storage-url-off go together: one empty database per openkms")
    return args


@contextmanager
def running_servers(workdir: Path, args: argparse.Namespace) -> Iterator[list[tuple[str, KmsServer]]]:
    """openkms with auditing, openkms with OPENKMS_AUDIT=off and moto_server (unless --skip-moto);
    a BenchError from inside comes out with the end of their logs."""
    audited = ServerProcess(workdir / "audited", storage_url=args.storage_url, env=bootstrap_env())
    unaudited = ServerProcess(workdir / "unaudited", storage_url=args.storage_url_off,
                              env=bootstrap_env() | {"OPENKMS_AUDIT": "off"})
    peer = None if args.skip_moto else MotoServer(workdir / "moto.log")
    logs: list[tuple[str, Any]] = [("openkms (audit on)", audited), ("openkms (audit off)", unaudited)]
    ours = [audited, unaudited]
    if args.tls:
        cert, key, ca = server_certificate(workdir / "pki")
        secure = ServerProcess(workdir / "tls", env=bootstrap_env(), ca_bundle=str(ca),
                               extra_args=["--tls-cert", str(cert), "--tls-key", str(key)])
        ours.append(secure)
        logs.append(("openkms (audit on, TLS)", secure))
    progress("starting openkms (audit on), openkms (OPENKMS_AUDIT=off)" + (" and moto_server" if peer else ""))
    try:
        for server in ours:
            try:
                server.start()
                lift_quotas(server)
            except RuntimeError as exc:
                raise BenchError(str(exc).rstrip() + (EMPTY_DB_HINT if args.storage_url else "")) from exc
        servers: list[tuple[str, KmsServer]] = [(ON, audited), (OFF, unaudited)]
        if args.tls:
            servers.append((TLS, ours[2]))
        if peer is not None:
            peer.start()
            servers.append((MOTO, peer))
            logs.append(("moto_server", peer))
        try:
            yield servers
        except BenchError as exc:
            shown = "".join(f"\n--- {name} log (end) ---\n{log_tail(server.output())}"
                            for name, server in logs if server.output().strip())
            raise BenchError(f"{exc}{shown}") from exc
    finally:
        for server in ours:
            server.stop()
        if peer is not None:
            peer.stop()


def server_certificate(pki: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate for 127.0.0.1 signed by it, made with the openssl binary: (cert, key, CA)."""
    import subprocess

    pki.mkdir(parents=True, exist_ok=True)

    def openssl(*command: str) -> None:
        try:
            subprocess.run(["openssl", *command], cwd=pki, check=True, capture_output=True, timeout=60)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise BenchError(f"--tls needs the openssl binary: {exc}") from None
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=bench CA")
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (pki / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "server.ext")
    return pki / "server.pem", pki / "server.key", pki / "ca.pem"


def encrypt_records(server: ServerProcess) -> int:
    """How many Encrypt records the server's audit log holds (read straight from its store)."""
    from sqlalchemy import create_engine, text

    from openkms.storage import normalize_url

    url = server.storage_url or f"sqlite:///{(server.data_dir / 'openkms.db').resolve()}"
    engine = create_engine(normalize_url(url))
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM audit_events WHERE event_name = 'Encrypt'"))
                       .scalar_one())
    finally:
        engine.dispose()


def run(args: argparse.Namespace, workdir: Path) -> tuple[list[Target], dict[str, int]]:
    load = LoadOptions.from_args(args)
    with running_servers(workdir, args) as servers:
        targets = []
        for name, server in servers:
            hint = EMPTY_DB_HINT if args.storage_url and name != MOTO else ""
            targets.append(Target(name, server, create_key(name, server.client(), hint, Description="bench/audit.py")))
        for target in targets:
            progress(f"{target.name}: warm-up {load.warmup} s")
            target.load(load, load.warmup)
        openkms_pair = [t for t in targets if t.name != MOTO]  # with --tls, three
        peers = [t for t in targets if t.name == MOTO]
        for i in range(load.repeat):
            # Alternate which openkms goes first, so neither always runs on a warmer (or busier) box.
            for target in (openkms_pair if i % 2 == 0 else openkms_pair[::-1]) + peers:
                progress(f"{target.name}: measuring {load.duration} s ({i + 1}/{load.repeat})")
                target.runs.append(target.load(load, load.duration))
        records = {t.name: encrypt_records(t.server) for t in targets  # type: ignore[arg-type]
                   if isinstance(t.server, ServerProcess)}
    return targets, records


def cost(on: WrkStats, off: WrkStats) -> float:
    """The share of Encrypt throughput that auditing costs: 1 - on/off req/s."""
    return 1.0 - on["requests_per_sec"] / off["requests_per_sec"]


def summarize(targets: list[Target], records: dict[str, int], args: argparse.Namespace,
              load_before: float, load_after: float) -> dict[str, Any]:
    by_name = {t.name: t for t in targets}
    medians = {t.name: median_stats(t.runs) for t in targets}
    on, off, moto = medians[ON], medians[OFF], medians.get(MOTO)
    audit_cost = cost(on, off)
    round_costs = [cost(a, b) for a, b in zip(by_name[ON].runs, by_name[OFF].runs, strict=True)]
    return {
        "benchmark": "audit",
        "operation": "TrentService.Encrypt",
        "plaintext_bytes": PLAINTEXT_BYTES,
        "storage": "postgresql" if args.storage_url else "sqlite (embedded)",
        # Other work on the box skews every figure: how busy it was around the measurement.
        "load_average_before": round(load_before, 2),
        "load_average_after": round(load_after, 2),
        "wrk": LoadOptions.from_args(args).summary(),
        "results": {t.name: {"median": medians[t.name], "runs": t.runs} for t in targets},
        "audit_cost": audit_cost,
        "audit_cost_per_round": round_costs,
        **({"tls_cost": cost(medians[TLS], on),
            "tls_cost_per_round": [cost(a, b) for a, b in zip(by_name[TLS].runs, by_name[ON].runs, strict=True)]}
           if TLS in medians else {}),
        "ratio_req_per_sec": {ON: ratio(on, moto), OFF: ratio(off, moto)},
        "audit_records": {name: {"encrypt_records": n, "encrypts_answered": by_name[name].answered}
                          for name, n in records.items()},
        "targets": {
            "audit_cost": {"want": f"<= {TARGET_MAX_COST:.0%}", "value": audit_cost,
                           "met": audit_cost <= TARGET_MAX_COST},
            "audited_req_per_sec": {"want": f">= {TARGET_AUDITED_REQ_PER_SEC:g}", "value": on["requests_per_sec"],
                                    "met": on["requests_per_sec"] >= TARGET_AUDITED_REQ_PER_SEC},
        },
    }


def print_table(summary: dict[str, Any]) -> None:
    wrk = summary["wrk"]
    load = LoadOptions(duration=wrk["duration_s"], warmup=wrk["warmup_s"], connections=wrk["connections"],
                       threads=wrk["threads"], repeat=wrk["runs"])
    print(f"Encrypt of {summary['plaintext_bytes']} bytes, audit on vs OPENKMS_AUDIT=off vs moto_server, "
          f"{load.describe()}, {wrk['runs']} measured run(s) per server (medians, rounds interleaved), "
          f"openkms storage: {summary['storage']}, load average before {summary['load_average_before']:.2f}, "
          f"after {summary['load_average_after']:.2f}")
    print(table_header())
    for name, result in summary["results"].items():
        print(table_row(name, result["median"]))
    if wrk["runs"] > 1:
        for name, result in summary["results"].items():
            print(f"  {name} runs req/s: " + " / ".join(f"{r['requests_per_sec']:,.0f}" for r in result["runs"]))
    rounds = ", ".join(f"{c:.1%}" for c in summary["audit_cost_per_round"])
    on_p99 = summary["results"][ON]["median"]["latency_ms"]["99"]
    off_p99 = summary["results"][OFF]["median"]["latency_ms"]["99"]
    print(f"audit cost (1 - on/off req/s): {summary['audit_cost']:.1%} (per round: {rounds}); "
          f"p99 {on_p99:.2f} ms on vs {off_p99:.2f} ms off")
    if "tls_cost" in summary:
        tls_rounds = ", ".join(f"{c:.1%}" for c in summary["tls_cost_per_round"])
        tls_p99 = summary["results"][TLS]["median"]["latency_ms"]["99"]
        print(f"TLS cost (1 - tls/plain req/s, both audited): {summary['tls_cost']:.1%} (per round: {tls_rounds}); "
              f"p99 {tls_p99:.2f} ms over TLS vs {on_p99:.2f} ms plain")
    ratios = summary["ratio_req_per_sec"]
    print(f"openkms/moto req/s: {format_ratio(ratios[ON])} with auditing, {format_ratio(ratios[OFF])} without")
    for name, counts in summary["audit_records"].items():
        print(f"{name}: {counts['encrypt_records']:,} Encrypt records in the audit log for "
              f"{counts['encrypts_answered']:,} Encrypts answered 200 (wrk's count, warm-up included)")
    t = summary["targets"]
    print(f"issue targets: auditing costs <= {TARGET_MAX_COST:.0%} of Encrypt throughput "
          f"{met_text(t['audit_cost']['met'])} ({t['audit_cost']['value']:.1%}); "
          f">= {TARGET_AUDITED_REQ_PER_SEC:,.0f} audited Encrypt/s {met_text(t['audited_req_per_sec']['met'])} "
          f"({t['audited_req_per_sec']['value']:,.0f})")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]

    def measure(tmp: Path) -> dict[str, Any]:
        targets, records = run(args, tmp)
        return summarize(targets, records, args, load_before, os.getloadavg()[0])
    return run_bench("bench/audit.py", args, measure, print_table, needs_moto=not args.skip_moto)

if __name__ == "__main__":
    sys.exit(main())
