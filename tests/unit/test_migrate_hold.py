"""The hold's nfnetlink_queue codec (shim/migrate/nfqueue.py) and its rules (shim/migrate/hold.py), without a kernel."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from shim.checkpoint import netlock
from shim.migrate import hold, nfqueue

HEADER = struct.Struct("=IHHII")
NLA = struct.Struct("=HH")


def _nla(kind: int, payload: bytes) -> bytes:
    data = NLA.pack(NLA.size + len(payload), kind) + payload
    return data + b"\0" * (-len(data) % 4)


def packet_message(packet_id: int, seq: int = 0, queue: int = 31000) -> bytes:
    """NFQNL_MSG_PACKET as the kernel sends it: nfgenmsg, the packet header, an in-device."""
    body = struct.pack("=BBH", socket.AF_INET, 0, socket.htons(queue))
    body += _nla(1, struct.pack("!IHB", packet_id, 0x0800, 0) + b"\0")  # NFQA_PACKET_HDR
    body += _nla(5, struct.pack("!I", 3))  # NFQA_IFINDEX_INDEV
    return HEADER.pack(HEADER.size + len(body), nfqueue.msg_type(nfqueue.NFQNL_MSG_PACKET), 0, seq, 0) + body


def error_message(seq: int, errno: int) -> bytes:
    body = struct.pack("=i", -errno) + HEADER.pack(HEADER.size, 0, 0, seq, 0)
    return HEADER.pack(HEADER.size + len(body), 2, 0, seq, 0) + body


def _decode(data: bytes) -> tuple[int, int, int, list[tuple[int, bytes]]]:
    """(type, flags, res_id, [(attribute type, payload)]) of one request we send."""
    length, kind, flags, _, _ = HEADER.unpack_from(data)
    assert length == len(data)
    _, _, res_id = struct.unpack_from("!BBH", data, HEADER.size)
    attrs, offset = [], HEADER.size + 4
    while offset < length:
        size, attr = NLA.unpack_from(data, offset)
        attrs.append((attr, data[offset + NLA.size:offset + size]))
        offset += (size + 3) & ~3
    return kind, flags, res_id, attrs


def test_bind_names_the_queue_and_asks_for_an_ack() -> None:
    kind, flags, res_id, attrs = _decode(nfqueue.bind(31007, seq=5))
    assert kind == 3 << 8 | 2 and res_id == 31007 and flags & 0x4  # NFQNL_MSG_CONFIG, NLM_F_ACK
    assert attrs == [(1, bytes([nfqueue.NFQNL_CFG_CMD_BIND, 0, 0, 0]))]


def test_configure_copies_metadata_only_and_bounds_the_queue() -> None:
    _, _, _, attrs = _decode(nfqueue.configure(31000, seq=2, max_packets=4096))
    assert (2, struct.pack("!IB", 0, nfqueue.NFQNL_COPY_META)) in [(a, p[:5]) for a, p in attrs]
    assert (3, struct.pack("!I", 4096)) in attrs  # NFQA_CFG_QUEUE_MAXLEN


@pytest.mark.parametrize(("accept", "batch", "kind"), [(True, False, 1), (False, False, 1), (True, True, 3)])
def test_verdicts(accept: bool, batch: bool, kind: int) -> None:
    got_kind, _, res_id, attrs = _decode(nfqueue.verdict(31002, 77, accept, batch=batch))
    assert got_kind == 3 << 8 | kind and res_id == 31002
    assert attrs == [(2, struct.pack("!II", 1 if accept else 0, 77))]  # NFQA_VERDICT_HDR


def test_parse_reads_packets_and_acks_of_one_datagram() -> None:
    events = list(nfqueue.parse(packet_message(11) + packet_message(12) + error_message(seq=2, errno=0)
                                + error_message(seq=1, errno=16)))
    assert [e.packet_id for e in events[:2]] == [11, 12]
    assert (events[2].seq, events[2].errno) == (2, 0)
    assert (events[3].seq, events[3].errno) == (1, 16)  # EBUSY: another socket has the queue


@pytest.mark.parametrize("garbage", [
    b"\x01",  # shorter than a header
    HEADER.pack(8, 0, 0, 0, 0),  # a length under the header's
    HEADER.pack(400, nfqueue.msg_type(0), 0, 0, 0) + b"\0" * 8,  # longer than the datagram
    HEADER.pack(HEADER.size + 4, nfqueue.msg_type(0), 0, 0, 0) + b"\0" * 4,  # a packet without its header
    HEADER.pack(HEADER.size + 2, 2, 0, 0, 0) + b"\0\0",  # a truncated error
    HEADER.pack(HEADER.size + 4, 0x1234, 0, 0, 0) + b"\0" * 4,  # another subsystem's message
    HEADER.pack(HEADER.size + 12, nfqueue.msg_type(0), 0, 0, 0) + b"\0" * 4 + NLA.pack(200, 1) + b"\0" * 4,
    os.urandom(256),
])
def test_garbage_is_a_protocol_error(garbage: bytes) -> None:
    with pytest.raises(nfqueue.ProtocolError):
        list(nfqueue.parse(garbage))


def test_random_datagrams_raise_nothing_but_protocol_errors() -> None:
    for _ in range(500):
        data = packet_message(1)[: int.from_bytes(os.urandom(1), "big") % 48] + os.urandom(16)
        try:
            list(nfqueue.parse(data))
        except nfqueue.ProtocolError:
            pass


def test_hold_state_holds_then_settles_once() -> None:
    state = nfqueue.HoldState(31000)
    assert state.on_packet(5) is None and state.on_packet(9) is None and state.on_packet(7) is None
    batch = state.settle(accept=True)
    assert batch is not None
    kind, _, _, attrs = _decode(batch)
    assert kind == 3 << 8 | 3 and attrs == [(2, struct.pack("!II", 1, 9))]  # every id up to the highest
    assert state.settle(accept=False) is None and state.mode == "accept"  # the first decision stands
    later = state.on_packet(10)
    assert later is not None and _decode(later)[3] == [(2, struct.pack("!II", 1, 10))]
    assert (state.held, state.after) == (3, 1)


def test_hold_state_with_nothing_held_sends_no_batch() -> None:
    state = nfqueue.HoldState(31000)
    assert state.settle(accept=False) is None
    dropped = state.on_packet(1)
    assert dropped is not None and _decode(dropped)[3] == [(2, struct.pack("!II", 0, 1))]


def test_rule_queues_with_bypass_and_names_its_owner() -> None:
    spec = hold.rule("10.234.3.2", 31004, hold.owner_tag(31004))
    assert spec[:3] == ["-t", "raw", "PREROUTING"] and "--queue-bypass" in spec
    assert spec[spec.index("--queue-num") + 1] == "31004"
    tag = spec[spec.index("--comment") + 1]
    assert tag.startswith(f"{hold.TAG}:{os.getpid()}:") and tag.endswith(":31004")


def test_dead_rules_are_those_of_gone_or_reused_pids() -> None:
    mine = hold.owner_tag(31000)
    pid, start = mine.split(":")[1:3]
    listing = "\n".join([
        "-P PREROUTING ACCEPT",
        f'-A PREROUTING -d 10.0.0.1/32 -m comment --comment "{mine}" -j NFQUEUE --queue-num 31000 --queue-bypass',
        f'-A PREROUTING -d 10.0.0.2/32 -m comment --comment "{hold.TAG}:{pid}:{int(start) + 1}:31001" -j NFQUEUE '
        "--queue-num 31001 --queue-bypass",  # our pid, another start time: reused
        f'-A PREROUTING -d 10.0.0.3/32 -m comment --comment "{hold.TAG}:999999999:1:31002" -j NFQUEUE '
        "--queue-num 31002 --queue-bypass",  # no such process
        '-A PREROUTING -d 10.0.0.4/32 -m comment --comment "someone else" -j NFQUEUE --queue-num 5',
        f'-A PREROUTING -d 10.0.0.5/32 -m comment --comment "{hold.TAG}:x:1:2" -j DROP',  # not ours to parse
        "-A PREROUTING 'unbalanced",
    ][:-1])
    gone = hold.dead_rules(listing)
    assert [g[g.index("-d") + 1] for g in gone] == ["10.0.0.2/32", "10.0.0.3/32"]
    assert all(g[:3] == ["-t", "raw", "-D"] and g[3] == "PREROUTING" for g in gone)


def test_dead_rules_of_host_originated_traffic_go_too() -> None:
    listing = "\n".join([
        "-P OUTPUT ACCEPT",
        f'-A OUTPUT -d 10.0.0.3/32 -m comment --comment "{hold.TAG}:999999999:1:31002" -j NFQUEUE '
        "--queue-num 31002 --queue-bypass",
        f'-A POSTROUTING -d 10.0.0.4/32 -m comment --comment "{hold.TAG}:999999999:1:31002" -j NFQUEUE '
        "--queue-num 31002 --queue-bypass",  # not a chain we write
    ])
    assert hold.dead_rules(listing) == [["-t", "raw", "-D", "OUTPUT", *listing.splitlines()[1].split()[2:4],
                                         "-m", "comment", "--comment", f"{hold.TAG}:999999999:1:31002",
                                         "-j", "NFQUEUE", "--queue-num", "31002", "--queue-bypass"]]


def test_each_address_is_held_where_it_arrives_and_where_this_host_sends_it() -> None:
    assert hold.CHAINS == ("PREROUTING", "OUTPUT")
    assert hold.rule("10.234.3.2", 31004, "t", "OUTPUT")[:3] == ["-t", "raw", "OUTPUT"]


def test_dead_rules_skip_lines_they_cannot_split() -> None:
    assert hold.dead_rules("-A PREROUTING -m comment --comment 'unbalanced\n") == []


def test_criu_unlock_script_deletes_only_criu_s_jumps_and_chain() -> None:
    jump = {"jump": {"target": "CRIU"}}
    ruleset = {"nftables": [
        {"metainfo": {}},
        {"table": {"family": "ip", "name": "filter"}},
        {"chain": {"family": "ip", "table": "filter", "name": "CRIU"}},
        {"chain": {"family": "ip", "table": "filter", "name": "INPUT"}},
        {"rule": {"family": "ip", "table": "filter", "chain": "CRIU", "handle": 2, "expr": [{"accept": None}]}},
        {"rule": {"family": "ip", "table": "filter", "chain": "INPUT", "handle": 5, "expr": [{"counter": {}}, jump]}},
        {"rule": {"family": "ip6", "table": "filter", "chain": "OUTPUT", "handle": 7, "expr": [jump]}},
        {"rule": {"family": "ip", "table": "filter", "chain": "INPUT", "handle": 9,
                  "expr": [{"jump": {"target": "KUBE"}}]}},  # the pod's own: kept
        {"chain": {"family": "ip6", "table": "filter", "name": "CRIU"}},
        "garbage", {"rule": "garbage"},
    ]}
    assert netlock.criu_unlock_script(ruleset).splitlines() == [
        "delete rule ip filter INPUT handle 5", "delete rule ip6 filter OUTPUT handle 7",
        "flush chain ip filter CRIU", "delete chain ip filter CRIU",
        "flush chain ip6 filter CRIU", "delete chain ip6 filter CRIU"]
    assert netlock.criu_unlock_script({"nftables": []}) == "" and netlock.criu_unlock_script([]) == ""


def test_a_zombie_owner_is_gone() -> None:
    """A receiver killed and not yet reaped (its parent may be an init that never reaps) owns nothing."""
    child = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert hold._start_time(child.pid) is None
        assert hold._start_time(os.getpid()) is not None
    finally:
        child.wait()
