"""Hypothesis strategies for any protobuf message, built from its descriptor.

Every field type is generated: all integer widths over their full range, float and double
(NaN and infinities included), bool, UTF-8 strings, bytes, enums (known values and unknown
ones: proto3 enums are open), nested messages, repeated fields, maps, and oneofs (at most
one member set; proto3 `optional` fields are one-member oneofs). Nesting stops at
`max_depth`, where a message field is left unset, so recursive types (Struct) terminate.

`overrides` steer chosen fields towards values that get past the first checks of a
handler (a real deployment name, a real join token), mixed with the generic values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, Phase, given, seed, settings, strategies as st

F = FieldDescriptor
_INTEGER_RANGES: Mapping[int, tuple[int, int]] = {
    **dict.fromkeys((F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32), (-(2**31), 2**31 - 1)),
    **dict.fromkeys((F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64), (-(2**63), 2**63 - 1)),
    **dict.fromkeys((F.TYPE_UINT32, F.TYPE_FIXED32), (0, 2**32 - 1)),
    **dict.fromkeys((F.TYPE_UINT64, F.TYPE_FIXED64), (0, 2**64 - 1)),
}
MAX_REPEATED = 3
MAX_TEXT = 24
MAX_BYTES = 48

Overrides = Mapping[str, st.SearchStrategy[Any]]
"""Full field name ("pkg.Message.field") -> strategy for its (singular) values."""


def messages(descriptor: Descriptor, overrides: Overrides | None = None, max_depth: int = 6) -> st.SearchStrategy[Message]:
    """Messages of `descriptor`'s type with every field drawn at random."""
    return _Builder(overrides or {}, max_depth).message(descriptor, 0)


def draw(strategy: st.SearchStrategy[Message], count: int, draw_seed: int) -> list[Message]:
    """`count` examples of `strategy`, generated (not shrunk) by Hypothesis.

    A type with fewer possible values (an empty request message) gives fewer distinct
    examples; they are repeated up to `count`.
    """
    found: list[Message] = []

    @seed(draw_seed)
    @settings(
        max_examples=count,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(message: Message) -> None:
        found.append(message)

    collect()
    if not found:
        raise AssertionError("Hypothesis generated no message")
    return [found[i % len(found)] for i in range(count)]


class _Builder:
    def __init__(self, overrides: Overrides, max_depth: int) -> None:
        self._overrides = overrides
        self._max_depth = max_depth
        self._cache: dict[tuple[str, int], st.SearchStrategy[Message]] = {}

    def message(self, descriptor: Descriptor, depth: int) -> st.SearchStrategy[Message]:
        key = (descriptor.full_name, depth)
        if key not in self._cache:
            # Deferred: recursive types refer to themselves one level deeper.
            self._cache[key] = st.deferred(lambda: self._build(descriptor, depth))
        return self._cache[key]

    def _build(self, descriptor: Descriptor, depth: int) -> st.SearchStrategy[Message]:
        cls = message_factory.GetMessageClass(descriptor)
        parts: list[st.SearchStrategy[tuple[FieldDescriptor, Any] | None]] = []
        for field in descriptor.fields:
            if field.containing_oneof is None:
                parts.append(st.one_of(st.none(), self._field(field, depth).map(_pair(field))))
        for oneof in descriptor.oneofs:
            members = [self._field(f, depth).map(_pair(f)) for f in oneof.fields]
            parts.append(st.one_of(st.none(), *members))
        return st.tuples(*parts).map(lambda assignments: _assemble(cls, assignments))

    def _field(self, field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            entry = field.message_type
            keys = self._single(entry.fields_by_name["key"], depth)
            values = self._single(entry.fields_by_name["value"], depth + 1)
            return st.dictionaries(keys, values, max_size=MAX_REPEATED)
        single = self._single(field, depth)
        if field.is_repeated:
            return st.lists(single, max_size=MAX_REPEATED)
        return single

    def _single(self, field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        generic = self._generic(field, depth)
        steered = self._overrides.get(field.full_name)
        return generic if steered is None else st.one_of(steered, generic)

    def _generic(self, field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        kind = field.type
        if kind == F.TYPE_MESSAGE:
            if depth + 1 >= self._max_depth:
                return st.nothing()
            return self.message(_message_type(field), depth + 1)
        if kind in _INTEGER_RANGES:
            low, high = _INTEGER_RANGES[kind]
            return st.integers(low, high)
        if kind == F.TYPE_DOUBLE:
            return st.floats()
        if kind == F.TYPE_FLOAT:
            return st.floats(width=32)
        if kind == F.TYPE_BOOL:
            return st.booleans()
        if kind == F.TYPE_STRING:
            # Valid UTF-8 only (no lone surrogates): a string field cannot hold anything else.
            return st.text(st.characters(codec="utf-8"), max_size=MAX_TEXT)
        if kind == F.TYPE_BYTES:
            return st.binary(max_size=MAX_BYTES)
        if kind == F.TYPE_ENUM:
            if field.enum_type is None:
                raise ValueError(f"enum field {field.full_name} has no enum type")
            known = [value.number for value in field.enum_type.values]
            low, high = _INTEGER_RANGES[F.TYPE_INT32]
            return st.one_of(st.sampled_from(known), st.integers(low, high))
        raise ValueError(f"field {field.full_name} has type {kind}, which no strategy covers")


def boundary_messages(descriptor: Descriptor, max_depth: int = 6) -> list[Message]:
    """Two messages of `descriptor`'s type with every field at an edge of its range: one
    at the low end (most negative integers, -inf, empty strings) and one at the high end
    (largest integers, +inf, long strings); repeated fields and maps hold one element,
    each oneof has its first (low) or last (high) member set."""
    return [_boundary(descriptor, high, 0, max_depth) for high in (False, True)]


_LONG_TEXT = "\u00e9" * 1000


def _boundary(descriptor: Descriptor, high: bool, depth: int, max_depth: int) -> Message:
    message = message_factory.GetMessageClass(descriptor)()
    chosen = {(o.fields[-1] if high else o.fields[0]).name for o in descriptor.oneofs}
    for field in descriptor.fields:
        if field.containing_oneof is not None and field.name not in chosen:
            continue
        if field.message_type is not None and depth + 1 >= max_depth:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_field = field.message_type.fields_by_name["key"]
            value_field = field.message_type.fields_by_name["value"]
            key = _boundary_scalar(key_field, high) or "k"
            if value_field.message_type is None:
                value: Any = _boundary_scalar(value_field, high)
            else:
                value = _boundary(value_field.message_type, high, depth + 2, max_depth)
            _assign(message, field, {key: value})
            continue
        if field.message_type is not None:
            value = _boundary(field.message_type, high, depth + 1, max_depth)
        else:
            value = _boundary_scalar(field, high)
        _assign(message, field, [value] if field.is_repeated else value)
    return message


def _boundary_scalar(field: FieldDescriptor, high: bool) -> Any:
    kind = field.type
    if kind in _INTEGER_RANGES:
        return _INTEGER_RANGES[kind][1 if high else 0]
    if kind == F.TYPE_ENUM:
        return _INTEGER_RANGES[F.TYPE_INT32][1 if high else 0]
    if kind in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return float("inf") if high else float("-inf")
    if kind == F.TYPE_BOOL:
        return high
    if kind == F.TYPE_STRING:
        return _LONG_TEXT if high else ""
    if kind == F.TYPE_BYTES:
        return _LONG_TEXT.encode() if high else b""
    raise ValueError(f"field {field.full_name} has type {kind}, which no boundary covers")


def _message_type(field: FieldDescriptor) -> Descriptor:
    if field.message_type is None:
        raise ValueError(f"field {field.full_name} is not a message field")
    return field.message_type


def _pair(field: FieldDescriptor) -> Callable[[Any], tuple[FieldDescriptor, Any]]:
    return lambda value: (field, value)


def _assemble(cls: type[Message], assignments: tuple[tuple[FieldDescriptor, Any] | None, ...]) -> Message:
    message = cls()
    for assignment in assignments:
        if assignment is not None:
            _assign(message, *assignment)
    return message


def _assign(message: Message, field: FieldDescriptor, value: Any) -> None:
    target = getattr(message, field.name)
    if isinstance(value, dict):
        message_values = _message_type(field).fields_by_name["value"].message_type is not None
        for key, item in value.items():
            if message_values:
                target[key].MergeFrom(item)
            else:
                target[key] = item
    elif isinstance(value, list):
        if field.message_type is not None:
            for item in value:
                target.add().MergeFrom(item)
        else:
            target.extend(value)
    elif field.message_type is not None:
        target.SetInParent()
        target.MergeFrom(value)
    else:
        setattr(message, field.name, value)
