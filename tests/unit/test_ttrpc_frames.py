"""The ttrpc engine, sans-IO: golden frames from the protocol and the Go peer, then the rules.

Golden frames are written out by hand from containerd/ttrpc PROTOCOL.md and
request.proto; the ones marked "runc shim" are bytes containerd-shim-runc-v2
1.7.24 actually sent (captured once, and checked again live by
tests/adapters/test_ttrpc_runc_shim.py).
"""

from __future__ import annotations

import pytest

import shim.ttrpc
from shim.api.containerd.runtime.task.v2 import shim_pb2
from shim.errors import Code, ResourceExhausted
from shim.ttrpc import (
    OK,
    Connection,
    ConnectionClosed,
    DataReceived,
    Flag,
    LocalProtocolError,
    Request,
    RequestReceived,
    ResponseReceived,
    Role,
    Status,
    StreamRejected,
    decode_request,
    encode_request,
)
from shim.ttrpc.frame import (
    HEADER_LENGTH,
    MAX_DATA_LENGTH,
    FrameBuffer,
    MessageType,
    Oversized,
    decode_header,
    encode_frame,
)
from shim.ttrpc.messages import decode_response, encode_response, replace_payload

TASK = "containerd.task.v2.Task"

# CreateTaskRequest{id: "c1", bundle: "/b"}
CREATE_PAYLOAD = bytes.fromhex("0a02633112022f62")
# A unary Request for containerd.task.v2.Task/Create carrying it, on stream 1.
CREATE_FRAME = bytes.fromhex(
    "0000002b" "00000001" "01" "00"  # length 43, stream 1, Request, no flags (unary)
    "0a17" "636f6e7461696e6572642e7461736b2e76322e5461736b"  # 1 service "containerd.task.v2.Task"
    "1206" "437265617465"  # 2 method "Create"
    "1a08" "0a02633112022f62"  # 3 payload
)
# A Response on stream 3 with status {code 5, message "not found"} and no payload.
NOT_FOUND_FRAME = bytes.fromhex(
    "0000000f" "00000003" "02" "00"  # length 15, stream 3, Response
    "0a0d" "0805" "1209" "6e6f7420666f756e64"  # 1 status {1 code 5, 2 message "not found"}
)
# runc shim: Connect's success Response, stream 1: no status field, payload ConnectResponse{shim_pid 16685}.
RUNC_CONNECT_OK = bytes.fromhex("00000006" "00000001" "0200" "120408ad8201")
# runc shim: State of an unknown task, stream 3: NOT_FOUND.
RUNC_STATE_NOT_FOUND = bytes.fromhex(
    "00000026000000030200"
    "0a2408051220636f6e7461696e6572206e6f7420637265617465643a206e6f7420666f756e64")
# runc shim: its answer to a Request on (even) stream 2.
RUNC_EVEN_ID = bytes.fromhex(
    "00000037000000020200"
    "0a350803123153747265616d4944206d757374206265206f646420666f7220636c69656e7420696e697469617465642073747265616d73")
# runc shim: its answer to a second Request on stream 3 (after 3 was used).
RUNC_REUSED_ID = bytes.fromhex(
    "00000033000000030200"
    "0a310803122d53747265616d49442063616e6e6f742062652072652d7573656420616e64206d75737420696e6372656d656e74")


def events(conn: Connection) -> list[object]:
    out = []
    while (event := conn.next_event()) is not None:
        out.append(event)
    return out


def server_fed(*chunks: bytes) -> tuple[Connection, list[object]]:
    conn = Connection(Role.SERVER)
    for chunk in chunks:
        conn.receive_data(chunk)
    return conn, events(conn)


# -- golden frames ----------------------------------------------------------------


def test_golden_create_request_is_what_a_client_sends() -> None:
    client = Connection(Role.CLIENT)
    assert client.send_request(TASK, "Create", CREATE_PAYLOAD) == CREATE_FRAME
    assert shim_pb2.CreateTaskRequest(id="c1", bundle="/b").SerializeToString() == CREATE_PAYLOAD


def test_golden_create_request_decodes() -> None:
    conn, got = server_fed(CREATE_FRAME)
    assert got == [RequestReceived(1, TASK, "Create", CREATE_PAYLOAD, 0, (), 0)]
    assert conn.data_to_send() == b""
    assert decode_header(CREATE_FRAME) == (43, 1, MessageType.REQUEST, 0)


def test_golden_error_response_both_ways() -> None:
    server, _ = server_fed(CREATE_FRAME, encode_frame(3, MessageType.REQUEST, 0, encode_request(Request(TASK, "State", b""))))
    assert server.send_response(3, status=Status(Code.NOT_FOUND, "not found")) == NOT_FOUND_FRAME

    client = Connection(Role.CLIENT)
    client.send_request(TASK, "Create")
    client.send_request(TASK, "State")
    client.receive_data(NOT_FOUND_FRAME)
    assert events(client) == [ResponseReceived(3, Code.NOT_FOUND, "not found", b"")]


def test_golden_success_response_has_no_status_field_like_the_go_server() -> None:
    server, _ = server_fed(encode_frame(1, MessageType.REQUEST, 0, encode_request(Request(TASK, "Connect", b""))))
    assert server.send_response(1, bytes.fromhex("08ad8201")) == RUNC_CONNECT_OK


def test_golden_runc_shim_responses_decode() -> None:
    client = Connection(Role.CLIENT)
    client.send_request(TASK, "Connect")
    client.send_request(TASK, "State")
    client.receive_data(RUNC_CONNECT_OK + RUNC_STATE_NOT_FOUND)
    ok, not_found = events(client)
    assert isinstance(ok, ResponseReceived) and ok.status == OK
    assert shim_pb2.ConnectResponse.FromString(ok.payload).shim_pid == 16685
    assert not_found == ResponseReceived(3, Code.NOT_FOUND, "container not created: not found", b"")


def test_golden_data_frame_flags() -> None:
    server, _ = server_fed(Connection(Role.CLIENT).send_request(TASK, "Stream", flags=Flag.REMOTE_OPEN))
    client = Connection(Role.CLIENT)
    client.send_request(TASK, "Stream", flags=Flag.REMOTE_OPEN)
    assert client.send_data(1, b"\x08\x01") == bytes.fromhex("00000002" "00000001" "03" "00" "0801")
    assert client.send_data(1, b"") == bytes.fromhex("00000000" "00000001" "03" "00")  # an empty message
    assert client.send_data(1, None, end_stream=True) == bytes.fromhex("00000000" "00000001" "03" "05")
    assert server.send_data(1, b"\x08\x02", end_stream=True) == bytes.fromhex("00000002" "00000001" "03" "01" "0802")


def test_golden_rejections_match_the_runc_shim_byte_for_byte() -> None:
    request = encode_request(Request(TASK, "State", shim_pb2.StateRequest(id="nope").SerializeToString()))
    conn, got = server_fed(encode_frame(3, MessageType.REQUEST, 0, request), encode_frame(2, MessageType.REQUEST, 0, request),
                           encode_frame(3, MessageType.REQUEST, 0, request))
    assert conn.data_to_send() == RUNC_EVEN_ID + RUNC_REUSED_ID
    assert [type(e) for e in got] == [RequestReceived, StreamRejected, StreamRejected]
    assert got[1:] == [
        StreamRejected(2, Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams"),
        StreamRejected(3, Code.INVALID_ARGUMENT, "StreamID cannot be re-used and must increment"),
    ]


def test_reused_id_is_refused_without_touching_the_live_stream() -> None:
    conn, got = server_fed(CREATE_FRAME, CREATE_FRAME)
    assert got[1] == StreamRejected(1, Code.INVALID_ARGUMENT, "StreamID cannot be re-used and must increment", ended=False)
    conn.data_to_send()
    assert conn.send_response(1, b"created")  # the first stream 1 is still ours to answer


# -- the frame buffer ---------------------------------------------------------------


def test_partial_frames_fed_byte_by_byte() -> None:
    conn = Connection(Role.SERVER)
    stream = CREATE_FRAME + encode_frame(3, MessageType.REQUEST, 0, encode_request(Request(TASK, "Start", b"")))
    seen: list[object] = []
    for i in range(len(stream)):
        conn.receive_data(stream[i : i + 1])
        seen += [(i, e) for e in events(conn)]
    assert [(i, type(e)) for i, e in seen] == [(len(CREATE_FRAME) - 1, RequestReceived), (len(stream) - 1, RequestReceived)]


def test_frame_buffer_keeps_raw_bytes_and_survives_later_parses() -> None:
    buf = FrameBuffer()
    first = buf.parse(CREATE_FRAME[:20])
    frames = buf.parse(CREATE_FRAME[20:] + NOT_FOUND_FRAME[:5])
    buf.parse(NOT_FOUND_FRAME[5:])
    assert first == []
    [frame] = frames
    assert not isinstance(frame, Oversized)
    assert bytes(frame.raw) == CREATE_FRAME and bytes(frame.data) == CREATE_FRAME[HEADER_LENGTH:]
    assert buf.pending == 0


def test_oversized_frame_is_discarded_and_answered_and_the_connection_goes_on() -> None:
    length = MAX_DATA_LENGTH + 1
    conn = Connection(Role.SERVER)
    conn.receive_data(bytes.fromhex("00400001" "00000005" "01" "00") + b"\xff" * 1000)
    assert events(conn) == [] and conn.data_to_send() == b""  # still discarding
    rest = length - 1000
    while rest > 65536:
        conn.receive_data(b"\xff" * 65536)
        rest -= 65536
    conn.receive_data(b"\xff" * rest + CREATE_FRAME[:-1])
    message = "message length 4194305 exceed maximum message size of 4194304"
    assert events(conn) == [StreamRejected(5, Code.RESOURCE_EXHAUSTED, message)]
    assert conn.data_to_send() == encode_frame(5, MessageType.RESPONSE, 0, encode_response(b"", Status(Code.RESOURCE_EXHAUSTED, message)))
    conn.receive_data(CREATE_FRAME[-1:])
    assert [type(e) for e in events(conn)] == [RequestReceived]


def test_oversized_frame_in_one_chunk_between_others() -> None:
    big = bytes.fromhex("00400001" "00000007" "03" "00") + bytes(MAX_DATA_LENGTH + 1)
    got = FrameBuffer().parse(CREATE_FRAME + big + NOT_FOUND_FRAME)
    assert [type(f) for f in got] == [type(got[0]), Oversized, type(got[0])]
    assert got[1] == Oversized(7, MessageType.DATA, 0, MAX_DATA_LENGTH + 1)


def test_frame_of_exactly_the_limit_is_accepted() -> None:
    [frame] = FrameBuffer().parse(encode_frame(1, MessageType.DATA, 0, bytes(MAX_DATA_LENGTH)))
    assert not isinstance(frame, Oversized) and len(frame.data) == MAX_DATA_LENGTH


def test_sender_refuses_oversized_data_without_using_a_stream_id() -> None:
    client = Connection(Role.CLIENT)
    with pytest.raises(ResourceExhausted):
        client.send_request(TASK, "Create", bytes(MAX_DATA_LENGTH))
    assert client.next_stream_id == 1 and client.open_streams == frozenset()


# -- server rules -------------------------------------------------------------------


def test_even_stream_id_is_rejected_whatever_the_type() -> None:
    conn, got = server_fed(encode_frame(4, 0x7F, 0, b"future"), encode_frame(6, MessageType.DATA, 0, b""))
    assert [(e.stream_id, e.code) for e in got if isinstance(e, StreamRejected)] == [(4, Code.INVALID_ARGUMENT), (6, Code.INVALID_ARGUMENT)]
    assert len(conn.data_to_send()) > 0


def test_unknown_message_type_is_ignored() -> None:
    conn, got = server_fed(encode_frame(1, 0x7F, 0x80, b"from a future ttrpc"), CREATE_FRAME)
    assert [type(e) for e in got] == [RequestReceived]  # stream 1 still unused by the unknown frame
    assert conn.data_to_send() == b""


def test_response_frames_sent_to_a_server_are_ignored() -> None:
    conn, got = server_fed(NOT_FOUND_FRAME)
    assert got == [] and conn.data_to_send() == b""


def test_undecodable_request_is_invalid_argument() -> None:
    conn, got = server_fed(encode_frame(1, MessageType.REQUEST, 0, b"\x0a\xff"))
    [rejected] = got
    assert isinstance(rejected, StreamRejected) and rejected.code == Code.INVALID_ARGUMENT
    assert rejected.message.startswith("unmarshal request error")
    status, _ = decode_response(conn.data_to_send()[HEADER_LENGTH:])
    assert status.code == Code.INVALID_ARGUMENT


def test_request_metadata_and_timeout_round_trip() -> None:
    request = Request(TASK, "Create", b"x", 5_000_000_000, (("k", "1"), ("k", "2"), ("other", "v")))
    assert decode_request(encode_request(request)) == request
    _, got = server_fed(Connection(Role.CLIENT).send_request(TASK, "Create", b"x", timeout_nano=5_000_000_000,
                                                             metadata=request.metadata))
    assert got == [RequestReceived(1, TASK, "Create", b"x", 5_000_000_000, request.metadata, 0)]


def test_replace_payload_keeps_everything_else() -> None:
    body = encode_request(Request(TASK, "Create", b"old", 7, (("a", "b"),))) + bytes.fromhex("f00103")  # field 30 = 3
    replaced = decode_request(replace_payload(body, b"new"))
    assert replaced == Request(TASK, "Create", b"new", 7, (("a", "b"),))
    assert replace_payload(body, b"new").endswith(bytes.fromhex("f00103"))  # the unknown field kept


def test_client_streaming_call() -> None:
    client = Connection(Role.CLIENT)
    server = Connection(Role.SERVER)
    server.receive_data(client.send_request(TASK, "Upload", b"first", flags=Flag.REMOTE_OPEN)
                        + client.send_data(1, b"second") + client.send_data(1, None, end_stream=True))
    assert events(server) == [RequestReceived(1, TASK, "Upload", b"first", 0, (), Flag.REMOTE_OPEN),
                              DataReceived(1, b"second", False), DataReceived(1, None, True)]
    with pytest.raises(LocalProtocolError):
        client.send_data(1, b"late")
    client.receive_data(server.send_response(1, b"done"))
    assert events(client) == [ResponseReceived(1, Code.OK, "", b"done")]
    assert client.open_streams == server.open_streams == frozenset()


def test_server_streaming_call() -> None:
    client = Connection(Role.CLIENT)
    server = Connection(Role.SERVER)
    server.receive_data(client.send_request(TASK, "Watch", b"", flags=Flag.REMOTE_CLOSED))
    client.receive_data(server.send_data(1, b"one") + server.send_data(1, None, end_stream=True))
    assert events(client) == [DataReceived(1, b"one", False), DataReceived(1, None, True)]
    assert client.open_streams == server.open_streams == frozenset()


def test_data_on_an_unknown_or_closed_stream_is_rejected() -> None:
    conn, got = server_fed(encode_frame(9, MessageType.DATA, 0, b"x"), CREATE_FRAME, encode_frame(1, MessageType.DATA, 0, b"x"))
    assert [(type(e), e.stream_id) for e in got] == [(StreamRejected, 9), (RequestReceived, 1), (StreamRejected, 1)]  # type: ignore[union-attr]
    assert all(e.message == "StreamID is no longer active" for e in got if isinstance(e, StreamRejected))


def test_close_data_carrying_bytes_is_rejected_and_ends_the_stream() -> None:
    open_request = Connection(Role.CLIENT).send_request(TASK, "Upload", flags=Flag.REMOTE_OPEN)
    conn, got = server_fed(open_request, encode_frame(1, MessageType.DATA, Flag.REMOTE_CLOSED, b"x"))
    assert got[1] == StreamRejected(1, Code.INVALID_ARGUMENT, "data close message cannot include data", ended=True)
    assert conn.open_streams == frozenset()


# -- client side ----------------------------------------------------------------------


def test_client_allocates_odd_increasing_stream_ids() -> None:
    client = Connection(Role.CLIENT)
    ids = []
    for _ in range(3):
        ids.append(client.next_stream_id)
        client.send_request(TASK, "State")
    assert ids == [1, 3, 5] and client.open_streams == {1, 3, 5}


def test_client_ignores_frames_for_streams_it_has_not_open() -> None:
    client = Connection(Role.CLIENT)
    client.receive_data(NOT_FOUND_FRAME + encode_frame(1, MessageType.DATA, 0, b"x") + CREATE_FRAME)
    assert events(client) == []


def test_responses_may_come_out_of_order() -> None:
    client = Connection(Role.CLIENT)
    server = Connection(Role.SERVER)
    server.receive_data(client.send_request(TASK, "A") + client.send_request(TASK, "B"))
    events(server)
    client.receive_data(server.send_response(3, b"b") + server.send_response(1, b"a"))
    assert [(e.stream_id, e.payload) for e in events(client)] == [(3, b"b"), (1, b"a")]  # type: ignore[union-attr]


def test_client_oversized_response_fails_that_call() -> None:
    client = Connection(Role.CLIENT)
    client.send_request(TASK, "Stats")
    client.receive_data(bytes.fromhex("00400001" "00000001" "02" "00") + bytes(MAX_DATA_LENGTH + 1))
    assert events(client) == [StreamRejected(1, Code.RESOURCE_EXHAUSTED,
                                             "message length 4194305 exceed maximum message size of 4194304", ended=True)]
    assert client.data_to_send() == b""  # a client never answers


def test_undecodable_response_fails_that_call() -> None:
    client = Connection(Role.CLIENT)
    client.send_request(TASK, "State")
    client.receive_data(encode_frame(1, MessageType.RESPONSE, 0, b"\x0a\xff"))
    [rejected] = events(client)
    assert isinstance(rejected, StreamRejected) and rejected.code == Code.INTERNAL


def test_status_details_survive() -> None:
    detail = bytes.fromhex("0a0174120176")  # Any{type_url "t", value "v"}
    status = Status(Code.FAILED_PRECONDITION, "no", (detail,))
    assert decode_response(encode_response(b"", status)) == (status, b"")


def test_unknown_status_code_reads_as_unknown() -> None:
    assert decode_response(bytes.fromhex("0a02" "0863"))[0].code == Code.UNKNOWN  # code 99


# -- misuse and EOF -------------------------------------------------------------------


def test_roles_are_enforced() -> None:
    with pytest.raises(LocalProtocolError):
        Connection(Role.CLIENT).send_response(1)
    with pytest.raises(LocalProtocolError):
        Connection(Role.SERVER).send_request(TASK, "Create")
    with pytest.raises(LocalProtocolError):
        Connection(Role.SERVER).send_response(1)  # no such stream
    server, _ = server_fed(CREATE_FRAME)
    server.send_response(1)
    with pytest.raises(LocalProtocolError):
        server.send_response(1)  # finished
    with pytest.raises(LocalProtocolError):
        server.send_data(1, b"x")


def test_unary_stream_takes_no_data_from_the_client() -> None:
    client = Connection(Role.CLIENT)
    client.send_request(TASK, "Create")
    with pytest.raises(LocalProtocolError):
        client.send_data(1, b"x")


def test_eof() -> None:
    conn, got = server_fed(CREATE_FRAME, b"")
    assert got[-1] == ConnectionClosed(None) and conn.closed
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"more")
    _, got = server_fed(CREATE_FRAME[:12], b"")
    assert got == [ConnectionClosed("connection closed 12 bytes into a frame")]


def test_public_surface() -> None:
    assert sorted(shim.ttrpc.__all__) == sorted(set(shim.ttrpc.__all__))
    for name in shim.ttrpc.__all__:
        assert hasattr(shim.ttrpc, name), name
    assert shim.ttrpc.Code is Code
