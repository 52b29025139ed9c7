"""Metrics in the Prometheus text format, scraped as Prometheus would and read with
prometheus_client's own parser: behind the bearer token on the API listener, and on a port of
their own. The counts follow the calls made; no key id, account or value is ever in them."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import bootstrap_env
from tests.server import ServerProcess, free_port

TOKEN = "metrics-token-0123456789abcdef"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("metrics") / "data",
                         env=dict(bootstrap_env(), OPENKMS_METRICS_TOKEN=TOKEN),
                         extra_args=["--metrics-listen", f"127.0.0.1:{free_port()}"])
    proc.start()
    yield proc
    proc.stop()


def scrape(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(found: dict[Any, float], name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def metrics_port(server: ServerProcess) -> int:
    return int(server.extra_args[server.extra_args.index("--metrics-listen") + 1].rsplit(":", 1)[1])


def test_the_token_guards_metrics_on_the_api_listener(server: ServerProcess) -> None:
    assert scrape(server.endpoint + "/metrics")[0] == 401
    assert scrape(server.endpoint + "/metrics", "wrong-token-0123456789")[0] == 401
    status, text = scrape(server.endpoint + "/metrics", TOKEN)
    assert status == 200 and "openkms_requests_total" in text


def test_counts_follow_the_calls(server: ServerProcess) -> None:
    url = server.endpoint + "/metrics"
    before = samples(scrape(url, TOKEN)[1])
    kms = server.client(retry=False)
    key = kms.create_key()["KeyMetadata"]["KeyId"]
    for _ in range(7):
        kms.encrypt(KeyId=key, Plaintext=b"counted")
    missing = "11111111-2222-3333-4444-555555555555"
    for _ in range(3):
        with pytest.raises(ClientError):
            kms.encrypt(KeyId=missing, Plaintext=b"x")
    sm = server.client(service="secretsmanager", retry=False)
    sm.create_secret(Name="metrics/db", SecretString="never-in-metrics-9f2c")
    sm.get_secret_value(SecretId="metrics/db")
    text = scrape(url, TOKEN)[1]
    after = samples(text)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("openkms_requests_total", api="kms", operation="Encrypt", code="ok") == 7
    assert grew("openkms_requests_total", api="kms", operation="Encrypt", code="NotFoundException") == 3
    assert grew("openkms_requests_total", api="secretsmanager", operation="GetSecretValue", code="ok") == 1
    assert grew("openkms_request_duration_seconds_count", api="kms", operation="Encrypt") == 10
    assert grew("openkms_audit_batch_records_sum") >= 13  # every call above has its record
    assert grew("openkms_audit_commit_seconds_count") >= 1
    assert value(after, "openkms_cache_hits_total", cache="keys") > value(before, "openkms_cache_hits_total",
                                                                          cache="keys")
    for private in (key, missing, "never-in-metrics-9f2c", server.access_key_id, "111122223333"):
        assert private not in text, private  # no key id, value, access key or account


def test_an_unknown_operation_does_not_become_a_label(server: ServerProcess) -> None:
    """Labels come from closed sets: an operation a caller makes up is counted as `unknown`."""
    made_up = "Frobnicate" + "x" * 40
    before = value(samples(scrape(server.endpoint + "/metrics", TOKEN)[1]), "openkms_requests_total", api="kms",
                   operation="unknown", code="UnknownOperationException")
    request = urllib.request.Request(server.endpoint + "/", data=b"{}", method="POST", headers={
        "X-Amz-Target": f"TrentService.{made_up}", "Content-Type": "application/x-amz-json-1.1"})
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(request, timeout=10)
    text = scrape(server.endpoint + "/metrics", TOKEN)[1]
    assert made_up not in text
    codes = {labels for name, labels in samples(text) if name == "openkms_requests_total"}
    assert all(dict(labels)["operation"] != made_up for labels in codes)
    assert before <= value(samples(text), "openkms_requests_total", api="kms", operation="unknown",
                           code="UnknownOperationException")


def test_metrics_on_their_own_port(server: ServerProcess, tmp_path: Path) -> None:
    status, text = scrape(f"http://127.0.0.1:{metrics_port(server)}/metrics")
    assert status == 200
    found = samples(text)
    assert any(name == "openkms_requests_total" for name, _ in found)
    # Without a token, the API listener has no /metrics at all.
    plain = ServerProcess(tmp_path / "data", env=bootstrap_env())
    plain.start()
    try:
        assert scrape(plain.endpoint + "/metrics")[0] in (400, 404)
    finally:
        plain.stop()


def test_a_metrics_port_in_use_stops_the_start(server: ServerProcess, tmp_path: Path) -> None:
    from tests.test_one_server import refuse

    taken = f"127.0.0.1:{metrics_port(server)}"
    line = refuse(ServerProcess(tmp_path / "data", env=bootstrap_env(), extra_args=["--metrics-listen", taken]))
    assert taken in line and "in use" in line
