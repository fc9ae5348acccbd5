"""The CheckpointContainer handler (bytes in, domain call, bytes out) and the dispatcher's error edge."""

from __future__ import annotations

import asyncio
import logging
from typing import cast

import pytest

from shim.api.cri.v1 import api_pb2
from shim.checkpoint.checkpointer import Checkpointer, Request
from shim.cri import checkpoint_container
from shim.errors import Code, FailedPrecondition, Internal, InvalidArgument, ShimError
from shim.peer import Peer
from shim.proxy import dispatch
from shim.proxy.dispatch import Call, Dispatcher
from tests.support.procs import run

PEER = Peer(pid=77, uid=0, gid=0)
CONTAINER = "ab" * 32
SECRET = "secret internal detail 0xdeadbeef"


class RecordingCheckpointer:
    """Stands in for `Checkpointer`: records requests, optionally fails."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.requests: list[Request] = []
        self.error = error

    async def checkpoint(self, request: Request) -> None:
        self.requests.append(request)
        if self.error is not None:
            raise self.error


def handler(checkpointer: RecordingCheckpointer) -> dispatch.Handler:
    return checkpoint_container.handler(cast(Checkpointer, checkpointer))


def call(request: bytes) -> Call:
    return Call(checkpoint_container.METHOD, request, (), None, PEER)


def unary(message: bytes) -> bytes:
    """A gRPC length-prefixed, uncompressed request body."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def test_valid_request_reaches_the_engine_and_gets_an_empty_response() -> None:
    engine = RecordingCheckpointer()
    request = api_pb2.CheckpointContainerRequest(container_id=CONTAINER, location="/var/cp.tar", timeout=30)
    reply = run(handler(engine)(call(request.SerializeToString())))
    assert api_pb2.CheckpointContainerResponse.FromString(reply) == api_pb2.CheckpointContainerResponse()
    assert engine.requests == [Request(CONTAINER, "/var/cp.tar", PEER)]


@pytest.mark.parametrize("garbage", [b"\xff\xff", b"\x0a\x05ab", b"\x0a\xff\xff\xff\xff\x0f"])
def test_garbage_request_is_invalid_argument(garbage: bytes) -> None:
    engine = RecordingCheckpointer()
    with pytest.raises(InvalidArgument, match="^grpc: error unmarshalling request: "):
        run(handler(engine)(call(garbage)))
    assert engine.requests == []


@pytest.mark.parametrize("request_bytes", [
    b"",  # every field at its default
    api_pb2.CheckpointContainerRequest(location="/var/cp.tar").SerializeToString(),
])
def test_empty_container_id_is_invalid_argument(request_bytes: bytes) -> None:
    engine = RecordingCheckpointer()
    with pytest.raises(InvalidArgument, match="^container_id is required$"):
        run(handler(engine)(call(request_bytes)))
    assert engine.requests == []


def test_domain_errors_pass_through_the_handler_unchanged() -> None:
    error = FailedPrecondition(f'container "{CONTAINER}" is in CONTAINER_EXITED state. only RUNNING containers '
                               "can be checkpointed")
    request = api_pb2.CheckpointContainerRequest(container_id=CONTAINER, location="/var/cp.tar")
    with pytest.raises(FailedPrecondition) as caught:
        run(handler(RecordingCheckpointer(error))(call(request.SerializeToString())))
    assert caught.value is error


def test_dispatcher_decodes_the_grpc_body_for_the_handler() -> None:
    engine = RecordingCheckpointer()
    dispatcher = Dispatcher({checkpoint_container.METHOD: handler(engine)})
    assert dispatcher.intercepts(checkpoint_container.METHOD)
    request = api_pb2.CheckpointContainerRequest(container_id=CONTAINER, location="/var/cp.tar")
    reply = run(dispatcher.call(checkpoint_container.METHOD, unary(request.SerializeToString()), (), 5.0, PEER))
    assert reply == b""
    assert engine.requests == [Request(CONTAINER, "/var/cp.tar", PEER)]


def test_dispatcher_turns_garbage_into_invalid_argument() -> None:
    engine = RecordingCheckpointer()
    dispatcher = Dispatcher({checkpoint_container.METHOD: handler(engine)})
    with pytest.raises(InvalidArgument):
        run(dispatcher.call(checkpoint_container.METHOD, unary(b"\xff\xff"), (), None, PEER))
    assert engine.requests == []


def test_unexpected_exception_becomes_internal_with_a_fixed_message(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(call: Call) -> bytes:
        raise RuntimeError(SECRET)

    dispatcher = Dispatcher({checkpoint_container.METHOD: broken})
    with caplog.at_level(logging.ERROR, logger=dispatch.__name__), pytest.raises(ShimError) as caught:
        run(dispatcher.call(checkpoint_container.METHOD, unary(b""), (), None, PEER))
    assert type(caught.value) is Internal
    assert caught.value.code is Code.INTERNAL
    assert caught.value.message == dispatch.INTERNAL_MESSAGE
    assert SECRET not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    # The detail goes to the log, with the traceback.
    assert any(r.exc_info and SECRET in str(r.exc_info[1]) for r in caplog.records)


def test_engine_bug_behind_the_real_handler_becomes_internal() -> None:
    engine = RecordingCheckpointer(ValueError(f"OCI spec is not UTF-8 JSON: {SECRET}"))
    dispatcher = Dispatcher({checkpoint_container.METHOD: handler(engine)})
    request = api_pb2.CheckpointContainerRequest(container_id=CONTAINER, location="/var/cp.tar")
    with pytest.raises(Internal) as caught:
        run(dispatcher.call(checkpoint_container.METHOD, unary(request.SerializeToString()), (), None, PEER))
    assert caught.value.message == dispatch.INTERNAL_MESSAGE


def test_deadline_becomes_deadline_exceeded() -> None:
    async def slow(call: Call) -> bytes:
        await asyncio.sleep(5)
        return b""

    dispatcher = Dispatcher({checkpoint_container.METHOD: slow})
    with pytest.raises(ShimError) as caught:
        run(dispatcher.call(checkpoint_container.METHOD, unary(b""), (), 0.05, PEER))
    assert caught.value.code is Code.DEADLINE_EXCEEDED
