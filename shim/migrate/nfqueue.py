"""nfnetlink_queue messages (NFNL_SUBSYS_QUEUE), sans I/O: what the hold's listener sends and reads.

pyroute2 has the nfnetlink base (nfgen_msg) but no queue messages; these follow the kernel's
include/uapi/linux/netfilter/nfnetlink_queue.h. The listener copies metadata only (no payload:
it never looks into a packet, it only decides when the queued packets go on), and gives verdicts
by packet id: NFQNL_MSG_VERDICT_BATCH decides every queued packet whose id is at most the one given.

`HoldState` is the listener's bookkeeping: packets are held until the migration settles, then all
accepted (the restored sockets answer them) or all dropped (the peers retransmit, as without a hold).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR, nla, nlmsg
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_QUEUE, nfgen_msg

NETLINK_NETFILTER = 12
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_COPY_META = 1
NF_DROP = 0
NF_ACCEPT = 1
NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, seq, pid


def msg_type(kind: int) -> int:
    return int(NFNL_SUBSYS_QUEUE) << 8 | kind


# pyroute2 is untyped (Any): its message classes are subclassed as its own modules do.
class nfqnl_config(nfgen_msg):  # type: ignore[misc]  # noqa: N801 - the kernel's names, as pyroute2 spells them
    nla_map = (
        ("NFQA_CFG_UNSPEC", "none"),
        ("NFQA_CFG_CMD", "cmd"),
        ("NFQA_CFG_PARAMS", "params"),
        ("NFQA_CFG_QUEUE_MAXLEN", "be32"),
        ("NFQA_CFG_MASK", "be32"),
        ("NFQA_CFG_FLAGS", "be32"),
    )

    class cmd(nla):  # type: ignore[misc]  # noqa: N801
        fields = (("command", "B"), ("_pad", "B"), ("pf", "!H"))

    class params(nla):  # type: ignore[misc]  # noqa: N801
        fields = (("copy_range", "!I"), ("copy_mode", "B"))


class nfqnl_packet(nfgen_msg):  # type: ignore[misc]  # noqa: N801 - packets and verdicts: the NFQA_ attributes
    nla_map = (
        ("NFQA_UNSPEC", "none"),
        ("NFQA_PACKET_HDR", "packet_hdr"),
        ("NFQA_VERDICT_HDR", "verdict_hdr"),
        ("NFQA_MARK", "be32"),
        ("NFQA_TIMESTAMP", "hex"),
        ("NFQA_IFINDEX_INDEV", "be32"),
        ("NFQA_IFINDEX_OUTDEV", "be32"),
        ("NFQA_IFINDEX_PHYSINDEV", "be32"),
        ("NFQA_IFINDEX_PHYSOUTDEV", "be32"),
        ("NFQA_HWADDR", "hex"),
        ("NFQA_PAYLOAD", "hex"),
    )

    class packet_hdr(nla):  # type: ignore[misc]  # noqa: N801
        fields = (("packet_id", "!I"), ("hw_protocol", "!H"), ("hook", "B"))

    class verdict_hdr(nla):  # type: ignore[misc]  # noqa: N801
        fields = (("verdict", "!I"), ("id", "!I"))


class ProtocolError(Exception):
    """The kernel's answer is not what nfnetlink_queue sends (or says an error)."""


def _encode(message: nlmsg, kind: int, queue: int, seq: int, flags: int) -> bytes:
    message["header"]["type"] = msg_type(kind)
    message["header"]["flags"] = flags
    message["header"]["sequence_number"] = seq
    message["nfgen_family"] = socket.AF_UNSPEC
    message["version"] = 0
    message["res_id"] = queue
    message.encode()
    return bytes(message.data)


def bind(queue: int, seq: int) -> bytes:
    """Bind this socket to queue `queue` (EBUSY if another socket has it)."""
    message = nfqnl_config()
    message["attrs"] = [("NFQA_CFG_CMD", {"command": NFQNL_CFG_CMD_BIND, "_pad": 0, "pf": socket.AF_UNSPEC})]
    return _encode(message, NFQNL_MSG_CONFIG, queue, seq, NLM_F_REQUEST | NLM_F_ACK)


def configure(queue: int, seq: int, max_packets: int) -> bytes:
    """Metadata only (ids, no payload), and at most `max_packets` queued: the kernel drops the rest."""
    message = nfqnl_config()
    message["attrs"] = [("NFQA_CFG_PARAMS", {"copy_range": 0, "copy_mode": NFQNL_COPY_META}),
                        ("NFQA_CFG_QUEUE_MAXLEN", max_packets)]
    return _encode(message, NFQNL_MSG_CONFIG, queue, seq, NLM_F_REQUEST | NLM_F_ACK)


def unbind(queue: int, seq: int) -> bytes:
    message = nfqnl_config()
    message["attrs"] = [("NFQA_CFG_CMD", {"command": NFQNL_CFG_CMD_UNBIND, "_pad": 0, "pf": socket.AF_UNSPEC})]
    return _encode(message, NFQNL_MSG_CONFIG, queue, seq, NLM_F_REQUEST | NLM_F_ACK)


def verdict(queue: int, packet_id: int, accept: bool, batch: bool = False) -> bytes:
    """One packet's verdict, or with `batch` every queued packet's whose id is at most `packet_id`."""
    message = nfqnl_packet()
    message["attrs"] = [("NFQA_VERDICT_HDR", {"verdict": NF_ACCEPT if accept else NF_DROP, "id": packet_id})]
    return _encode(message, NFQNL_MSG_VERDICT_BATCH if batch else NFQNL_MSG_VERDICT, queue, 0, NLM_F_REQUEST)


@dataclass(frozen=True)
class Event:
    """One message from the kernel: a queued packet's id, or an ack/error (errno 0: ack) of request `seq`."""

    packet_id: int | None = None
    seq: int = 0
    errno: int | None = None


def parse(data: bytes) -> Iterator[Event]:
    """The messages of one datagram. Anything malformed raises ProtocolError, never anything else."""
    offset = 0
    while offset < len(data):
        if len(data) - offset < NLMSG_HEADER.size:
            raise ProtocolError(f"a truncated netlink header ({len(data) - offset} bytes)")
        length, kind, _, seq, _ = NLMSG_HEADER.unpack_from(data, offset)
        if length < NLMSG_HEADER.size or offset + length > len(data):
            raise ProtocolError(f"a netlink message of length {length} in {len(data) - offset} bytes")
        yield _event(data[offset:offset + length], kind, seq)
        offset += (length + 3) & ~3


def _event(chunk: bytes, kind: int, seq: int) -> Event:
    if kind == NLMSG_ERROR:
        if len(chunk) < NLMSG_HEADER.size + 4:
            raise ProtocolError("a truncated netlink error")
        (code,) = struct.unpack_from("=i", chunk, NLMSG_HEADER.size)
        return Event(seq=seq, errno=-code)
    if kind != msg_type(NFQNL_MSG_PACKET):
        raise ProtocolError(f"unexpected netlink message type {kind:#x}")
    try:
        message = nfqnl_packet(chunk)
        message.decode()
        header: Any = message.get_attr("NFQA_PACKET_HDR")
    except Exception as exc:  # pyroute2 raises whatever its struct unpacking does on garbage
        raise ProtocolError(f"an undecodable queued packet message: {exc.__class__.__name__}") from None
    # pyroute2 logs an attribute it cannot decode and leaves its raw bytes in place of the dict
    if not isinstance(header, dict) or not isinstance(header.get("packet_id"), int):
        raise ProtocolError("a queued packet message without its packet header")
    return Event(packet_id=int(header["packet_id"]))


@dataclass
class HoldState:
    """Which packets are held and what becomes of the next: "hold" until the migration settles,
    then "accept" (restored) or "drop" (failed, or held past the bound): every held packet at once
    by a batch verdict, and each later one as it comes, until the rule is gone."""

    queue: int
    mode: str = "hold"
    held: int = 0  # packets held while holding
    highest: int | None = None
    after: int = 0  # packets decided one by one after the hold settled

    def on_packet(self, packet_id: int) -> bytes | None:
        if self.mode == "hold":
            self.held += 1
            self.highest = packet_id if self.highest is None else max(self.highest, packet_id)
            return None
        self.after += 1
        return verdict(self.queue, packet_id, self.mode == "accept")

    def settle(self, accept: bool) -> bytes | None:
        """Leave "hold" (a second call changes nothing): the batch verdict for what is held, if any."""
        if self.mode != "hold":
            return None
        self.mode = "accept" if accept else "drop"
        return None if self.highest is None else verdict(self.queue, self.highest, accept, batch=True)
