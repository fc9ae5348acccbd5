"""The ttrpc codec and relay against the real peer: containerd-shim-runc-v2 from containerd 1.7.

The shim is started the way containerd starts it (`start` with cwd = bundle,
the shim log fifo already there, TTRPC_ADDRESS set; nothing listens at that
address, which a shim with no task never needs) and left without tasks, so
Shutdown makes it exit. Every shim process is found by our unique temporary
directory in its command line; whatever is still there at the end is killed
by pid, and the test asserts none is left.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shim.api.containerd.runtime.task.v2 import shim_pb2
from shim.errors import Code, FailedPrecondition
from shim.ttrpc import Client, Connection, RelayServer, RequestReceived, Role, Status, TTRPCError, encode_request
from shim.ttrpc.frame import Frame, FrameBuffer, MessageType, encode_frame
from shim.ttrpc.messages import Request

RUNC_SHIM = Path("/opt/criu-shim/containerd-1.7/bin/containerd-shim-runc-v2")
TASK = "containerd.task.v2.Task"
NOT_CREATED = Status(Code.NOT_FOUND, "container not created: not found")
TIMEOUT = 20.0

pytestmark = [
    pytest.mark.node,
    pytest.mark.skipif(not RUNC_SHIM.exists(), reason=f"{RUNC_SHIM} is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the runc shim needs root"),
]


@dataclass(frozen=True)
class RuncShim:
    root: Path
    id: str
    socket: Path


def _shim_pids(root: Path) -> list[int]:
    """Live (not zombie) processes whose command line names `root`: our shims only."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(root) in cmdline and RUNC_SHIM.name in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


def _wait_gone(root: Path, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := _shim_pids(root)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.fixture
def runc_shim() -> Iterator[RuncShim]:
    root = Path(tempfile.mkdtemp(prefix="ttrpc-runc-", dir="/tmp"))
    bundle = root / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"ociVersion": "1.0.2"}))  # read by `start`
    os.mkfifo(bundle / "log")  # the shim writes its log here; containerd would read it
    log_fd = os.open(bundle / "log", os.O_RDONLY | os.O_NONBLOCK)
    shim_id = f"ttrpc-test-{os.getpid()}"
    address: Path | None = None
    try:
        started = subprocess.run(
            [str(RUNC_SHIM), "-namespace", "testns", "-address", str(root / "fake.sock"),
             "-publish-binary", "/bin/true", "-id", shim_id, "start"],
            cwd=bundle, env={**os.environ, "TTRPC_ADDRESS": str(root / "fake.sock.ttrpc")},
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT)
        assert started.returncode == 0, started.stderr
        assert started.stdout.startswith("unix://"), started.stdout
        address = Path(started.stdout.strip().removeprefix("unix://"))
        yield RuncShim(root, shim_id, address)
    finally:
        for pid in _wait_gone(root, 5.0):  # the test's Shutdown should have ended it
            os.kill(pid, signal.SIGKILL)
        left = _wait_gone(root, 5.0)
        if address is not None:
            address.unlink(missing_ok=True)
        os.close(log_fd)
        shutil.rmtree(root, ignore_errors=True)
        assert left == [], f"runc shim processes left behind: {left}"


async def _connect_and_check(client: Client, shim: RuncShim) -> None:
    reply = shim_pb2.ConnectResponse.FromString(
        await client.call(TASK, "Connect", shim_pb2.ConnectRequest(id=shim.id).SerializeToString()))
    assert reply.shim_pid in _shim_pids(shim.root)


async def _shutdown(client: Client, shim: RuncShim) -> None:
    try:
        assert await client.call(TASK, "Shutdown", shim_pb2.ShutdownRequest(id=shim.id).SerializeToString()) == b""
    except TTRPCError as exc:
        # The shim may exit before its answer is out; containerd ignores that too (ErrClosed).
        assert exc.status.code == Code.UNAVAILABLE and "closed" in exc.status.message
    async with asyncio.timeout(TIMEOUT):
        await client.wait_closed()  # the shim exits, closing the connection


async def _exchange(path: Path, data: bytes, answers: int) -> list[bytes]:
    """Write `data` on a new connection; the first `answers` frames read back, as raw bytes."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    frames: list[bytes] = []
    buffer = FrameBuffer()
    try:
        writer.write(data)
        async with asyncio.timeout(TIMEOUT):
            while len(frames) < answers:
                chunk = await reader.read(65536)
                assert chunk, "connection closed"
                frames += [bytes(f.raw) for f in buffer.parse(chunk) if isinstance(f, Frame)]
    finally:
        writer.close()
    return frames


def _request(stream_id: int, method: str, payload: bytes = b"", service: str = TASK) -> bytes:
    return encode_frame(stream_id, MessageType.REQUEST, 0, encode_request(Request(service, method, payload)))


STATE_NOPE = shim_pb2.StateRequest(id="nope").SerializeToString()


def test_codec_against_the_runc_shim(runc_shim: RuncShim) -> None:
    async def body() -> None:
        # Our server engine, given what the real one got, answers with the very same frames:
        # its own refusals (even id, re-used id) and the handler's NOT_FOUND on 1 and 3.
        wire = _request(1, "State", STATE_NOPE) + _request(2, "State", STATE_NOPE) \
            + _request(1, "State", STATE_NOPE) + _request(3, "State", STATE_NOPE)
        ours = Connection(Role.SERVER)
        ours.receive_data(wire)
        handled = [e.stream_id for e in iter(ours.next_event, None) if isinstance(e, RequestReceived)]
        assert handled == [1, 3]
        expected = [frame.raw for frame in FrameBuffer().parse(ours.data_to_send()) if isinstance(frame, Frame)]
        expected += [ours.send_response(i, status=NOT_CREATED) for i in handled]
        theirs = await _exchange(runc_shim.socket, wire, 4)  # answers come in any order
        assert sorted(theirs) == sorted(bytes(f) for f in expected)

        async with Client.connect(runc_shim.socket) as client:
            await _connect_and_check(client, runc_shim)
            with pytest.raises(TTRPCError) as missing:
                await client.call(TASK, "State", STATE_NOPE, timeout=10, metadata=(("k", "v"),))
            assert missing.value.status == NOT_CREATED
            with pytest.raises(TTRPCError) as garbage:
                await client.call(TASK, "State", b"\xff")
            assert garbage.value.status.code == Code.INTERNAL  # the Go handler cannot unmarshal it
            with pytest.raises(TTRPCError) as no_method:
                await client.call(TASK, "NoSuchMethod")
            assert no_method.value.status == Status(Code.UNIMPLEMENTED, "method NoSuchMethod")
            with pytest.raises(TTRPCError) as no_service:
                await client.call("no.such.Service", "State")
            assert no_service.value.status == Status(Code.UNIMPLEMENTED, "service no.such.Service")
            await _shutdown(client, runc_shim)

    asyncio.run(body())
    assert _wait_gone(runc_shim.root, 5.0) == []


def test_relay_in_front_of_the_runc_shim(runc_shim: RuncShim) -> None:
    rewrites: list[bytes] = []

    async def rewrite(service: str, method: str, payload: bytes) -> bytes:
        rewrites.append(payload)
        if payload == b"refuse":
            raise FailedPrecondition("refused by the relay")
        return bytes(shim_pb2.StateRequest(id="nope").SerializeToString())  # whatever came, a valid one

    async def body() -> None:
        listen = runc_shim.root / "relay.sock"
        relay = RelayServer(listen, runc_shim.socket, rewrite, methods={(TASK, "State")})
        async with asyncio.TaskGroup() as tasks:
            serving = tasks.create_task(relay.serve())
            await relay.wait_ready()
            try:
                # Pass-through: the same bytes as straight from the shim.
                wire = _request(1, "Connect", shim_pb2.ConnectRequest(id=runc_shim.id).SerializeToString()) \
                    + _request(3, "Pids", shim_pb2.PidsRequest(id="nope").SerializeToString()) + _request(4, "Pids")
                direct = await _exchange(runc_shim.socket, wire, 3)
                assert sorted(await _exchange(listen, wire, 3)) == sorted(direct)

                async with Client.connect(listen) as client:
                    await _connect_and_check(client, runc_shim)
                    # Rewritten: garbage the shim would refuse becomes a valid request it answers.
                    with pytest.raises(TTRPCError) as answered:
                        await client.call(TASK, "State", b"\xff")
                    assert answered.value.status == NOT_CREATED
                    with pytest.raises(TTRPCError) as refused:
                        await client.call(TASK, "State", b"refuse")
                    assert refused.value.status == Status(Code.FAILED_PRECONDITION, "refused by the relay")
                    results = await asyncio.gather(
                        *(client.call(TASK, "Connect", shim_pb2.ConnectRequest(id=runc_shim.id).SerializeToString())
                          for _ in range(20)))
                    assert len(set(results)) == 1
                    await _shutdown(client, runc_shim)  # through the relay: the client sees the close
                assert rewrites == [b"\xff", b"refuse"]
            finally:
                relay.stop()
            await serving

    asyncio.run(body())
    assert _wait_gone(runc_shim.root, 5.0) == []
    assert not (runc_shim.root / "relay.sock").exists()
