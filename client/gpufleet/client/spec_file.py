"""Deployment spec files: YAML or JSON, one document or several, into Deployment messages.

Every document is checked against the proto descriptor before json_format sees it, so that a
mistake is reported with its file, document and field path instead of json_format's nested
message. Durations may be written as "30s", "500ms", "5m", "1h30m" or a plain number of
seconds; enums by full name ("SPREAD_POLICY_SPREAD") or short name ("spread").
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TextIO

import yaml
from google.protobuf import descriptor, json_format

from gpufleet.v1 import deployment_pb2

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION_UNIT_S = {"ms": Decimal("0.001"), "s": Decimal(1), "m": Decimal(60), "h": Decimal(3600)}
_INT_RANGES = {
    descriptor.FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    descriptor.FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    descriptor.FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    descriptor.FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}
_DURATION = "google.protobuf.Duration"
_TIMESTAMP = "google.protobuf.Timestamp"


class SpecFileError(Exception):
    """A spec file that cannot be read or does not describe valid deployments."""

    def __init__(self, source: str, message: str, *, document: str = "", path: str = "") -> None:
        where = ": ".join(part for part in (source, document, path) if part)
        super().__init__(f"{where}: {message}")
        self.source = source
        """File name, or ``<stdin>``."""
        self.document = document
        """Which document, e.g. ``document 2``; empty when the whole file is at fault."""
        self.path = path
        """Field path inside the document, e.g. ``spec.gpu.core_percent``."""
        self.message = message
        """What is wrong and what is expected."""


class _FieldError(Exception):
    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


def load_spec_file(path: str, stdin: TextIO | None = None) -> list[deployment_pb2.Deployment]:
    """Read deployments from a file, or from ``stdin`` when ``path`` is ``-``."""
    if path == "-":
        source = "<stdin>"
        text = (stdin or sys.stdin).read()
    else:
        source = path
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise SpecFileError(source, f"cannot read the spec file: {error}") from error
    return parse_spec_text(text, source)


def parse_spec_text(text: str, source: str) -> list[deployment_pb2.Deployment]:
    """Deployments described by ``text`` (YAML or JSON, chosen by content)."""
    deployments = [
        deployment_from_document(document, source, label)
        for label, document in _documents(text, source)
    ]
    if not deployments:
        raise SpecFileError(source, "no deployment found: the file is empty")
    return deployments


def deployment_from_document(
    document: object, source: str, label: str = "document 1"
) -> deployment_pb2.Deployment:
    """One deployment from a parsed document (a mapping with name, labels and spec)."""
    if not isinstance(document, Mapping):
        raise SpecFileError(
            source,
            f"expected a mapping with name, labels and spec, got {_kind(document)}",
            document=label,
        )
    try:
        normalized = _normalize_message(document, deployment_pb2.Deployment.DESCRIPTOR, "")
        if not normalized.get("name"):
            raise _FieldError("name", "required: the deployment name, e.g. name: echo")
    except _FieldError as error:
        raise SpecFileError(source, error.message, document=label, path=error.path) from None
    try:
        return json_format.ParseDict(normalized, deployment_pb2.Deployment())
    except json_format.ParseError as error:
        # The walk above should catch everything json_format rejects; this keeps any remaining
        # case (e.g. a malformed timestamp) a clean input error.
        raise SpecFileError(source, str(error).rstrip("."), document=label) from None


def _documents(text: str, source: str) -> list[tuple[str, object]]:
    """(label, document) pairs; a top-level list contributes one document per item."""
    stripped = text.lstrip()
    raw: list[object]
    if stripped.startswith(("{", "[")):
        try:
            raw = [json.loads(text)]
        except json.JSONDecodeError as error:
            raise SpecFileError(
                source, f"invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
            ) from None
    else:
        try:
            raw = list(yaml.safe_load_all(text))
        except yaml.YAMLError as error:
            raise SpecFileError(source, f"invalid YAML: {_yaml_problem(error)}") from None
    documents: list[tuple[str, object]] = []
    for number, document in enumerate(raw, start=1):
        if document is None:
            continue  # an empty document, e.g. after a trailing ---
        if isinstance(document, list):
            documents.extend(
                (f"document {number} item {item}", entry)
                for item, entry in enumerate(document, start=1)
            )
        else:
            documents.append((f"document {number}", document))
    return documents


def _yaml_problem(error: yaml.YAMLError) -> str:
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        return f"{error.problem} at line {mark.line + 1}, column {mark.column + 1}"
    return str(error)


def _normalize_message(
    value: object, message: descriptor.Descriptor, path: str
) -> dict[str, object]:
    if not isinstance(value, Mapping):
        raise _FieldError(path, f"expected a mapping, got {_kind(value)}")
    by_name = {field.name: field for field in message.fields}
    by_name.update({field.json_name: field for field in message.fields})
    normalized: dict[str, object] = {}
    for key, item in value.items():
        field = by_name.get(str(key))
        child = _join(path, str(key))
        if field is None:
            known = ", ".join(sorted(f.name for f in message.fields))
            raise _FieldError(child, f"unknown field; the fields here are: {known}")
        if item is None:
            continue  # an empty YAML value leaves the field unset
        if field.name in normalized:
            raise _FieldError(child, f"{field.name} is given twice (once in camelCase)")
        normalized[field.name] = _normalize_field(item, field, _join(path, field.name))
    for oneof in message.oneofs:
        chosen = [field.name for field in oneof.fields if field.name in normalized]
        if len(chosen) > 1:
            names = ", ".join(field.name for field in oneof.fields)
            raise _FieldError(path, f"set only one of {names} (got {', '.join(chosen)})")
    return normalized


def _normalize_field(value: object, field: descriptor.FieldDescriptor, path: str) -> object:
    if _is_map(field):
        if not isinstance(value, Mapping):
            raise _FieldError(path, f"expected a mapping, got {_kind(value)}")
        value_field = _message_of(field).fields_by_name["value"]
        return {
            _map_key(key, path): _normalize_single(item, value_field, _join(path, str(key)))
            for key, item in value.items()
        }
    if field.is_repeated:
        if not isinstance(value, list):
            raise _FieldError(path, f"expected a list, got {_kind(value)}")
        return [
            _normalize_single(item, field, f"{path}[{index}]") for index, item in enumerate(value)
        ]
    return _normalize_single(value, field, path)


def _normalize_single(value: object, field: descriptor.FieldDescriptor, path: str) -> object:
    cpp_type = field.cpp_type
    if cpp_type == descriptor.FieldDescriptor.CPPTYPE_MESSAGE:
        message = _message_of(field)
        if message.full_name == _DURATION:
            return _duration(value, path)
        if message.full_name == _TIMESTAMP:
            if not isinstance(value, str):
                raise _FieldError(
                    path, f"expected an RFC 3339 time like 2024-01-31T12:00:00Z, got {_kind(value)}"
                )
            return value
        return _normalize_message(value, message, path)
    if cpp_type == descriptor.FieldDescriptor.CPPTYPE_ENUM:
        if field.enum_type is None:
            raise TypeError(f"enum field {field.full_name} has no enum type")
        return _enum(value, field.enum_type, path)
    if cpp_type == descriptor.FieldDescriptor.CPPTYPE_BOOL:
        if not isinstance(value, bool):
            raise _FieldError(path, f"expected true or false, got {_kind(value)}")
        return value
    if cpp_type == descriptor.FieldDescriptor.CPPTYPE_STRING:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            hint = " (quote it to mean the text)" if isinstance(value, bool) else ""
            raise _FieldError(path, f"expected a string, got {_kind(value)}{hint}")
        return str(value)
    if cpp_type in (
        descriptor.FieldDescriptor.CPPTYPE_DOUBLE,
        descriptor.FieldDescriptor.CPPTYPE_FLOAT,
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _FieldError(path, f"expected a number, got {_kind(value)}")
        return value
    return _integer(value, cpp_type, path)


def _integer(value: object, cpp_type: int, path: str) -> int:
    # proto3 JSON writes 64-bit integers as strings, so `get -o yaml` output re-applies.
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        number = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    else:
        raise _FieldError(path, f"expected a whole number, got {_kind(value)}")
    low, high = _INT_RANGES[cpp_type]
    if not low <= number <= high:
        raise _FieldError(path, f"{number} is out of range: must be between {low} and {high}")
    return number


def _enum(value: object, enum: descriptor.EnumDescriptor, path: str) -> str:
    names = [v.name for v in enum.values if v.number != 0]
    if isinstance(value, str):
        wanted = value.strip().upper().replace("-", "_")
        for name in [v.name for v in enum.values]:
            if name == wanted or name.endswith("_" + wanted):
                return name
    elif isinstance(value, int) and not isinstance(value, bool):
        by_number = enum.values_by_number.get(value)
        if by_number is not None:
            return by_number.name
    raise _FieldError(path, f"expected one of {', '.join(names)}, got {_show(value)}")


def _duration(value: object, path: str) -> str:
    seconds: Decimal | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = _decimal(value)
    elif isinstance(value, str):
        seconds = _parse_duration_text(value.strip())
    if seconds is None or seconds < 0:
        raise _FieldError(
            path,
            "expected a duration like 30s, 500ms, 5m, 1h30m or a number of seconds, "
            f"got {_show(value)}",
        )
    whole = seconds.quantize(Decimal("0.000000001"))
    return f"{whole.normalize():f}s"


def _parse_duration_text(text: str) -> Decimal | None:
    number = _decimal_text(text)
    if number is not None:
        return number
    if not text or _DURATION_PART.sub("", text):
        return None
    return sum(
        (Decimal(amount) * _DURATION_UNIT_S[unit] for amount, unit in _DURATION_PART.findall(text)),
        Decimal(0),
    )


def _decimal(value: int | float) -> Decimal | None:
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def _decimal_text(text: str) -> Decimal | None:
    if not re.fullmatch(r"\d+(?:\.\d+)?", text):
        return None
    return Decimal(text)


def _map_key(key: object, path: str) -> str:
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise _FieldError(path, f"map keys must be strings, got {_kind(key)}")
    return str(key)


def _is_map(field: descriptor.FieldDescriptor) -> bool:
    return (
        field.is_repeated
        and field.message_type is not None
        and field.message_type.GetOptions().map_entry
    )


def _message_of(field: descriptor.FieldDescriptor) -> descriptor.Descriptor:
    if field.message_type is None:
        raise TypeError(f"message field {field.full_name} has no message type")
    return field.message_type


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _kind(value: object) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return type(value).__name__


def _show(value: object) -> str:
    return repr(value) if isinstance(value, str) else _kind(value)
