"""Request validation derived from botocore's KMS model (openkms.api.shapes).

The expected messages follow the AWS shape, e.g.

    1 validation error detected: Value '0' at 'numberOfBytes' failed to satisfy constraint:
    Member must have value greater than or equal to 1
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any, TypeVar

import botocore.loaders
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openkms.api import shapes
from openkms.errors import SerializationException, ValidationException

OPS = shapes.operations()
KEY_ID = "1234abcd-12ab-34cd-56ef-1234567890ab"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def violations(op: str, body: Any) -> list[str]:
    """The individual violations of a ValidationException, after checking its count prefix."""
    with pytest.raises(ValidationException) as caught:
        OPS[op].parse(body)
    message = caught.value.message
    m = re.fullmatch(r"(\d+) validation (error|errors) detected: (.*)", message, re.DOTALL)
    assert m, message
    count = int(m.group(1))
    assert m.group(2) == ("error" if count == 1 else "errors")
    parts = m.group(3).split("; ")
    assert len(parts) == count, message
    return parts


def only_violation(op: str, body: Any) -> str:
    parts = violations(op, body)
    assert len(parts) == 1, parts
    return parts[0]


def test_every_model_operation_is_compiled() -> None:
    model = botocore.loaders.Loader().load_service_model("kms", "service-2")
    assert set(OPS) == set(model["operations"]) and len(OPS) >= 54
    assert {"Encrypt", "Decrypt", "GenerateDataKey", "CreateKey", "ListKeys", "TagResource"} <= set(OPS)


# -- valid input --------------------------------------------------------------------------------------
def test_encrypt_decodes_blobs_and_keeps_members() -> None:
    params = OPS["Encrypt"].parse({"KeyId": KEY_ID, "Plaintext": b64(b"\x00\xffhello"),
                                   "EncryptionContext": {"purpose": "test", "": ""},
                                   "GrantTokens": [], "DryRun": False})
    assert params == {"KeyId": KEY_ID, "Plaintext": b"\x00\xffhello",
                      "EncryptionContext": {"purpose": "test", "": ""}, "GrantTokens": [], "DryRun": False}


def test_unknown_and_null_members_are_ignored() -> None:
    params = OPS["ListKeys"].parse({"Limit": None, "Marker": None, "Bogus": {"deep": [1, 2]}})
    assert params == {}


def test_operation_without_input_accepts_anything() -> None:
    no_input = [op for op in OPS.values() if op.parse_input is None]
    for op in no_input:
        assert op.parse({"whatever": 1}) == {}


def test_integral_floats_are_integers() -> None:
    assert OPS["GenerateDataKey"].parse({"KeyId": KEY_ID, "NumberOfBytes": 64.0}) == {
        "KeyId": KEY_ID, "NumberOfBytes": 64}


# -- required members ---------------------------------------------------------------------------------
def test_missing_required_members_are_counted() -> None:
    assert violations("Encrypt", {}) == [
        "Value null at 'keyId' failed to satisfy constraint: Member must not be null",
        "Value null at 'plaintext' failed to satisfy constraint: Member must not be null",
    ]


def test_explicit_null_counts_as_missing() -> None:
    assert only_violation("TagResource", {"KeyId": None, "Tags": []}) == (
        "Value null at 'keyId' failed to satisfy constraint: Member must not be null")


# -- lengths ------------------------------------------------------------------------------------------
def test_string_length() -> None:
    assert only_violation("Encrypt", {"KeyId": "", "Plaintext": b64(b"x")}) == (
        "Value '' at 'keyId' failed to satisfy constraint: Member must have length greater than or equal to 1")
    assert only_violation("CreateKey", {"Description": "d" * 8193}).endswith(
        "at 'description' failed to satisfy constraint: Member must have length less than or equal to 8192")
    assert OPS["CreateKey"].parse({"Description": "d" * 8192})["Description"] == "d" * 8192


def test_long_values_are_shortened_in_messages() -> None:
    message = only_violation("CreateKey", {"Description": "d" * 8193})
    assert message.startswith("Value '" + "d" * 256 + "...' at 'description'")


def test_blob_length_counts_decoded_bytes() -> None:
    assert OPS["Encrypt"].parse({"KeyId": KEY_ID, "Plaintext": b64(b"p" * 4096)})["Plaintext"] == b"p" * 4096
    assert only_violation("Encrypt", {"KeyId": KEY_ID, "Plaintext": b64(b"p" * 4097)}) == (
        "Value at 'plaintext' failed to satisfy constraint: Member must have length less than or equal to 4096")
    assert only_violation("Encrypt", {"KeyId": KEY_ID, "Plaintext": ""}) == (
        "Value at 'plaintext' failed to satisfy constraint: Member must have length greater than or equal to 1")


def test_list_length() -> None:
    tokens = ["t"] * 11
    assert only_violation("Encrypt", {"KeyId": KEY_ID, "Plaintext": b64(b"x"), "GrantTokens": tokens}) == (
        "Value at 'grantTokens' failed to satisfy constraint: Member must have length less than or equal to 10")


# -- ranges -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "constraint"), [
    (0, "have value greater than or equal to 1"),
    (-5, "have value greater than or equal to 1"),
    (1025, "have value less than or equal to 1024"),
])
def test_integer_range(value: int, constraint: str) -> None:
    assert only_violation("GenerateDataKey", {"KeyId": KEY_ID, "NumberOfBytes": value}) == (
        f"Value '{value}' at 'numberOfBytes' failed to satisfy constraint: Member must {constraint}")


@pytest.mark.parametrize("value", [1, 1024])
def test_integer_range_bounds_are_inclusive(value: int) -> None:
    assert OPS["GenerateDataKey"].parse({"KeyId": KEY_ID, "NumberOfBytes": value})["NumberOfBytes"] == value


def test_list_keys_limit() -> None:
    assert only_violation("ListKeys", {"Limit": 0}) == (
        "Value '0' at 'limit' failed to satisfy constraint: Member must have value greater than or equal to 1")
    assert only_violation("ListKeys", {"Limit": 1001}) == (
        "Value '1001' at 'limit' failed to satisfy constraint: Member must have value less than or equal to 1000")
    assert OPS["ListKeys"].parse({"Limit": 1000, "Marker": "abc"}) == {"Limit": 1000, "Marker": "abc"}


# -- enums and patterns -------------------------------------------------------------------------------
def test_enum() -> None:
    assert only_violation("GenerateDataKey", {"KeyId": KEY_ID, "KeySpec": "AES_512"}) == (
        "Value 'AES_512' at 'keySpec' failed to satisfy constraint: "
        "Member must satisfy enum value set: [AES_256, AES_128]")
    assert only_violation("CreateKey", {"KeyUsage": "encrypt_decrypt"}).startswith(
        "Value 'encrypt_decrypt' at 'keyUsage' failed to satisfy constraint: Member must satisfy enum value set: [")


def test_pattern() -> None:
    assert only_violation("ListKeys", {"Marker": "tab\there"}) == (
        "Value 'tab\there' at 'marker' failed to satisfy constraint: "
        "Member must satisfy regular expression pattern: [\\u0020-\\u00FF]*")
    assert only_violation("CreateAlias", {"AliasName": "alias/has space", "TargetKeyId": KEY_ID}) == (
        "Value 'alias/has space' at 'aliasName' failed to satisfy constraint: "
        "Member must satisfy regular expression pattern: ^[a-zA-Z0-9:/_-]+$")


def test_pattern_must_match_the_whole_value() -> None:
    assert only_violation("CreateAlias", {"AliasName": "alias/x\n", "TargetKeyId": KEY_ID}).startswith(
        "Value 'alias/x\n' at 'aliasName'")


def test_one_value_can_break_several_constraints() -> None:
    assert violations("CreateAlias", {"AliasName": "", "TargetKeyId": KEY_ID}) == [
        "Value '' at 'aliasName' failed to satisfy constraint: Member must have length greater than or equal to 1",
        ("Value '' at 'aliasName' failed to satisfy constraint: "
        "Member must satisfy regular expression pattern: ^[a-zA-Z0-9:/_-]+$"),
    ]


# -- nested paths -------------------------------------------------------------------------------------
def test_nested_list_paths() -> None:
    parts = violations("TagResource", {"KeyId": KEY_ID, "Tags": [
        {"TagKey": "ok", "TagValue": "fine"},
        {"TagKey": "", "TagValue": "v"},
        {"TagKey": "k"},
        {"TagKey": "k" * 129, "TagValue": "v" * 257},
    ]})
    assert parts == [
        ("Value '' at 'tags.2.member.tagKey' failed to satisfy constraint: "
        "Member must have length greater than or equal to 1"),
        "Value null at 'tags.3.member.tagValue' failed to satisfy constraint: Member must not be null",
        (f"Value '{'k' * 129}' at 'tags.4.member.tagKey' failed to satisfy constraint: "
        "Member must have length less than or equal to 128"),
        (f"Value '{'v' * 256}...' at 'tags.4.member.tagValue' failed to satisfy constraint: "
        "Member must have length less than or equal to 256"),
    ]


def test_create_key_tags_path() -> None:
    assert only_violation("CreateKey", {"Tags": [{"TagKey": "", "TagValue": ""}]}) == (
        "Value '' at 'tags.1.member.tagKey' failed to satisfy constraint: "
        "Member must have length greater than or equal to 1")


def test_errors_across_members_are_all_reported() -> None:
    parts = violations("GenerateDataKey", {"NumberOfBytes": 0, "KeySpec": "AES_1"})
    assert parts == [
        "Value null at 'keyId' failed to satisfy constraint: Member must not be null",
        "Value '0' at 'numberOfBytes' failed to satisfy constraint: Member must have value greater than or equal to 1",
        "Value 'AES_1' at 'keySpec' failed to satisfy constraint: "
        "Member must satisfy enum value set: [AES_256, AES_128]",
    ]
    with pytest.raises(ValidationException, match=r"^3 validation errors detected: "):
        OPS["GenerateDataKey"].parse({"NumberOfBytes": 0, "KeySpec": "AES_1"})


# -- sensitive values ---------------------------------------------------------------------------------
def test_sensitive_values_are_never_echoed() -> None:
    marker = "SECRETMARKER"
    plaintext = (marker * 400).encode()[:4097]
    message = " ".join(violations("Encrypt", {"KeyId": KEY_ID, "Plaintext": b64(plaintext)}))
    assert marker not in message and b64(plaintext)[:40] not in message

    message = " ".join(violations("CreateCustomKeyStore", {"CustomKeyStoreName": "store",
                                                           "KeyStorePassword": "hunt2"}))
    assert "hunt2" not in message
    assert "Value at 'keyStorePassword' failed to satisfy constraint" in message


# -- wrong types are SerializationException -------------------------------------------------------------
@pytest.mark.parametrize(("op", "body", "where"), [
    ("ListKeys", {"Limit": "5"}, "limit"),
    ("ListKeys", {"Limit": True}, "limit"),
    ("ListKeys", {"Limit": 5.5}, "limit"),
    ("ListKeys", {"Marker": 7}, "marker"),
    ("Encrypt", {"KeyId": KEY_ID, "Plaintext": 12345}, "plaintext"),
    ("Encrypt", {"KeyId": ["list"], "Plaintext": b64(b"x")}, "keyId"),
    ("Encrypt", {"KeyId": KEY_ID, "Plaintext": b64(b"x"), "EncryptionContext": {"k": 1}}, "encryptionContext"),
    ("Encrypt", {"KeyId": KEY_ID, "Plaintext": b64(b"x"), "EncryptionContext": ["k", "v"]}, "encryptionContext"),
    ("Encrypt", {"KeyId": KEY_ID, "Plaintext": b64(b"x"), "DryRun": "true"}, "dryRun"),
    ("Encrypt", {"KeyId": KEY_ID, "Plaintext": b64(b"x"), "GrantTokens": "t"}, "grantTokens"),
    ("TagResource", {"KeyId": KEY_ID, "Tags": [["TagKey", "k"]]}, "tags.1.member"),
    ("TagResource", {"KeyId": KEY_ID, "Tags": [{"TagKey": 1, "TagValue": "v"}]}, "tags.1.member.tagKey"),
    ("CreateKey", {"Tags": {"TagKey": "k", "TagValue": "v"}}, "tags"),
    ("GenerateDataKey", {"KeyId": KEY_ID, "NumberOfBytes": "32"}, "numberOfBytes"),
])
def test_wrong_types(op: str, body: dict[str, Any], where: str) -> None:
    with pytest.raises(SerializationException) as caught:
        OPS[op].parse(body)
    assert f"'{where}'" in caught.value.message


@pytest.mark.parametrize("body", [[], "x", 1, None, True, [{"KeyId": KEY_ID}]])
def test_body_must_be_an_object(body: Any) -> None:
    with pytest.raises(SerializationException):
        OPS["DescribeKey"].parse(body)


@pytest.mark.parametrize("value", ["not base64!", "YQ", "YQ=", "YWJj\n", "\u00e9\u00e9\u00e9\u00e9"])
def test_invalid_base64_is_serialization_error(value: str) -> None:
    with pytest.raises(SerializationException, match="plaintext"):
        OPS["Encrypt"].parse({"KeyId": KEY_ID, "Plaintext": value})


# -- properties: parse only ever raises the two protocol errors -------------------------------------------
MODEL: dict[str, Any] = botocore.loaders.Loader().load_service_model("kms", "service-2")

json_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


AnyStr = TypeVar("AnyStr", str, bytes)


def _repeat(unit: st.SearchStrategy[AnyStr], lengths: list[int]) -> st.SearchStrategy[AnyStr]:
    """One drawn character (or byte) repeated to each of `lengths`: cheap values of exact length."""
    return st.builds(lambda c, n: c * n, unit, st.sampled_from([n for n in lengths if n >= 0]))


class ShapeValues:
    """Hypothesis strategies for the input shapes of the KMS model: well-typed values near the
    model's limits (lengths, ranges, enums) and, one time in `junk_one_in` at every level, a JSON
    value of any type instead. With `junk_one_in=None` values are always well-typed and required
    members always present, so requests get past the parser into the service.

    `strings` supplies free-form strings (the protocol tests add real key ids to it), `chars` the
    characters of strings built at the model's length limits and `junk` the wrong-typed values."""

    def __init__(self, model: dict[str, Any], strings: st.SearchStrategy[str] | None = None,
                 chars: st.SearchStrategy[str] | None = None, junk: st.SearchStrategy[Any] | None = None,
                 junk_one_in: int | None = 4, max_depth: int = 4) -> None:
        self.junk = junk if junk is not None else json_values
        self.junk_one_in = junk_one_in
        self.shapes: dict[str, Any] = model["shapes"]
        self.operations: dict[str, Any] = model["operations"]
        self.strings = strings if strings is not None else st.text(max_size=40)
        self.chars = chars if chars is not None else st.characters(codec="utf-8")
        self.max_depth = max_depth
        self._cache: dict[tuple[str, int], st.SearchStrategy[Any]] = {}

    def request(self, operation: str) -> st.SearchStrategy[Any]:
        spec = self.operations[operation]
        if "input" not in spec:
            return st.dictionaries(self.strings, self.junk, max_size=3)
        return self.shape(spec["input"]["shape"], 0)

    def shape(self, name: str, depth: int) -> st.SearchStrategy[Any]:
        key = (name, depth)
        if key not in self._cache:
            self._cache[key] = st.deferred(lambda: self._build(name, depth))
        return self._cache[key]

    def _build(self, name: str, depth: int) -> st.SearchStrategy[Any]:
        shape = self.shapes[name]
        kind, lo, hi = shape["type"], shape.get("min"), shape.get("max")
        valid = self.junk_one_in is None  # aim inside the model's limits
        bounds = [n for n in (lo, hi) if n is not None]
        near = sorted({b + d for b in bounds for d in (-1, 0, 1)
                       if not valid or ((lo is None or b + d >= lo) and (hi is None or b + d <= hi))})
        typed: st.SearchStrategy[Any]
        if kind == "string":
            if valid and "enum" in shape:
                typed = st.sampled_from(shape["enum"])
            else:
                options = [self.strings]
                if "enum" in shape:
                    options.append(st.sampled_from(shape["enum"]))
                if near:
                    options.append(_repeat(self.chars, near))
                if valid and "pattern" in shape:
                    options.append(st.from_regex(shape["pattern"], fullmatch=True).filter(
                        lambda v: (lo is None or len(v) >= lo) and (hi is None or len(v) <= hi)))
                typed = st.one_of(options)
        elif kind == "blob":
            small = st.binary(min_size=lo or 0 if valid else 0, max_size=64)
            raw = small | _repeat(st.binary(min_size=1, max_size=1), near or [0, 1])
            typed = raw.map(lambda b: base64.b64encode(b).decode())
            if not valid:
                typed |= st.sampled_from(["", "=", "not base64"])
        elif kind in ("integer", "long"):
            if valid:
                typed = st.integers(min_value=-(2**63) if lo is None else lo, max_value=2**63 if hi is None else hi)
            else:
                typed = st.integers(min_value=-(2**63), max_value=2**64 - 1)
            if near:
                typed = st.sampled_from(near) | typed
        elif kind == "boolean":
            typed = st.booleans()
        elif kind == "timestamp":
            if valid:
                typed = st.integers(min_value=0, max_value=2**32) | st.floats(min_value=0, max_value=2**32)
            else:
                typed = st.integers(min_value=-(2**40), max_value=2**40) | st.floats(allow_nan=False,
                                                                                   allow_infinity=False)
        elif depth >= self.max_depth:
            return self.junk if self.junk_one_in is not None else st.nothing()
        elif kind == "list":
            typed = st.lists(self.shape(shape["member"]["shape"], depth + 1),
                             min_size=lo or 0 if valid else 0, max_size=min(hi or 3, 3) if valid else 4)
        elif kind == "map":
            # JSON object keys are strings whatever the model says; their constraints still apply.
            typed = st.dictionaries(self.strings, self.shape(shape["value"]["shape"], depth + 1), max_size=4)
        elif kind == "structure":
            members = {m: self.shape(spec["shape"], depth + 1) for m, spec in shape["members"].items()}
            required = set(shape.get("required", ())) if self.junk_one_in is None else set()
            typed = st.fixed_dictionaries({m: v for m, v in members.items() if m in required},
                                          optional={m: v for m, v in members.items() if m not in required})
        else:
            raise AssertionError(f"unexpected shape type {kind}")
        if self.junk_one_in is None:
            return typed
        return st.integers(min_value=1, max_value=self.junk_one_in).flatmap(
            lambda i: self.junk if i == 1 else typed)


SHAPE_VALUES = ShapeValues(MODEL, junk_one_in=4)
WELL_TYPED_VALUES = ShapeValues(MODEL, junk_one_in=None)
op_names = st.sampled_from(sorted(MODEL["operations"]))


def _wire(value: Any) -> Any:
    """`value` as the server sees it: JSON text read back by orjson (big ints become floats)."""
    try:
        return orjson.loads(json.dumps(value))
    except orjson.JSONDecodeError:
        return None  # out of orjson's range: the server answers SerializationException before parsing


def _check_parse(op: str, body: Any) -> None:
    try:
        result = OPS[op].parse(_wire(body))
    except (ValidationException, SerializationException) as exc:
        assert exc.message
        return
    assert isinstance(result, dict)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(op=op_names, body=json_values)
def test_parse_of_any_json_value_raises_only_protocol_errors(op: str, body: Any) -> None:
    _check_parse(op, body)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(op=op_names, data=st.data())
def test_parse_of_model_shaped_requests_raises_only_protocol_errors(op: str, data: st.DataObject) -> None:
    body = data.draw(SHAPE_VALUES.request(op), label="body")
    _check_parse(op, body)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(op=op_names, data=st.data())
def test_well_typed_requests_are_never_serialization_errors(op: str, data: st.DataObject) -> None:
    """Values of the model's types (integral floats, epoch timestamps, base64) are all accepted;
    what fails is at most a constraint."""
    body = data.draw(WELL_TYPED_VALUES.request(op), label="body")
    try:
        result = OPS[op].parse(_wire(body))
    except ValidationException:
        return
    assert isinstance(result, dict)
