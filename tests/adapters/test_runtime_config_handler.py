"""The RuntimeConfig handler: containerd's answer relayed, ours when containerd has none."""

from __future__ import annotations

import json
from typing import cast

import pytest

from shim.api.cri.v1 import api_pb2
from shim.containerd import Containerd
from shim.cri import runtime_config
from shim.errors import Code, InvalidArgument, Unknown, Upstream
from shim.peer import Peer
from shim.proxy.dispatch import Call, Dispatcher
from tests.support.procs import run

PEER = Peer(pid=77, uid=0, gid=0)
METADATA = (("x-request", "1"),)
UNIMPLEMENTED_17 = Upstream(Code.UNIMPLEMENTED, "method RuntimeConfig not implemented")
UNIMPLEMENTED_16 = Upstream(Code.UNIMPLEMENTED, "unknown method RuntimeConfig for service runtime.v1.RuntimeService")


def status_reply(systemd_cgroup: bool, info: dict[str, str] | None = None) -> bytes:
    config = {"containerd": {"defaultRuntimeName": "criu", "runtimes": {
        "criu": {"runtimeType": "io.containerd.runc.v2", "options": {"SystemdCgroup": systemd_cgroup}}}}}
    reply = api_pb2.StatusResponse(info={"config": json.dumps(config)} if info is None else info)
    return bytes(reply.SerializeToString())


class FakeForward:
    """Stands in for the facade's `forward`: canned replies or errors per method, calls recorded."""

    def __init__(self, replies: dict[str, bytes | BaseException]) -> None:
        self.replies = replies
        self.calls: list[tuple[str, bytes, tuple[tuple[str, str], ...], float | None]] = []

    async def forward(self, method: str, request: bytes, metadata: tuple[tuple[str, str], ...],
                      timeout: float | None) -> bytes:
        self.calls.append((method, request, metadata, timeout))
        reply = self.replies[method]
        if isinstance(reply, BaseException):
            raise reply
        return reply


def handle(fake: FakeForward, request: bytes = b"") -> bytes:
    call = Call(runtime_config.METHOD, request, METADATA, 5.0, PEER)
    return run(runtime_config.handler(cast(Containerd, fake))(call))


def driver_of(reply: bytes) -> int:
    response = api_pb2.RuntimeConfigResponse.FromString(reply)
    assert response.HasField("linux")
    return response.linux.cgroup_driver


def test_containerds_own_answer_is_relayed_unchanged() -> None:
    own = api_pb2.RuntimeConfigResponse(linux=api_pb2.LinuxRuntimeConfiguration(
        cgroup_driver=api_pb2.CgroupDriver.SYSTEMD)).SerializeToString() + b"\x9a\x01\x00"  # + an unknown field
    fake = FakeForward({runtime_config.METHOD: own})
    assert handle(fake) == own
    assert fake.calls == [(runtime_config.METHOD, b"", METADATA, 5.0)]  # no Status asked


@pytest.mark.parametrize("unimplemented", [UNIMPLEMENTED_17, UNIMPLEMENTED_16])
@pytest.mark.parametrize(("systemd", "driver"), [(True, api_pb2.CgroupDriver.SYSTEMD),
                                                 (False, api_pb2.CgroupDriver.CGROUPFS)])
def test_unimplemented_is_answered_from_containerds_runc_options(
        unimplemented: Upstream, systemd: bool, driver: int) -> None:
    fake = FakeForward({runtime_config.METHOD: unimplemented,
                           runtime_config.STATUS_METHOD: status_reply(systemd)})
    assert driver_of(handle(fake)) == driver
    status_request = api_pb2.StatusRequest.FromString(fake.calls[1][1])
    assert [c[0] for c in fake.calls] == [runtime_config.METHOD, runtime_config.STATUS_METHOD]
    assert status_request.verbose


@pytest.mark.parametrize("error", [Upstream(Code.UNAVAILABLE, "connection refused"),
                                   Upstream(Code.INTERNAL, "boom"),
                                   Upstream(Code.DEADLINE_EXCEEDED, "context deadline exceeded")])
def test_other_errors_of_containerd_are_relayed(error: Upstream) -> None:
    fake = FakeForward({runtime_config.METHOD: error})
    with pytest.raises(Upstream) as raised:
        handle(fake)
    assert (raised.value.code, raised.value.message) == (error.code, error.message)
    assert len(fake.calls) == 1


def test_a_failing_status_is_relayed() -> None:
    fake = FakeForward({runtime_config.METHOD: UNIMPLEMENTED_17,
                           runtime_config.STATUS_METHOD: Upstream(Code.UNAVAILABLE, "containerd is down")})
    with pytest.raises(Upstream, match="^containerd is down$"):
        handle(fake)


@pytest.mark.parametrize("info", [{}, {"config": "{not json"}, {"config": '{"containerd": []}'}])
def test_an_unreadable_status_config_is_a_clear_error(info: dict[str, str]) -> None:
    fake = FakeForward({runtime_config.METHOD: UNIMPLEMENTED_17,
                           runtime_config.STATUS_METHOD: status_reply(False, info)})
    with pytest.raises(Unknown, match="cannot tell which cgroup driver it uses"):
        handle(fake)


@pytest.mark.parametrize("garbage", [b"\xff\xff", b"\x0a\x05ab", b"\x0a\xff\xff\xff\xff\x0f"])
def test_garbage_request_is_invalid_argument_and_reaches_nobody(garbage: bytes) -> None:
    fake = FakeForward({})
    with pytest.raises(InvalidArgument, match="^grpc: error unmarshalling request: "):
        handle(fake, garbage)
    assert fake.calls == []


def test_garbage_through_the_dispatcher_keeps_the_status() -> None:
    """The error edge turns it into INVALID_ARGUMENT (not a fixed internal message)."""
    fake = FakeForward({})
    dispatcher = Dispatcher({runtime_config.METHOD: runtime_config.handler(cast(Containerd, fake))})
    body = b"\x00" + (2).to_bytes(4, "big") + b"\xff\xff"
    with pytest.raises(InvalidArgument):
        run(dispatcher.call(runtime_config.METHOD, body, (), None, PEER))
    assert dispatcher.intercepts(runtime_config.METHOD)
