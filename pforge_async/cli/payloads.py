"""Turn payloads made readable, and the exact JSON form ``export`` writes and ``import`` reads.

A payload is bytes the store never interprets. To show one, the command tries, in order: the type's
schema from a published registry bundle (the agent records: msgpack maps, named by the bundle's JSON
Schema, with the fields left at their defaults filled in), JSON text, plain UTF-8 text, any msgpack
value, and otherwise the bytes themselves (escaped, or as a hex dump).

In JSON (``--json``, ``export``) a value is JSON as it is, except bytes, which become
``{"$base64": "..."}``. ``export`` writes a payload in the most readable form that gives back the
very same bytes, and checks that it does, line by line, before writing it: ``"msgpack"`` (the value,
re-encoded by msgspec to the same bytes), ``"json"`` or ``"json-python"`` (the parsed document, when
``json.dumps`` in that style writes it back byte for byte), ``"text"`` (any UTF-8) or ``"base64"``
(anything).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ..errors import InvalidInput
from ..turnstore.types import TurnRecord
from .term import json_escaped

__all__ = [
    "EXPORT_FIELDS",
    "Bundles",
    "PayloadView",
    "describe_payload",
    "export_line",
    "from_jsonable",
    "parse_export_line",
    "printable_text",
    "to_jsonable",
]

_B64 = "$base64"


class Unrepresentable(ValueError):
    """A decoded value JSON cannot hold as it is (a map with non-str keys, a msgpack extension), or
    one nested deeper than :data:`MAX_DEPTH`."""


#: Deeper than this, a payload is shown as text or bytes, not as the structure it holds: any writer may
#: store any bytes, and the recursive parsers and printers (json's, msgspec's, this module's) run out of
#: stack long before 100,000 nested arrays end. No reader of a terminal follows 100 levels anyway.
MAX_DEPTH = 100


def _shallow(value: Any) -> Any:
    """``value`` itself when no list or map in it nests deeper than :data:`MAX_DEPTH` (walked with a
    stack of its own, not by recursion); ``Unrepresentable`` otherwise."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, tuple, dict)):
            if depth > MAX_DEPTH:
                raise Unrepresentable(f"a value nested more than {MAX_DEPTH} levels deep")
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return value


def _json(text: str) -> Any:
    """The JSON document ``text`` holds; ``ValueError`` if it is none, or is nested too deeply."""
    try:
        document = json.loads(text)
    except RecursionError:
        raise Unrepresentable(f"a JSON document nested more than {MAX_DEPTH} levels deep") from None
    return _shallow(document)


def to_jsonable(value: Any) -> Any:
    """A decoded msgpack value as JSON: bytes tagged ``{"$base64": ...}``; ``Unrepresentable`` for
    anything else JSON cannot hold."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise Unrepresentable(f"the float {value!r}")
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {_B64: base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise Unrepresentable(f"a map key of type {type(key).__name__}")
            out[key] = to_jsonable(item)
        return out
    raise Unrepresentable(f"a value of type {type(value).__name__}")


def from_jsonable(value: Any) -> Any:
    """The inverse of :func:`to_jsonable`."""
    if isinstance(value, list):
        return [from_jsonable(item) for item in value]
    if isinstance(value, dict):
        if len(value) == 1 and _B64 in value and isinstance(value[_B64], str):
            try:
                return base64.b64decode(value[_B64], validate=True)
            except binascii.Error as exc:
                raise InvalidInput(f"{_B64} value is not base64: {exc}") from exc
        return {key: from_jsonable(item) for key, item in value.items()}
    return value


# -- registry bundles ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Schema:
    """One type of a registry bundle: where it is from, and its JSON Schema."""

    bundle_id: str
    type_id: str
    version: int | None
    encoding: str
    name: str | None
    schema: dict[str, Any]
    defs: dict[str, Any]


@dataclass
class Bundles:
    """Every registry bundle of a store, by type id (the first bundle that names a type wins)."""

    types: dict[str, Schema] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, bundles: Iterable[tuple[str, bytes]]) -> Bundles:
        found = cls()
        for bundle_id, raw in bundles:
            try:
                doc = json.loads(raw)
                types = doc["types"]
                defs = doc.get("$defs", {})
                encoding = str(doc.get("encoding", "msgpack"))
                for type_id, entry in types.items():
                    schema = entry.get("schema", {})
                    ref = schema.get("$ref", "") if isinstance(schema, dict) else ""
                    name = ref.rsplit("/", 1)[-1] if ref else None
                    found.types.setdefault(
                        type_id, Schema(bundle_id, type_id, entry.get("version"), encoding, name, schema, defs)
                    )
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
                found.problems.append(f"registry bundle {bundle_id!r} does not parse: {exc}")
        return found


def _resolve(schema: Any, defs: Mapping[str, Any]) -> Any:
    seen = 0
    while isinstance(schema, dict) and "$ref" in schema and seen < 32:
        schema = defs.get(str(schema["$ref"]).rsplit("/", 1)[-1], {})
        seen += 1
    return schema


def _with_defaults(value: Any, schema: Any, defs: Mapping[str, Any], problems: list[str], where: str) -> Any:
    """``value`` with the properties its schema gives a default filled in, at every depth, and what
    does not match the schema's shape noted in ``problems``."""
    schema = _resolve(schema, defs)
    if not isinstance(schema, dict):
        return value
    if "anyOf" in schema:
        for option in schema["anyOf"]:
            option = _resolve(option, defs)
            if isinstance(value, dict) and isinstance(option, dict) and option.get("type") == "object":
                return _with_defaults(value, option, defs, problems, where)
            if isinstance(value, list) and isinstance(option, dict) and option.get("type") == "array":
                return _with_defaults(value, option, defs, problems, where)
        return value
    if isinstance(value, dict) and "properties" in schema:
        props: dict[str, Any] = schema["properties"]
        missing = [name for name in schema.get("required", []) if name not in value]
        extra = [name for name in value if name not in props]
        if missing:
            problems.append(f"{where}: missing required field(s) {', '.join(missing)}")
        if extra:
            problems.append(f"{where}: field(s) the schema does not name: {', '.join(extra)}")
        out = {
            name: _with_defaults(item, props.get(name), defs, problems, f"{where}.{name}")
            for name, item in value.items()
        }
        for name, prop in props.items():
            if name not in out and isinstance(prop, dict) and "default" in prop:
                out[name] = prop["default"]
        return out
    if isinstance(value, list) and "items" in schema:
        return [_with_defaults(item, schema["items"], defs, problems, f"{where}[{i}]") for i, item in enumerate(value)]
    return value


# -- showing a payload ----------------------------------------------------------------------------


@dataclass
class PayloadView:
    """A payload as the command shows it.

    ``kind``: ``"record"`` (a registry type, decoded by its schema), ``"msgpack"``, ``"json"``,
    ``"text"``, ``"binary"`` or ``"empty"``. ``value``: JSON-compatible (bytes tagged) for record,
    msgpack and json; the str for text; None for binary and empty."""

    kind: str
    value: Any = None
    schema: Schema | None = None
    problems: list[str] = field(default_factory=list)

    def as_json(self, payload: bytes) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "size": len(payload)}
        if self.schema is not None:
            out["bundle_id"] = self.schema.bundle_id
            out["schema"] = self.schema.name
        if self.kind in ("record", "msgpack", "json", "text"):
            out["value"] = self.value
        elif self.kind == "binary":
            out["base64"] = base64.b64encode(payload).decode("ascii")
        if self.problems:
            out["problems"] = self.problems
        return out


def printable_text(payload: bytes) -> str | None:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return None
    # Text may hold a control character or two (an escape sequence, shown escaped); bytes that are
    # mostly controls are something else (a small msgpack value, a binary format).
    controls = sum(1 for c in text if (ord(c) < 0x20 and c not in "\n\r\t") or 0x7F <= ord(c) <= 0x9F)
    return text if controls * 10 <= len(text) else None


def _msgpack(payload: bytes) -> Any:
    """The msgpack value ``payload`` holds whole, as JSON; ``Unrepresentable``/``DecodeError``."""
    try:
        value = msgspec.msgpack.decode(payload)
    except RecursionError:
        raise Unrepresentable(f"a msgpack value nested more than {MAX_DEPTH} levels deep") from None
    return to_jsonable(_shallow(value))


def describe_payload(type_id: str, payload: bytes, bundles: Bundles) -> PayloadView:
    if not payload:
        return PayloadView("empty")
    schema = bundles.types.get(type_id)
    if schema is not None and schema.encoding == "msgpack":
        try:
            value = _msgpack(payload)
        except (msgspec.DecodeError, Unrepresentable) as exc:
            view = PayloadView("binary")
            view.problems.append(f"does not decode as the msgpack its bundle {schema.bundle_id!r} says: {exc}")
            return view
        problems: list[str] = []
        try:
            filled = _with_defaults(value, schema.schema, schema.defs, problems, schema.name or type_id)
        except RecursionError:  # a bundle whose schema refers to itself without end
            filled = value
            problems.append(f"the schema of bundle {schema.bundle_id!r} refers to itself without end")
        return PayloadView("record", filled, schema, problems)
    text = printable_text(payload)
    if text is not None:
        stripped = text.lstrip()
        if stripped[:1] in ("{", "["):
            try:
                return PayloadView("json", _json(text))
            except ValueError:
                pass
        return PayloadView("text", text)
    try:
        return PayloadView("msgpack", _msgpack(payload))
    except (msgspec.DecodeError, Unrepresentable):
        return PayloadView("binary")


def summary(type_id: str, payload: bytes, bundles: Bundles, width: int = 100) -> str:
    """One line about a payload, for ``log``: a record's or document's fields compactly (the
    position and empty fields left out), text as it is, binary as its size; escaped by the caller."""
    view = describe_payload(type_id, payload, bundles)
    if view.kind == "empty":
        return "(empty)"
    if view.kind == "binary":
        return f"({len(payload)} bytes of binary)"
    value = view.value
    if view.kind == "record" and isinstance(value, dict):
        # what a reader looks for first; defaults were filled in for show, leave them out here
        value = {k: v for k, v in value.items() if k != "seq" and v not in ({}, [], None, "")}
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


# -- export / import ------------------------------------------------------------------------------

#: the keys of an export line, in the order they are written
EXPORT_FIELDS = (
    "turn_id",
    "context_id",
    "parent_turn_id",
    "depth",
    "type_id",
    "type_version",
    "idempotency_key",
    "created_at_ms",
    "fs_root",
    "payload_sha256",
    "encoding",
    "payload",
)
#: how a JSON payload was written, so that writing its value again gives the same bytes: "json" as
#: msgspec.json and JSON.stringify write it, "json-python" as Python's json.dumps does by default
_JSON_STYLES: dict[str, dict[str, Any]] = {
    "json": {"separators": (",", ":"), "ensure_ascii": False},
    "json-python": {},
}
_ENCODINGS = ("msgpack", *_JSON_STYLES, "text", "base64")


def _candidates(turn: TurnRecord, bundles: Bundles) -> list[tuple[str, Any]]:
    payload = turn.payload
    out: list[tuple[str, Any]] = []
    schema = bundles.types.get(turn.type_id)
    try:
        text: str | None = payload.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    msgpack_first = text is None or (schema is not None and schema.encoding == "msgpack")
    if msgpack_first:
        try:
            out.append(("msgpack", _msgpack(payload)))
        except (msgspec.DecodeError, Unrepresentable):
            pass
    if text is not None:
        if text.lstrip()[:1] in ("{", "["):
            try:
                document = _json(text)
            except ValueError:
                pass
            else:
                out += [(style, document) for style in _JSON_STYLES]
        out.append(("text", text))
    out.append(("base64", base64.b64encode(payload).decode("ascii")))
    return out


def export_line(turn: TurnRecord, bundles: Bundles) -> str:
    """One turn as one line of JSON, in the most readable encoding that gives back its exact bytes."""
    base = {
        "turn_id": turn.turn_id,
        "context_id": turn.context_id,
        "parent_turn_id": turn.parent_turn_id,
        "depth": turn.depth,
        "type_id": turn.type_id,
        "type_version": turn.type_version,
        "idempotency_key": turn.idempotency_key,
        "created_at_ms": turn.created_at_ms,
        "fs_root": turn.fs_root,
        "payload_sha256": turn.payload_hash,
    }
    for encoding, value in _candidates(turn, bundles):
        try:
            line = json.dumps({**base, "encoding": encoding, "payload": value}, ensure_ascii=False, allow_nan=False)
            line.encode("utf-8")
        except (ValueError, UnicodeEncodeError):
            continue
        # an export goes to a terminal as often as to a file: C1 and bidi controls as \u escapes
        line = json_escaped(line)
        try:
            if _payload_of(encoding, json.loads(line)["payload"]) == turn.payload:
                return line
        except (InvalidInput, msgspec.EncodeError, ValueError, TypeError, OverflowError):
            continue
    raise AssertionError("base64 always round-trips")  # pragma: no cover


def _payload_of(encoding: str, value: Any) -> bytes:
    if encoding == "base64":
        if not isinstance(value, str):
            raise InvalidInput("a base64 payload must be a string")
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error as exc:
            raise InvalidInput(f"payload is not base64: {exc}") from exc
    if encoding == "text":
        if not isinstance(value, str):
            raise InvalidInput("a text payload must be a string")
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidInput(f"text payload is not UTF-8: {exc}") from exc
    if encoding in _JSON_STYLES:
        return json.dumps(value, allow_nan=False, **_JSON_STYLES[encoding]).encode("utf-8")
    if encoding == "msgpack":
        return msgspec.msgpack.encode(from_jsonable(value))
    raise InvalidInput(f"unknown payload encoding {encoding!r} (want one of {', '.join(_ENCODINGS)})")


class ImportedTurn(msgspec.Struct, frozen=True):
    """What ``import`` takes from an export line."""

    type_id: str
    type_version: int
    payload: bytes
    idempotency_key: str | None
    fs_root: str | None
    depth: int | None
    #: the line of the file it was read from (for messages)
    line: int = 0


def parse_export_line(line: str, number: int) -> ImportedTurn:
    """An export line back to a turn to append; ``InvalidInput`` naming the line if it is not one,
    or if its payload does not hash to its ``payload_sha256``."""
    where = f"line {number}"
    try:
        doc = json.loads(line)
    except RecursionError:
        raise InvalidInput(f"{where}: nested too deeply to read") from None
    except ValueError as exc:
        raise InvalidInput(f"{where}: not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidInput(f"{where}: not a JSON object")
    for needed in ("type_id", "encoding", "payload"):
        if needed not in doc:
            raise InvalidInput(f"{where}: no {needed!r}")
    type_id, version, key, fs_root, depth = (
        doc["type_id"],
        doc.get("type_version", 1),
        doc.get("idempotency_key"),
        doc.get("fs_root"),
        doc.get("depth"),
    )
    if not isinstance(type_id, str):
        raise InvalidInput(f"{where}: type_id must be a string")
    if isinstance(version, bool) or not isinstance(version, int):
        raise InvalidInput(f"{where}: type_version must be an integer")
    if key is not None and not isinstance(key, str):
        raise InvalidInput(f"{where}: idempotency_key must be a string or null")
    if fs_root is not None and not isinstance(fs_root, str):
        raise InvalidInput(f"{where}: fs_root must be a string or null")
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int)):
        raise InvalidInput(f"{where}: depth must be an integer")
    encoding = doc["encoding"]
    if not isinstance(encoding, str):
        raise InvalidInput(f"{where}: encoding must be a string")
    try:
        payload = _payload_of(encoding, doc["payload"])
    except InvalidInput as exc:
        raise InvalidInput(f"{where}: {exc}") from exc
    except RecursionError:
        raise InvalidInput(f"{where}: the {encoding} payload is nested too deeply to encode") from None
    except (msgspec.EncodeError, ValueError, TypeError, OverflowError) as exc:
        raise InvalidInput(f"{where}: the {encoding} payload cannot be encoded: {exc}") from exc
    expected = doc.get("payload_sha256")
    if expected is not None and hashlib.sha256(payload).hexdigest() != expected:
        raise InvalidInput(f"{where}: the payload does not match its payload_sha256 {expected}")
    return ImportedTurn(type_id, version, payload, key, fs_root, depth, number)
