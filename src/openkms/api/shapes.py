"""Request validation and response rendering, derived from botocore's KMS service model.

For every operation the input shape is compiled once into a parser that checks types (a wrong
type is SerializationException, as in AWS), decodes blobs from base64, and collects constraint
violations (required, length, range, enum, pattern) into one AWS-style ValidationException:

    2 validation errors detected: Value null at 'keyId' failed to satisfy constraint: Member must
    not be null; Value '0' at 'numberOfBytes' failed to satisfy constraint: Member must have value
    greater than or equal to 1

Values of shapes marked sensitive (plaintexts) are never echoed. The output shape is compiled
into a renderer that base64-encodes blobs and turns datetimes into epoch seconds.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, ClassVar

import botocore.loaders

from ..errors import SerializationException, ValidationException

Parser = Callable[[Any, str, list[str]], Any]
Renderer = Callable[[Any], Any]


# Where openkms accepts more than AWS's model, on purpose (README, "Hold your own key"): an XKS
# proxy's endpoint on a private network may carry a port, be an IP address, or (where the operator
# allows it) use http://.
PATTERN_OVERRIDES = {
    "XksProxyUriEndpointType": r"^https?://(\[[0-9A-Fa-f:.]+\]|[a-zA-Z0-9.-]+)(:[0-9]{1,5})?$",
}


# Members openkms adds to AWS's responses (clients that do not know them ignore them, as botocore
# does): DescribeCustomKeyStores shows an external key store's proxy health.
MODEL_EXTENSIONS: dict[str, dict[str, Any]] = {
    "OpenKMSXksProxyHealth": {"type": "structure", "members": {
        "Status": {"shape": "String"}, "CheckedAt": {"shape": "DateType"}, "Detail": {"shape": "String"}}},
}
MEMBER_EXTENSIONS: dict[str, dict[str, Any]] = {
    "CustomKeyStoresListEntry": {"XksProxyHealth": {"shape": "OpenKMSXksProxyHealth"}}}


@lru_cache(maxsize=1)
def kms_model() -> dict[str, Any]:
    model: dict[str, Any] = botocore.loaders.Loader().load_service_model("kms", "service-2")
    shapes = model["shapes"]
    for name, pattern in PATTERN_OVERRIDES.items():
        if name in shapes:
            shapes[name] = dict(shapes[name], pattern=pattern)
    shapes.setdefault("String", {"type": "string"})
    for name, shape in MODEL_EXTENSIONS.items():
        shapes.setdefault(name, shape)
    for name, members in MEMBER_EXTENSIONS.items():
        if name in shapes:
            shapes[name] = dict(shapes[name], members={**shapes[name]["members"], **members})
    return model


def _member_path(parent: str, member: str) -> str:
    name = member[:1].lower() + member[1:]
    return f"{parent}.{name}" if parent else name


def _show(value: Any, sensitive: bool) -> str:
    if sensitive:
        return "Value"
    if value is None:
        return "Value null"
    text = str(value)
    if len(text) > 256:
        text = text[:256] + "..."
    return f"Value '{text}'"


def _violation(value: Any, path: str, constraint: str, sensitive: bool) -> str:
    return f"{_show(value, sensitive)} at '{path}' failed to satisfy constraint: Member must {constraint}"


def _check_bounds(shown: Any, measure: int, what: str, lo: int | None, hi: int | None, path: str,
                  sensitive: bool, errors: list[str]) -> None:
    """The min/max constraints: on a length (`what` "length") or on the value itself ("value")."""
    if lo is not None and measure < lo:
        errors.append(_violation(shown, path, f"have {what} greater than or equal to {lo}", sensitive))
    if hi is not None and measure > hi:
        errors.append(_violation(shown, path, f"have {what} less than or equal to {hi}", sensitive))


def _type_error(path: str, expected: str) -> SerializationException:
    return SerializationException(f"Unexpected value type at '{path}': expected {expected}.")


class ModelCompiler:
    def __init__(self, model: dict[str, Any]) -> None:
        self.shapes: dict[str, Any] = model["shapes"]
        self._parsers: dict[str, Parser] = {}
        self._renderers: dict[str, Renderer] = {}

    # -- input --------------------------------------------------------------------------------
    def parser(self, shape_name: str) -> Parser:
        if shape_name in self._parsers:
            return self._parsers[shape_name]
        # Recursive shapes: install a forwarding stub before compiling.
        holder: list[Parser] = []
        self._parsers[shape_name] = lambda v, p, e: holder[0](v, p, e)
        compiled = self._compile_parser(self.shapes[shape_name])
        holder.append(compiled)
        self._parsers[shape_name] = compiled
        return compiled

    def _compile_parser(self, shape: dict[str, Any]) -> Parser:
        build = self._PARSER_BUILDERS.get(shape["type"])
        if build is None:
            raise ValueError(f"unsupported shape type {shape['type']}")
        return build(self, shape)

    def _structure_parser(self, shape: dict[str, Any]) -> Parser:
        members = {name: (self.parser(m["shape"]), self.shapes[m["shape"]].get("sensitive", False)
                          or m.get("sensitive", False))
                   for name, m in shape["members"].items()}
        required = tuple(shape.get("required", ()))

        def parse_structure(value: Any, path: str, errors: list[str]) -> Any:
            if not isinstance(value, dict):
                raise _type_error(path or "request", "an object")
            out: dict[str, Any] = {}
            for name in required:
                if value.get(name) is None:
                    errors.append(_violation(None, _member_path(path, name), "not be null", False))
            for name, raw in value.items():
                entry = members.get(name)
                if entry is None or raw is None:
                    continue  # unknown members are ignored, as AWS does
                out[name] = entry[0](raw, _member_path(path, name), errors)
            return out
        return parse_structure

    def _string_parser(self, shape: dict[str, Any]) -> Parser:
        sensitive = bool(shape.get("sensitive"))
        lo, hi = shape.get("min"), shape.get("max")
        enum = tuple(shape.get("enum", ()))
        pattern = re.compile(shape["pattern"]) if "pattern" in shape else None

        def parse_string(value: Any, path: str, errors: list[str]) -> Any:
            if not isinstance(value, str):
                raise _type_error(path, "a string")
            _check_bounds(value, len(value), "length", lo, hi, path, sensitive, errors)
            if enum and value not in enum:
                errors.append(_violation(value, path, f"satisfy enum value set: [{', '.join(enum)}]", sensitive))
            if pattern is not None and not pattern.fullmatch(value):
                errors.append(_violation(value, path,
                                         f"satisfy regular expression pattern: {pattern.pattern}", sensitive))
            return value
        return parse_string

    def _blob_parser(self, shape: dict[str, Any]) -> Parser:
        lo, hi = shape.get("min"), shape.get("max")

        def parse_blob(value: Any, path: str, errors: list[str]) -> Any:
            if not isinstance(value, str):
                raise _type_error(path, "a base64-encoded string")
            try:
                raw = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise SerializationException(f"Value at '{path}' is not valid base64.") from None
            _check_bounds(None, len(raw), "length", lo, hi, path, True, errors)
            return raw
        return parse_blob

    def _integer_parser(self, shape: dict[str, Any]) -> Parser:
        sensitive = bool(shape.get("sensitive"))
        lo, hi = shape.get("min"), shape.get("max")

        def parse_int(value: Any, path: str, errors: list[str]) -> Any:
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                else:
                    raise _type_error(path, "an integer")
            _check_bounds(value, value, "value", lo, hi, path, sensitive, errors)
            return value
        return parse_int

    def _boolean_parser(self, shape: dict[str, Any]) -> Parser:
        def parse_bool(value: Any, path: str, errors: list[str]) -> Any:
            if not isinstance(value, bool):
                raise _type_error(path, "a boolean")
            return value
        return parse_bool

    def _timestamp_parser(self, shape: dict[str, Any]) -> Parser:
        def parse_timestamp(value: Any, path: str, errors: list[str]) -> Any:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise _type_error(path, "a timestamp in epoch seconds")
            try:
                return datetime.fromtimestamp(value, UTC)
            except (OverflowError, OSError, ValueError):
                raise _type_error(path, "a timestamp in epoch seconds") from None
        return parse_timestamp

    def _list_parser(self, shape: dict[str, Any]) -> Parser:
        lo, hi = shape.get("min"), shape.get("max")
        member = self.parser(shape["member"]["shape"])

        def parse_list(value: Any, path: str, errors: list[str]) -> Any:
            if not isinstance(value, list):
                raise _type_error(path, "a list")
            _check_bounds(None, len(value), "length", lo, hi, path, True, errors)
            return [member(item, f"{path}.{i + 1}.member", errors) for i, item in enumerate(value)]
        return parse_list

    def _map_parser(self, shape: dict[str, Any]) -> Parser:
        key_parser = self.parser(shape["key"]["shape"])
        value_parser = self.parser(shape["value"]["shape"])

        def parse_map(value: Any, path: str, errors: list[str]) -> Any:
            if not isinstance(value, dict):
                raise _type_error(path, "an object")
            return {key_parser(k, path, errors): value_parser(v, path, errors) for k, v in value.items()}
        return parse_map

    # One builder per shape type of the model: the shape -> its parser.
    _PARSER_BUILDERS: ClassVar[dict[str, Callable[[ModelCompiler, dict[str, Any]], Parser]]] = {
        "structure": _structure_parser,
        "string": _string_parser,
        "blob": _blob_parser,
        "integer": _integer_parser,
        "long": _integer_parser,
        "boolean": _boolean_parser,
        "timestamp": _timestamp_parser,
        "list": _list_parser,
        "map": _map_parser,
    }

    # -- audit redaction ----------------------------------------------------------------------
    def redactor(self, shape_name: str) -> Renderer:
        """Parsed values -> JSON-safe values for the audit record, without blobs or sensitive members."""
        key = "redact:" + shape_name
        if key in self._renderers:
            return self._renderers[key]
        holder: list[Renderer] = []
        self._renderers[key] = lambda v: holder[0](v)
        compiled = self._compile_redactor(self.shapes[shape_name])
        holder.append(compiled)
        self._renderers[key] = compiled
        return compiled

    def _secret(self, shape_name: str) -> bool:
        shape = self.shapes[shape_name]
        return shape["type"] == "blob" or bool(shape.get("sensitive"))

    def _compile_redactor(self, shape: dict[str, Any]) -> Renderer:
        kind = shape["type"]
        if kind == "structure":
            members = {name: self.redactor(m["shape"]) for name, m in shape["members"].items()
                       if not self._secret(m["shape"]) and not m.get("sensitive")}

            def redact_structure(value: Any) -> Any:
                return {name: members[name](v) for name, v in value.items() if v is not None and name in members}
            return redact_structure
        if kind == "timestamp":
            return lambda v: v.strftime("%Y-%m-%dT%H:%M:%SZ") if isinstance(v, datetime) else v
        if kind == "list":
            member_shape = shape["member"]["shape"]
            if self._secret(member_shape):
                return lambda v: None
            member = self.redactor(member_shape)
            return lambda v: [member(item) for item in v]
        if kind == "map":
            value_redactor = self.redactor(shape["value"]["shape"])
            return lambda v: {k: value_redactor(item) for k, item in v.items()}
        return lambda v: v

    # -- output -------------------------------------------------------------------------------
    def renderer(self, shape_name: str) -> Renderer:
        if shape_name in self._renderers:
            return self._renderers[shape_name]
        holder: list[Renderer] = []
        self._renderers[shape_name] = lambda v: holder[0](v)
        compiled = self._compile_renderer(self.shapes[shape_name])
        holder.append(compiled)
        self._renderers[shape_name] = compiled
        return compiled

    def _compile_renderer(self, shape: dict[str, Any]) -> Renderer:
        kind = shape["type"]
        if kind == "structure":
            members = {name: self.renderer(m["shape"]) for name, m in shape["members"].items()}

            def render_structure(value: Any) -> Any:
                return {name: members[name](v) for name, v in value.items() if v is not None and name in members}
            return render_structure
        if kind == "blob":
            return lambda v: base64.b64encode(v).decode("ascii")
        if kind == "timestamp":
            return lambda v: v.timestamp() if isinstance(v, datetime) else v
        if kind == "list":
            member = self.renderer(shape["member"]["shape"])
            return lambda v: [member(item) for item in v]
        if kind == "map":
            value_renderer = self.renderer(shape["value"]["shape"])
            return lambda v: {k: value_renderer(item) for k, item in v.items()}
        return lambda v: v


class Operation:
    """One operation of the model: its name, input parser and output renderer."""

    __slots__ = ("name", "parse_input", "redact_input", "redact_output", "render_output")

    def __init__(self, name: str, parse_input: Parser | None, render_output: Renderer | None,
                 redact_input: Renderer | None = None, redact_output: Renderer | None = None) -> None:
        self.name = name
        self.parse_input = parse_input
        self.render_output = render_output
        self.redact_input = redact_input
        self.redact_output = redact_output

    def parse(self, body: Any) -> dict[str, Any]:
        if self.parse_input is None:
            return {}
        errors: list[str] = []
        params = self.parse_input(body, "", errors)
        if errors:
            raise ValidationException.detected(errors)
        return params  # type: ignore[no-any-return]

    def render(self, result: dict[str, Any]) -> dict[str, Any]:
        if self.render_output is None:
            return {}
        return self.render_output(result)  # type: ignore[no-any-return]


@lru_cache(maxsize=4)
def service_model(service: str) -> dict[str, Any]:
    """botocore's model of an AWS service openkms serves (kms with openkms's overrides)."""
    if service == "kms":
        return kms_model()
    return botocore.loaders.Loader().load_service_model(service, "service-2")  # type: ignore[no-any-return]


def operations(service: str = "kms") -> dict[str, Operation]:
    model = service_model(service)
    compiler = ModelCompiler(model)
    ops: dict[str, Operation] = {}
    for name, op in model["operations"].items():
        parse_input = compiler.parser(op["input"]["shape"]) if "input" in op else None
        render_output = compiler.renderer(op["output"]["shape"]) if "output" in op else None
        redact_input = compiler.redactor(op["input"]["shape"]) if "input" in op else None
        redact_output = compiler.redactor(op["output"]["shape"]) if "output" in op else None
        ops[name] = Operation(name, parse_input, render_output, redact_input, redact_output)
    return ops
