"""gRPC-over-HTTP/2 details the proxy needs when it answers a call itself.

Message framing (1-byte compressed flag + 4-byte length), the `grpc-timeout`
header, status trailers, and an HPACK encoder that never touches the dynamic
table: the proxy injects header blocks into a connection whose HPACK state
belongs to containerd, so everything it writes must be self-contained
("literal header field without indexing", RFC 7541 section 6.2.2).
"""

from __future__ import annotations

import urllib.parse

from shim.errors import Code, InvalidArgument

_TIMEOUT_UNITS_NS = {"H": 3_600_000_000_000, "M": 60_000_000_000, "S": 1_000_000_000,
                     "m": 1_000_000, "u": 1_000, "n": 1}


def parse_timeout(value: str) -> float:
    """Seconds from a `grpc-timeout` value such as `120S` or `500m`."""
    if len(value) < 2 or value[-1] not in _TIMEOUT_UNITS_NS or not value[:-1].isdigit():
        raise InvalidArgument(f"malformed grpc-timeout {value!r}")
    return int(value[:-1]) * _TIMEOUT_UNITS_NS[value[-1]] / 1e9


def encode_message(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


def decode_unary(body: bytes) -> bytes:
    """The single message of a unary request body."""
    if len(body) < 5:
        raise InvalidArgument("grpc: request body shorter than the message prefix")
    if body[0] != 0:
        raise InvalidArgument("grpc: compressed requests are not supported by this method")
    length = int.from_bytes(body[1:5], "big")
    if len(body) != 5 + length:
        raise InvalidArgument("grpc: request body does not hold exactly one message")
    return body[5:]


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _hpack_string(text: str) -> bytes:
    raw = text.encode()
    return _hpack_int(len(raw), 7, 0x00) + raw  # H bit 0: no Huffman


def encode_headers(headers: list[tuple[str, str]]) -> bytes:
    """A header block that leaves the peer's HPACK dynamic table untouched."""
    return b"".join(b"\x00" + _hpack_string(k) + _hpack_string(v) for k, v in headers)


RESPONSE_HEADERS = [(":status", "200"), ("content-type", "application/grpc")]


def status_trailers(code: Code, message: str) -> list[tuple[str, str]]:
    trailers = [("grpc-status", str(int(code)))]
    if message:
        # grpc-message is percent-encoded (gRPC HTTP/2 spec, "Responses").
        trailers.append(("grpc-message", urllib.parse.quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")))
    return trailers
