"""The relay engine, sans-IO: client bytes and upstream bytes in, the other side's bytes out.

What the splice sends upstream is fed to a real server-side `Connection`, and
what it sends the client to a client-side one, so a broken stream-id order or
a frame split in two shows up as a rejection or a missing event.
"""

from __future__ import annotations

from shim.errors import Code
from shim.ttrpc import (
    Connection,
    RequestReceived,
    ResponseReceived,
    RewriteRequested,
    Role,
    Splice,
    Status,
    StreamRejected,
)
from shim.ttrpc.frame import MAX_DATA_LENGTH, MessageType, encode_frame

TASK = "containerd.task.v2.Task"


def joined(chunks: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(c) for c in chunks)


class Rig:
    """containerd (a client Connection) -> Splice -> the runc shim (a server Connection)."""

    def __init__(self, *rewritten: str) -> None:
        self.client = Connection(Role.CLIENT)
        self.upstream = Connection(Role.SERVER)
        self.splice = Splice(lambda service, method: service == TASK and method in rewritten)
        self.up_bytes = b""
        self.down_bytes = b""

    def call(self, method: str, payload: bytes = b"") -> int:
        stream_id = self.client.next_stream_id
        self.splice.receive_from_client(self.client.send_request(TASK, method, payload))
        self.pump()
        return stream_id

    def pump(self) -> None:
        up = joined(self.splice.data_for_upstream())
        down = joined(self.splice.data_for_client())
        self.up_bytes += up
        self.down_bytes += down
        if up:
            self.upstream.receive_data(up)
        if down:
            self.client.receive_data(down)

    def answer(self, stream_id: int, payload: bytes) -> None:
        self.splice.receive_from_upstream(self.upstream.send_response(stream_id, payload))
        self.pump()

    def seen_upstream(self) -> list[object]:
        return list(iter(self.upstream.next_event, None))

    def seen_by_client(self) -> list[object]:
        return list(iter(self.client.next_event, None))

    def rewrites(self) -> list[RewriteRequested]:
        return list(iter(self.splice.next_event, None))


def test_pass_through_is_byte_identical_in_any_chunking() -> None:
    client = Connection(Role.CLIENT)
    wire = b"".join(client.send_request(TASK, m, bytes([i]) * i) for i, m in enumerate(["State", "Pids", "Stats"]))
    splice = Splice(lambda service, method: False)
    for i in range(0, len(wire), 7):
        splice.receive_from_client(wire[i : i + 7])
    assert joined(splice.data_for_upstream()) == wire
    server = Connection(Role.SERVER)
    server.receive_data(wire)
    back = server.send_response(3, b"pids") + server.send_response(1, status=Status(Code.NOT_FOUND, "nope"))
    for i in range(len(back)):
        splice.receive_from_upstream(back[i : i + 1])
    assert joined(splice.data_for_client()) == back
    assert splice.next_event() is None


def test_rewritten_request_keeps_its_stream_id_and_the_order() -> None:
    rig = Rig("Create")
    rig.call("State", b"s1")
    create = rig.call("Create", b"original")
    rig.call("Start", b"s2")
    [event] = rig.rewrites()
    assert (event.stream_id, event.request.method, event.request.payload) == (create, "Create", b"original")
    assert [e.method for e in rig.seen_upstream()] == ["State"]  # type: ignore[attr-defined]
    assert rig.splice.busy
    rig.splice.forward(create, b"rewritten")
    rig.pump()
    assert rig.seen_upstream() == [RequestReceived(3, TASK, "Create", b"rewritten"), RequestReceived(5, TASK, "Start", b"s2")]
    rig.answer(5, b"started")
    rig.answer(3, b"created")
    rig.answer(1, b"state")
    assert [(e.stream_id, e.payload) for e in rig.seen_by_client()] == [(5, b"started"), (3, b"created"), (1, b"state")]  # type: ignore[attr-defined]
    assert not rig.splice.busy


def test_unchanged_payload_forwards_the_very_bytes() -> None:
    rig = Rig("Create")
    frame = rig.client.send_request(TASK, "Create", b"same", metadata=(("k", "v"),))
    rig.splice.receive_from_client(frame)
    [event] = rig.rewrites()
    rig.splice.forward(event.stream_id, b"same")
    assert joined(rig.splice.data_for_upstream()) == frame


def test_failed_rewrite_is_answered_here_and_never_reaches_upstream() -> None:
    rig = Rig("Create")
    create = rig.call("Create", b"x")
    later = rig.call("State")
    rig.splice.fail(create, Status(Code.FAILED_PRECONDITION, "no checkpoint"))
    rig.pump()
    assert rig.seen_by_client() == [ResponseReceived(create, Code.FAILED_PRECONDITION, "no checkpoint", b"")]
    assert [e.stream_id for e in rig.seen_upstream()] == [later]  # type: ignore[attr-defined]
    rig.splice.forward(create, b"too late")  # already answered: nothing happens
    rig.splice.fail(create, Status(Code.INTERNAL, "twice"))
    assert rig.splice.data_for_upstream() == [] and rig.splice.data_for_client() == []


def test_two_held_requests_are_released_in_order() -> None:
    rig = Rig("Create", "Start")
    first = rig.call("Create", b"a")
    second = rig.call("Start", b"b")
    rig.call("State")
    rig.splice.forward(second, b"B")
    rig.pump()
    assert rig.seen_upstream() == []
    rig.splice.forward(first, b"A")
    rig.pump()
    assert [(e.stream_id, e.payload) for e in rig.seen_upstream()] == [(1, b"A"), (3, b"B"), (5, b"")]  # type: ignore[attr-defined]


def test_oversized_client_frame_is_answered_not_forwarded() -> None:
    rig = Rig()
    rig.splice.receive_from_client(bytes.fromhex("00400001" "00000001" "01" "00") + bytes(MAX_DATA_LENGTH + 1))
    rig.client.send_request(TASK, "Create")  # the client's view of stream 1
    rig.pump()
    assert rig.up_bytes == b""
    [answer] = rig.seen_by_client()
    assert isinstance(answer, ResponseReceived) and answer.status_code == Code.RESOURCE_EXHAUSTED


def test_oversized_rewrite_result_fails_the_call() -> None:
    rig = Rig("Create")
    create = rig.call("Create")
    rig.splice.forward(create, bytes(MAX_DATA_LENGTH))
    rig.pump()
    assert rig.up_bytes == b""
    [answer] = rig.seen_by_client()
    assert isinstance(answer, ResponseReceived) and answer.status_code == Code.RESOURCE_EXHAUSTED


def test_undecodable_request_goes_upstream_to_be_refused_there() -> None:
    rig = Rig("Create")
    bad = encode_frame(1, MessageType.REQUEST, 0, b"\x0a\xff")
    rig.splice.receive_from_client(bad)
    assert joined(rig.splice.data_for_upstream()) == bad and rig.rewrites() == []
    rig.upstream.receive_data(bad)
    assert isinstance(rig.upstream.next_event(), StreamRejected)


def test_request_ids_upstream_always_increase() -> None:
    rig = Rig("Create")
    for round_ in range(5):
        held = rig.call("Create", b"c")
        passed = [rig.call("State") for _ in range(round_)]
        rig.splice.forward(held, b"C")
        rig.pump()
        for stream_id in [held, *passed]:
            rig.answer(stream_id, b"ok")
    assert not any(isinstance(e, StreamRejected) for e in rig.seen_upstream())
    assert len(rig.seen_by_client()) == 5 + sum(range(5))


def test_answered_request_gets_the_reply_made_here_and_never_reaches_upstream() -> None:
    rig = Rig("Stats")
    stats = rig.call("Stats", b"id")
    later = rig.call("State")
    assert rig.seen_upstream() == []  # held behind the Stats
    rig.splice.answer(stats, b"figures")
    rig.pump()
    assert rig.seen_by_client() == [ResponseReceived(stats, Code.OK, "", b"figures")]
    assert [e.stream_id for e in rig.seen_upstream()] == [later]  # type: ignore[attr-defined]
    assert rig.splice.busy  # the State is still upstream's
    rig.answer(later, b"state")
    assert not rig.splice.busy
    rig.splice.answer(stats, b"twice")  # already answered: nothing happens
    rig.splice.forward(stats, b"too late")
    assert rig.splice.data_for_upstream() == [] and rig.splice.data_for_client() == []


def test_answer_is_byte_identical_to_the_upstream_server_s_own() -> None:
    made_here, from_server = Rig("Stats"), Rig()
    made_here.splice.answer(made_here.call("Stats"), b"\x0a\x02hi")
    made_here.pump()
    from_server.answer(from_server.call("Stats"), b"\x0a\x02hi")
    assert made_here.down_bytes == from_server.down_bytes  # a success carries no status field, as Go's


def test_oversized_answer_fails_the_call() -> None:
    rig = Rig("Stats")
    stats = rig.call("Stats")
    rig.splice.answer(stats, bytes(MAX_DATA_LENGTH))
    rig.pump()
    assert rig.up_bytes == b""
    [answer] = rig.seen_by_client()
    assert isinstance(answer, ResponseReceived) and answer.status_code == Code.RESOURCE_EXHAUSTED
    assert not rig.splice.busy
