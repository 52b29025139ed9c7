"""The ciphertext blob format (openkms.crypto.blob): round trips, tampering, encryption context.

Every way a blob can be damaged must end in InvalidCiphertextException, raised by parse_header or
open_blob, and never in another exception type (a ValueError or IndexError would become a 500).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from openkms.crypto import blob
from openkms.errors import InvalidCiphertextException

MATERIAL = bytes(range(32))
KEY_ID = "0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f0"

plaintexts = st.binary(min_size=0, max_size=4096)
contexts = st.dictionaries(st.text(max_size=20), st.text(max_size=40), max_size=6)
versions = st.integers(min_value=1, max_value=2**32 - 1)


def decrypt(blob_bytes: bytes, context: Mapping[str, str] | None, material: bytes = MATERIAL) -> bytes:
    """What Decrypt does with a blob: read the header, then open the rest."""
    header = blob.parse_header(blob_bytes)
    return blob.open_blob(material, header, blob_bytes, context)


def assert_rejected(blob_bytes: bytes, context: Mapping[str, str] | None) -> None:
    try:
        decrypt(blob_bytes, context)
    except InvalidCiphertextException:
        return
    except Exception as exc:
        pytest.fail(f"{type(exc).__name__} escaped instead of InvalidCiphertextException: {exc!r}")
    pytest.fail("a damaged blob was accepted")


# -- round trips ------------------------------------------------------------------------------------
@given(plaintext=plaintexts, context=contexts, version=versions)
def test_round_trip(plaintext: bytes, context: dict[str, str], version: int) -> None:
    key_id = str(uuid.uuid4())
    sealed = blob.seal(MATERIAL, key_id, version, plaintext, context)

    header = blob.parse_header(sealed)
    assert header.key_id == key_id
    assert header.version == version
    assert header.raw == sealed[:blob.HEADER_BYTES]
    assert len(sealed) == blob.HEADER_BYTES + len(plaintext) + 16
    assert blob.open_blob(MATERIAL, header, sealed, context) == plaintext


def test_layout_of_format_1() -> None:
    sealed = blob.seal(MATERIAL, KEY_ID, 7, b"hello", None)
    assert sealed[0] == blob.FORMAT_V1
    assert sealed[1:17] == uuid.UUID(KEY_ID).bytes
    assert sealed[17:21] == (7).to_bytes(4, "big")
    assert blob.parse_header(sealed).salt == sealed[21:37]


def test_each_seal_is_fresh() -> None:
    a = blob.seal(MATERIAL, KEY_ID, 1, b"same plaintext", {"k": "v"})
    b = blob.seal(MATERIAL, KEY_ID, 1, b"same plaintext", {"k": "v"})
    assert a[21:37] != b[21:37], "salts must be random per message"
    assert a[37:] != b[37:]


def test_none_and_empty_context_are_the_same() -> None:
    sealed = blob.seal(MATERIAL, KEY_ID, 1, b"x", None)
    assert decrypt(sealed, {}) == b"x"
    sealed = blob.seal(MATERIAL, KEY_ID, 1, b"x", {})
    assert decrypt(sealed, None) == b"x"


def test_wrong_material_fails() -> None:
    sealed = blob.seal(MATERIAL, KEY_ID, 1, b"secret", None)
    with pytest.raises(InvalidCiphertextException):
        decrypt(sealed, None, material=os.urandom(32))


# -- tampering --------------------------------------------------------------------------------------
@settings(max_examples=300)
@given(plaintext=st.binary(max_size=64), context=contexts, data=st.data())
def test_flipping_any_bit_is_invalid_ciphertext(plaintext: bytes, context: dict[str, str],
                                                data: st.DataObject) -> None:
    sealed = blob.seal(MATERIAL, KEY_ID, 3, plaintext, context)
    bit = data.draw(st.integers(min_value=0, max_value=len(sealed) * 8 - 1), label="bit")
    damaged = bytearray(sealed)
    damaged[bit // 8] ^= 1 << (bit % 8)
    assert_rejected(bytes(damaged), context)


def test_flipping_every_bit_of_a_small_blob() -> None:
    """Exhaustive over one blob, so that no header field is left to chance."""
    sealed = blob.seal(MATERIAL, KEY_ID, 1, b"abc", {"purpose": "test"})
    for bit in range(len(sealed) * 8):
        damaged = bytearray(sealed)
        damaged[bit // 8] ^= 1 << (bit % 8)
        assert_rejected(bytes(damaged), {"purpose": "test"})


@given(plaintext=st.binary(max_size=64), data=st.data())
def test_truncation_is_invalid_ciphertext(plaintext: bytes, data: st.DataObject) -> None:
    sealed = blob.seal(MATERIAL, KEY_ID, 1, plaintext, None)
    length = data.draw(st.integers(min_value=0, max_value=len(sealed) - 1), label="length")
    assert_rejected(sealed[:length], None)


@given(plaintext=st.binary(max_size=64), extra=st.binary(min_size=1, max_size=64))
def test_appended_bytes_are_invalid_ciphertext(plaintext: bytes, extra: bytes) -> None:
    sealed = blob.seal(MATERIAL, KEY_ID, 1, plaintext, None)
    assert_rejected(sealed + extra, None)


@given(junk=st.binary(max_size=200))
def test_arbitrary_bytes_are_invalid_ciphertext(junk: bytes) -> None:
    assert_rejected(junk, None)


def test_header_swapped_between_blobs_fails() -> None:
    a = blob.seal(MATERIAL, KEY_ID, 1, b"first", None)
    b = blob.seal(MATERIAL, KEY_ID, 1, b"second", None)
    assert_rejected(a[:blob.HEADER_BYTES] + b[blob.HEADER_BYTES:], None)


# -- encryption context -----------------------------------------------------------------------------
def _changed_contexts(context: dict[str, str]) -> st.SearchStrategy[dict[str, str]]:
    """Contexts that differ from `context`: a value changed, a key renamed, a pair added or removed."""
    options: list[st.SearchStrategy[dict[str, str]]] = [
        st.tuples(st.text(max_size=10), st.text(max_size=10))
        .filter(lambda kv: kv[0] not in context)
        .map(lambda kv: {**context, kv[0]: kv[1]}),
    ]
    if context:
        keys = sorted(context)
        options.append(st.sampled_from(keys).map(lambda k: {n: v for n, v in context.items() if n != k}))
        options.append(st.tuples(st.sampled_from(keys), st.text(max_size=10))
                       .filter(lambda kv: kv[1] != context[kv[0]])
                       .map(lambda kv: {**context, kv[0]: kv[1]}))
        options.append(st.tuples(st.sampled_from(keys), st.text(max_size=10))
                       .filter(lambda kv: kv[1] not in context)
                       .map(lambda kv: {(kv[1] if n == kv[0] else n): v for n, v in context.items()}))
    return st.one_of(options)


@given(context=contexts, data=st.data())
def test_changed_context_fails(context: dict[str, str], data: st.DataObject) -> None:
    sealed = blob.seal(MATERIAL, KEY_ID, 1, b"payload", context)
    other = data.draw(_changed_contexts(context), label="other context")
    assert other != context
    with pytest.raises(InvalidCiphertextException):
        decrypt(sealed, other)


@given(context=contexts)
def test_context_order_does_not_matter(context: dict[str, str]) -> None:
    reordered = dict(reversed(list(context.items())))
    sealed = blob.seal(MATERIAL, KEY_ID, 1, b"payload", context)
    assert decrypt(sealed, reordered) == b"payload"
    assert blob.encode_context(context) == blob.encode_context(reordered)


@pytest.mark.parametrize(("a", "b"), [
    ({"a": "bc"}, {"ab": "c"}),
    ({"a": ""}, {"": "a"}),
    ({"a": "b", "c": "d"}, {"a": "bcd"}),
    ({"a": "b", "c": "d"}, {"a": "d", "c": "b"}),
    ({}, {"": ""}),
    ({"k": "\u00e9"}, {"k": "e\u0301"}),
])
def test_encode_context_separates_lookalikes(a: dict[str, str], b: dict[str, str]) -> None:
    assert blob.encode_context(a) != blob.encode_context(b)
    sealed = blob.seal(MATERIAL, KEY_ID, 1, b"x", a)
    with pytest.raises(InvalidCiphertextException):
        decrypt(sealed, b)


@given(a=contexts, b=contexts)
def test_encode_context_is_injective(a: dict[str, str], b: dict[str, str]) -> None:
    assume(a != b)
    assert blob.encode_context(a) != blob.encode_context(b)


@settings(max_examples=50)
@given(contexts_=st.lists(contexts, min_size=2, max_size=20, unique_by=lambda c: tuple(sorted(c.items()))))
def test_encode_context_is_injective_on_a_sample(contexts_: list[dict[str, str]]) -> None:
    encoded = {blob.encode_context(c) for c in contexts_}
    assert len(encoded) == len(contexts_)
