"""HPACK (RFC 7541) for the gateway's own HTTP/2 layer: a full decoder and a stateless
encoder.

The decoder keeps the connection's dynamic table. gRPC clients send nearly the same
header block on every call of a connection, and once the table holds those fields a block
is a few index bytes that change nothing in the table; such blocks are decoded once and
then answered from a small cache keyed by the table's generation and the block's bytes.

The encoder never indexes and never Huffman-codes: every field goes out as a literal that
leaves the peer's table alone, so encoding needs no state and a field's bytes can be
cached. On loopback the few extra bytes cost less than table bookkeeping.
"""

from __future__ import annotations

from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

Header = tuple[bytes, bytes]
"""(name, value) exactly as on the wire: lowercase name, value bytes."""

STATIC_TABLE: tuple[Header, ...] = tuple(HeaderTable.STATIC_TABLE)
_STATIC_COUNT = len(STATIC_TABLE)
_ENTRY_OVERHEAD = 32
_CACHE_LIMIT = 512
_ENCODED_CACHE_LIMIT = 4096

# The first static index of each name, for encoding a name as an index.
_STATIC_NAME_INDEX: dict[bytes, int] = {}
for _index, (_name, _value) in enumerate(STATIC_TABLE, start=1):
    _STATIC_NAME_INDEX.setdefault(_name, _index)


class HpackError(ValueError):
    """A header block that cannot be decoded (a COMPRESSION_ERROR of the connection)."""


class Decoder:
    """Decodes the header blocks of one direction of one connection."""

    def __init__(self, max_table_size: int = 4096) -> None:
        self._max_allowed = max_table_size
        self._max_size = max_table_size
        self._size = 0
        # Newest entry first, as HPACK indexes them.
        self._dynamic: list[Header] = []
        self._generation = 0
        self._cache: dict[tuple[int, bytes], tuple[Header, ...]] = {}

    def decode(self, block: bytes) -> tuple[Header, ...]:
        """The header list of one complete block; HpackError if it is malformed."""
        key = (self._generation, block)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        generation = self._generation
        headers = self._decode(block)
        if self._generation == generation:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = headers
        return headers

    def _decode(self, block: bytes) -> tuple[Header, ...]:
        headers: list[Header] = []
        position = 0
        end = len(block)
        while position < end:
            first = block[position]
            if first & 0x80:  # indexed field
                index, position = _read_int(block, position, 7)
                headers.append(self._entry(index))
            elif first & 0x40:  # literal with incremental indexing
                name, value, position = self._literal(block, position, 6)
                self._add(name, value)
                headers.append((name, value))
            elif first & 0x20:  # dynamic table size update
                size, position = _read_int(block, position, 5)
                if size > self._max_allowed:
                    raise HpackError(
                        f"table size update to {size} exceeds the {self._max_allowed} allowed"
                    )
                self._max_size = size
                self._evict()
                self._generation += 1
            else:  # literal without indexing (0x00) or never indexed (0x10)
                name, value, position = self._literal(block, position, 4)
                headers.append((name, value))
        return tuple(headers)

    def _entry(self, index: int) -> Header:
        if index == 0:
            raise HpackError("header index 0")
        if index <= _STATIC_COUNT:
            return STATIC_TABLE[index - 1]
        dynamic_index = index - _STATIC_COUNT - 1
        if dynamic_index >= len(self._dynamic):
            raise HpackError(f"header index {index} is past the end of the table")
        return self._dynamic[dynamic_index]

    def _literal(self, block: bytes, position: int, prefix_bits: int) -> tuple[bytes, bytes, int]:
        index, position = _read_int(block, position, prefix_bits)
        if index:
            name = self._entry(index)[0]
        else:
            name, position = _read_string(block, position)
        value, position = _read_string(block, position)
        return name, value, position

    def _add(self, name: bytes, value: bytes) -> None:
        self._generation += 1
        size = len(name) + len(value) + _ENTRY_OVERHEAD
        if size > self._max_size:
            self._dynamic.clear()
            self._size = 0
            return
        self._dynamic.insert(0, (name, value))
        self._size += size
        self._evict()

    def _evict(self) -> None:
        while self._size > self._max_size and self._dynamic:
            name, value = self._dynamic.pop()
            self._size -= len(name) + len(value) + _ENTRY_OVERHEAD


def _read_int(block: bytes, position: int, prefix_bits: int) -> tuple[int, int]:
    if position >= len(block):
        raise HpackError("header block ends inside an integer")
    mask = (1 << prefix_bits) - 1
    value = block[position] & mask
    position += 1
    if value < mask:
        return value, position
    shift = 0
    while True:
        if position >= len(block):
            raise HpackError("header block ends inside an integer")
        byte = block[position]
        position += 1
        value += (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
        if shift > 28:
            raise HpackError("header integer too large")


def _read_string(block: bytes, position: int) -> tuple[bytes, int]:
    if position >= len(block):
        raise HpackError("header block ends before a string")
    huffman = block[position] & 0x80
    length, position = _read_int(block, position, 7)
    end = position + length
    if end > len(block):
        raise HpackError("a header string runs past the end of the block")
    raw = block[position:end]
    if huffman:
        try:
            raw = decode_huffman(raw)
        except Exception as err:  # noqa: BLE001 - hpack raises its own error types
            raise HpackError(f"bad Huffman string: {err}") from None
    return raw, end


def _encode_int(value: int, prefix_bits: int, flags: int) -> bytes:
    mask = (1 << prefix_bits) - 1
    if value < mask:
        return bytes((flags | value,))
    out = bytearray((flags | mask,))
    value -= mask
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_encoded: dict[Header, bytes] = {}


def encode_field(name: bytes, value: bytes) -> bytes:
    """One field as a literal without indexing (name by static index when it has one)."""
    key = (name, value)
    found = _encoded.get(key)
    if found is not None:
        return found
    index = _STATIC_NAME_INDEX.get(name)
    if index is None:
        out = b"\x00" + _encode_int(len(name), 7, 0) + name
    else:
        out = _encode_int(index, 4, 0)
    out += _encode_int(len(value), 7, 0) + value
    if len(_encoded) >= _ENCODED_CACHE_LIMIT:
        _encoded.clear()
    _encoded[key] = out
    return out


def encode(headers: list[Header] | tuple[Header, ...]) -> bytes:
    """A header block for `headers`, changing nothing in the peer's table."""
    return b"".join([encode_field(name, value) for name, value in headers])
