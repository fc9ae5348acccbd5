"""shim.runtime.bootstrap: the shim's `start` answer, in its own form, naming another address."""

from __future__ import annotations

import json

import pytest

from shim.runtime.bootstrap import address_of, with_address

RELAY = "unix:///run/criu-shim/shims/abc.sock"


def _len(number: int, data: bytes) -> bytes:
    return bytes([number << 3 | 2, len(data)]) + data


# As containerd-shim-runc-v2 of 2.3/2.4 writes it: version 3, address, protocol.
STOCK_2_4 = bytes([0x08, 3]) + _len(2, b"unix:///run/containerd/s/0123abcd") + _len(3, b"ttrpc")


def test_protobuf_answer_keeps_every_other_field() -> None:
    metadata = _len(5, _len(1, b"k") + _len(2, b"v"))  # a map entry, after the address
    answer = STOCK_2_4 + metadata
    assert address_of(answer) == "/run/containerd/s/0123abcd"
    swapped = with_address(answer, RELAY)
    assert swapped == bytes([0x08, 3]) + _len(2, RELAY.encode()) + _len(3, b"ttrpc") + metadata
    assert address_of(swapped) == RELAY.removeprefix("unix://")


def test_a_long_address_gets_a_two_byte_length() -> None:
    long = "unix:///" + "x" * 200
    swapped = with_address(STOCK_2_4, long)
    assert swapped[2:5] == bytes([0x12, len(long) & 0x7F | 0x80, len(long) >> 7])
    assert address_of(swapped) == long.removeprefix("unix://")


def test_json_answer_of_2_0_to_2_2() -> None:
    answer = b'{"version":3,"address":"unix:///run/containerd/s/ab","protocol":"ttrpc"}\n'
    assert address_of(answer) == "/run/containerd/s/ab"
    assert json.loads(with_address(answer, RELAY)) == {"version": 3, "address": RELAY, "protocol": "ttrpc"}


@pytest.mark.parametrize("answer", [b"unix:///run/containerd/s/ab\n", b"/run/containerd/s/ab"])
def test_plain_address_of_1x(answer: bytes) -> None:
    assert address_of(answer) == "/run/containerd/s/ab"
    assert with_address(answer, RELAY) == RELAY.encode()


@pytest.mark.parametrize("answer", [bytes([0x08]), bytes([0x12, 40]) + b"short", bytes([0x0b, 1]),
                                    bytes([0x08, 3]) + _len(3, b"ttrpc")])
def test_a_broken_or_addressless_protobuf_answer_is_refused(answer: bytes) -> None:
    with pytest.raises(ValueError):
        address_of(answer)
