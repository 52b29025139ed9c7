"""Encrypt through a key in an HSM key store (SoftHSM2) beside a key of the default store, with wrk.

    python bench/hsm.py [--duration 10] [--connections 64] [--repeat 3] [--storage-url URL] [--json]

Starts, in one run, two real `openkms serve` processes (embedded SQLite unless --storage-url; the
database must be empty), auditing on as deployed. On the first, a fresh SoftHSM2 token (its own
SOFTHSM2_CONF) is registered as an HSM cluster, a custom key store made on it and connected, and
two keys created: one in the HSM store and one in the default store. The second server has no
custom key store at all: its default-store key is the baseline. One signed `TrentService.Encrypt`
of 32 random bytes per key is replayed by wrk: a warm-up each, then the measured runs, rounds
interleaved (baseline, default beside HSM, HSM). Prints req/s, p50 and p99 per key, the ratios, and
whether the issue's targets are met (>= 3,000 HSM Encrypt/s and p99 < 50 ms; the default store's
figure unchanged beside an HSM store). The server's per-store request quota (OPENKMS_HSM_RATE_LIMIT)
is raised for the run, so that it measures the path, not the quota. It prints; it asserts nothing
about timing. Exit status: 0
measured, 1 a run failed, 2 a tool is missing (wrk, softhsm2-util).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

# The repository root, for `tests.server` and `bench` when run as `python bench/hsm.py`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._beside import Target, print_table, summarize
from bench._load import (
    REGION,
    BenchError,
    LoadOptions,
    lift_quotas,
    measure_alternating,
    parse_load_args,
    progress,
    run_bench,
)
from bench._moto import bootstrap_env
from openkms.client.admin import AdminClient
from tests.server import ServerProcess

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN = "bench-pin-1234"
TARGET_HSM_RPS = 3000.0
TARGET_HSM_P99_MS = 50.0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return parse_load_args(__doc__, argv, peer=False)


def softhsm(workdir: Path) -> tuple[dict[str, str], str]:
    """A token directory of this run and a token in it: (the environment that points at it, label)."""
    if shutil.which("softhsm2-util") is None or not Path(MODULE).exists():
        raise BenchError("SoftHSM2 is not installed (Debian package softhsm2)")
    tokens = workdir / "tokens"
    tokens.mkdir()
    conf = workdir / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    env = {"SOFTHSM2_CONF": str(conf)}
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "bench", "--so-pin", "so-pin-1234",
                    "--pin", PIN], env={**os.environ, **env}, check=True, capture_output=True)
    return env, "bench"


def trust_anchor(workdir: Path) -> str:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(workdir / "ca.key"), "-out", str(workdir / "ca.crt"), "-days", "1",
                    "-subj", "/CN=bench CA"], check=True, capture_output=True)
    return (workdir / "ca.crt").read_text()


def run(args: argparse.Namespace, workdir: Path) -> list[Target]:
    options = LoadOptions.from_args(args)
    env, label = softhsm(workdir)
    anchor = trust_anchor(workdir)
    boot = bootstrap_env()
    # The per-store request quota (1,800/s) lifted, so that the run measures the path, not the quota.
    with_hsm = ServerProcess(workdir / "with-hsm", storage_url=args.storage_url,
                             env=boot | env | {"OPENKMS_HSM_RATE_LIMIT": "1000000"})
    baseline = ServerProcess(workdir / "baseline", env=bootstrap_env())
    progress("starting openkms (with an HSM key store) and openkms (baseline, no custom key store)")
    try:
        for server in (with_hsm, baseline):
            try:
                server.start()
                lift_quotas(server)
            except RuntimeError as exc:
                raise BenchError(str(exc)) from exc
        admin = AdminClient(with_hsm.endpoint, with_hsm.access_key_id, with_hsm.secret_access_key, REGION)
        account = boot["OPENKMS_BOOTSTRAP_ACCOUNT_ID"]
        cluster = admin.call("CreateHsmCluster", Pkcs11Module=MODULE, TokenLabel=label,
                             TrustAnchorCertificate=anchor, AccountId=account)["ClusterId"]
        kms = with_hsm.client()
        cks = kms.create_custom_key_store(CustomKeyStoreName="bench", CloudHsmClusterId=cluster,
                                          TrustAnchorCertificate=anchor, KeyStorePassword=PIN)["CustomKeyStoreId"]
        kms.connect_custom_key_store(CustomKeyStoreId=cks)
        state = kms.describe_custom_key_stores(CustomKeyStoreId=cks)["CustomKeyStores"][0]["ConnectionState"]
        if state != "CONNECTED":
            raise BenchError(f"the HSM key store did not connect: {state}")
        hsm_key = kms.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=cks)["KeyMetadata"]["KeyId"]
        targets = [
            Target("baseline", baseline, baseline.client().create_key()["KeyMetadata"]["KeyId"]),
            Target("default", with_hsm, kms.create_key()["KeyMetadata"]["KeyId"]),
            Target("hsm", with_hsm, hsm_key),
        ]
        measure_alternating(targets, options)
        return targets
    finally:
        for server in (with_hsm, baseline):
            server.stop()


LEGEND = ("baseline: a default-store key on a server with no custom key store; default: a default-store key "
          "beside the HSM store; hsm: a key in the SoftHSM2 key store")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    return run_bench("bench/hsm.py", args,
                     lambda tmp: summarize("hsm", "hsm", run(args, tmp), args, load_before, TARGET_HSM_RPS,
                                           TARGET_HSM_P99_MS),
                     lambda summary: print_table(summary, LEGEND, "HSM"), needs_moto=False)


if __name__ == "__main__":
    sys.exit(main())
