"""HPACK codec of the gateway's HTTP/2 front, against RFC 7541's examples and hpack."""

from __future__ import annotations

import hpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpufleet.gateway.h2.hpack_codec import Decoder, HpackError, encode

# RFC 7541 C.3: three requests on one connection, no Huffman coding.
C3 = [
    (
        "828684410f7777772e6578616d706c652e636f6d",
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
         (b":authority", b"www.example.com")],
    ),
    (
        "828684be58086e6f2d6361636865",
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
         (b":authority", b"www.example.com"), (b"cache-control", b"no-cache")],
    ),
    (
        "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565",
        [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/index.html"),
         (b":authority", b"www.example.com"), (b"custom-key", b"custom-value")],
    ),
]
# RFC 7541 C.4: the same requests with Huffman coding.
C4 = [
    ("828684418cf1e3c2e5f23a6ba0ab90f4ff", C3[0][1]),
    ("828684be5886a8eb10649cbf", C3[1][1]),
    ("828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf", C3[2][1]),
]


@pytest.mark.parametrize("blocks", [C3, C4], ids=["plain", "huffman"])
def test_rfc_examples_decode_with_the_dynamic_table(
    blocks: list[tuple[str, list[tuple[bytes, bytes]]]],
) -> None:
    decoder = Decoder()
    for block, expected in blocks:
        assert list(decoder.decode(bytes.fromhex(block))) == expected


def test_a_repeated_block_is_answered_from_the_cache_and_stays_correct() -> None:
    decoder = Decoder()
    decoder.decode(bytes.fromhex(C3[0][0]))
    indexed_only = bytes.fromhex("828684be")  # changes nothing in the table
    expected = tuple(C3[0][1])
    assert decoder.decode(indexed_only) == expected
    assert decoder.decode(indexed_only) == expected
    # After a new insertion the same bytes mean another field: no stale cache hit.
    decoder.decode(bytes.fromhex(C3[1][0]))
    assert decoder.decode(indexed_only)[3] == (b"cache-control", b"no-cache")


def test_table_size_update_evicts() -> None:
    decoder = Decoder()
    decoder.decode(bytes.fromhex(C3[0][0]))
    decoder.decode(b"\x20")  # size 0: the table empties
    with pytest.raises(HpackError, match="past the end"):
        decoder.decode(b"\xbe")


@pytest.mark.parametrize(
    "block, message",
    [
        (b"\x80", "index 0"),
        (b"\xff", "ends inside an integer"),
        (b"\xff\x80\x80\x80\x80\x80\x01", "too large"),
        (b"\x40\x05ab", "past the end"),
        (b"\x3f\xe2\x1f", "exceeds"),
        (b"\xc8", "past the end"),
    ],
)
def test_malformed_blocks_raise_hpack_error(block: bytes, message: str) -> None:
    with pytest.raises(HpackError, match=message):
        Decoder().decode(block)


header_names = st.from_regex(rb"\A[a-z][a-z0-9\-]{0,20}\Z", fullmatch=True)
header_values = st.binary(max_size=300)


@given(st.lists(st.tuples(header_names, header_values), max_size=20))
def test_encoded_blocks_decode_the_same_with_hpack_and_change_no_table(
    headers: list[tuple[bytes, bytes]],
) -> None:
    block = encode(headers)
    reference = hpack.Decoder()
    assert [(n, v) for n, v in reference.decode(block, raw=True)] == headers
    assert len(reference.header_table.dynamic_entries) == 0
    assert list(Decoder().decode(block)) == headers


@given(st.lists(st.lists(st.tuples(header_names, header_values), max_size=8), max_size=6))
def test_blocks_from_hpack_encoder_decode_the_same(blocks: list[list[tuple[bytes, bytes]]]) -> None:
    encoder = hpack.Encoder()
    decoder = Decoder()
    for headers in blocks:
        for huffman in (True, False):
            block = encoder.encode(headers, huffman=huffman)
            assert list(decoder.decode(block)) == headers
