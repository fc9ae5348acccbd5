"""Which addresses a checkpoint records for a pod (shim.checkpoint.addresses)."""

from __future__ import annotations

import json

import pytest

from shim.checkpoint.addresses import global_addresses


def _link(*infos: dict[str, str]) -> str:
    return json.dumps([{"ifname": "eth0", "addr_info": list(infos)}])


def test_the_pod_ip_and_addresses_carried_in_by_a_restore_are_global() -> None:
    out = _link({"family": "inet", "local": "10.88.0.7", "prefixlen": "16", "scope": "global"},
                {"family": "inet", "local": "10.88.0.3", "prefixlen": "32", "scope": "global"},
                {"family": "inet6", "local": "fe80::1", "prefixlen": "64", "scope": "link"})
    assert global_addresses(out) == ["10.88.0.7", "10.88.0.3"]  # link-local is never carried


@pytest.mark.parametrize("out", ["", "[]", json.dumps([{"ifname": "eth0"}])])
def test_no_address_is_no_address(out: str) -> None:
    assert global_addresses(out) == []


def test_garbage_is_an_error_the_caller_sees() -> None:
    with pytest.raises(ValueError):
        global_addresses("not json")
