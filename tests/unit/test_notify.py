"""Change notifications (storage/notify.py): what one node sends, every other node reads back
exactly, in payloads PostgreSQL accepts."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openkms.storage import notify
from openkms.storage.repos import Changes

ids = st.text(min_size=1, max_size=300)
version = st.one_of(st.none(), st.integers(min_value=1, max_value=2**31))


@st.composite
def changes(draw: st.DrawFn) -> Changes:
    return Changes(
        keys=draw(st.sets(ids, max_size=60)), versions=draw(st.sets(st.tuples(ids, version), max_size=60)),
        aliases=draw(st.sets(st.tuples(ids, ids), max_size=30)), alias_keys=draw(st.sets(ids, max_size=10)),
        tags=draw(st.sets(ids, max_size=10)), key_stores=draw(st.sets(ids, max_size=10)),
        grants=draw(st.sets(ids, max_size=10)), identities=draw(st.sets(ids, max_size=10)),
        access_keys=draw(st.sets(ids, max_size=10)), secrets=draw(st.sets(ids, max_size=10)),
        quotas=draw(st.sets(ids, max_size=5)))


def merged(parts: list[Changes]) -> Changes:
    out = Changes()
    for part in parts:
        for name in notify._FIELDS:
            getattr(out, name).update(getattr(part, name))
    return out


@settings(max_examples=150, deadline=None)
@given(changes())
def test_what_is_sent_is_read_back_in_payloads_postgresql_takes(sent: Changes) -> None:
    payloads = list(notify.payloads("sender-1", sent))
    assert all(len(p.encode()) <= notify.MAX_PAYLOAD < 8000 for p in payloads)
    read = [notify.parse(p) for p in payloads]
    assert {sender for sender, _ in read} <= {"sender-1"}
    assert merged([c for _, c in read]) == sent
    assert bool(payloads) == bool(sent)


def test_a_large_transaction_is_split() -> None:
    sent = Changes(keys={f"{i:08d}-" + "k" * 60 for i in range(1000)})
    payloads = list(notify.payloads("s", sent))
    assert len(payloads) > 5
    assert merged([notify.parse(p)[1] for p in payloads]) == sent


@pytest.mark.parametrize("payload", ["", "{", "[]", '{"o": 1, "c": []}', '{"o": "s"}',
                                     '{"o": "s", "c": [["versions"]]}', '{"o": "s", "c": [["versions", ["k", "one"]]]}',
                                     '{"o": "s", "c": 5}'])
def test_a_payload_that_is_not_ours_is_refused(payload: str) -> None:
    with pytest.raises(ValueError):
        notify.parse(payload)


def test_a_field_of_a_newer_node_is_ignored() -> None:
    sender, got = notify.parse('{"o": "s", "c": [["keys", "k1"], ["policies_v2", "x"]]}')
    assert (sender, got) == ("s", Changes(keys={"k1"}))
