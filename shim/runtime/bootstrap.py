"""The answer of a shim's `start`, in the three forms containerd reads, with its address swapped.

containerd 1.x read the shim's address alone; 2.0-2.2's runc shim writes JSON
(`{"version":3,"address":...,"protocol":"ttrpc"}`); 2.3+'s writes a protobuf
BootstrapResult (containerd/api runtime/bootstrap/v1: version 1, address 2, protocol 3,
capabilities 4, metadata 5), and containerd parses protobuf first, then JSON, then the
plain address as version 2 (core/runtime/v2/shim.go, parseStartResponse). Answering a 2.x
containerd in another form than its shim's would downgrade the task to API v2, which the 2.x
shim does not serve; so we answer in the shim's form with only the address changed. The sh
launcher does the same for the relay the proxy hosts (node-config/containerd-shim-criu-v2).
"""

from __future__ import annotations

import json

ADDRESS_FIELD = 2
_VARINT, _LEN = 0, 2


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if byte < 0x80:
            return value, at
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _fields(data: bytes) -> list[tuple[int, int, bytes]]:
    """(field number, wire type, the field's whole encoding) of a message of varint and length fields."""
    fields, at = [], 0
    while at < len(data):
        start = at
        key, at = _varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            _, at = _varint(data, at)
        elif wire == _LEN:
            size, at = _varint(data, at)
            at += size
            if at > len(data):
                raise ValueError("truncated field")
        else:
            raise ValueError(f"unexpected wire type {wire}")
        fields.append((number, wire, data[start:at]))
    return fields


def _is_protobuf(answer: bytes) -> bool:
    return bool(answer) and answer[0] < 0x20  # a field key; JSON and addresses start with text


def address_of(answer: bytes) -> str:
    """The address the shim answered, without its unix:// scheme."""
    if _is_protobuf(answer):
        for number, wire, encoded in _fields(answer):
            if number == ADDRESS_FIELD and wire == _LEN:
                _, at = _varint(encoded, 0)
                _, at = _varint(encoded, at)
                return encoded[at:].decode().removeprefix("unix://")
        raise ValueError("the shim's BootstrapResult has no address")
    text = answer.decode().strip()
    if text.startswith("{"):
        return str(json.loads(text)["address"]).removeprefix("unix://")
    return text.removeprefix("unix://")


def with_address(answer: bytes, address: str) -> bytes:
    """The shim's answer in its own form, naming `address` (unix://...) instead of the shim's."""
    if _is_protobuf(answer):
        value = address.encode()
        field = _encode_varint(ADDRESS_FIELD << 3 | _LEN) + _encode_varint(len(value)) + value
        return b"".join(field if number == ADDRESS_FIELD else encoded for number, _, encoded in _fields(answer))
    text = answer.decode().strip()
    if text.startswith("{"):
        params = json.loads(text)
        params["address"] = address
        return json.dumps(params, separators=(",", ":")).encode()
    return address.encode()
