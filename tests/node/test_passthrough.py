"""The proxy is invisible: one CRI scenario, direct and through criu-shim, same results."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import grpc
import pytest

from shim.api.cri.v1 import api_pb2 as cri
from shim.api.cri.v1 import api_pb2_grpc
from tests.node.conftest import FULL, SMOKE, Node, on
from tests.node.cri_scenario import BUSYBOX, Scenario, new_label, normalise

pytestmark = pytest.mark.node


@on(*FULL, *SMOKE)
def test_scenario_identical_direct_and_through_proxy(node: Node) -> None:
    log_dir = str(node.dir / "pod-logs")
    runs = {}
    for name, endpoint in (("direct", node.containerd), ("proxy", node.cri)):
        label = new_label()
        scenario = Scenario(endpoint, label, log_dir)
        runs[name] = normalise(scenario.run(), (label,), scenario.ids)
    direct, proxied = runs["direct"], runs["proxy"]
    assert [r["method"] for r in direct] == [r["method"] for r in proxied]
    for a, b in zip(direct, proxied, strict=True):
        if a["method"] == "garbage CheckpointContainer":
            continue  # answered by criu-shim itself (containerd 1.x says Unimplemented, 2.x its own)
        assert a == b, f"{a['method']} differs"
    by_method: dict[str, dict[str, object]] = {}
    for result in direct:
        by_method.setdefault(result["method"], result)  # the first call of each method
    # The scenario must have exercised real behaviour, not a wall of errors.
    assert by_method["StartContainer"].get("ok") == {}
    assert "ok" in by_method["ExecSync"]
    assert by_method["garbage ContainerStatus"]["code"] != "OK"
    assert by_method["garbage CreateContainer"]["code"] != "OK"
    assert by_method["unknown"]["code"] == "UNIMPLEMENTED"


def _first_event(endpoint: str, create: Callable[[], str]) -> tuple[str, str]:
    """Open GetContainerEvents, cause an event, return (event type, container id) of the first event
    about a container this call created (other tests' containers on the node may have events too)."""
    channel = grpc.insecure_channel(endpoint)
    stub = api_pb2_grpc.RuntimeServiceStub(channel)
    stream = stub.GetContainerEvents(cri.GetEventsRequest(), timeout=30)
    ready = threading.Event()
    events: list[tuple[str, str]] = []
    created: set[str] = set()
    mine = threading.Event()

    def read() -> None:
        ready.set()
        with contextlib.suppress(grpc.RpcError):  # cancelled below
            for event in stream:
                events.append((cri.ContainerEventType.Name(event.container_event_type), event.container_id))
                if event.container_id in created:
                    mine.set()

    reader = threading.Thread(target=read)
    reader.start()
    ready.wait()
    for _ in range(50):  # the stream may not be registered yet: create until an event of ours arrives
        created.add(create())
        if mine.wait(timeout=0.5):
            break
    stream.cancel()
    reader.join()
    channel.close()
    ours = [event for event in events if event[1] in created]
    assert ours, f"no event about the containers created arrived (others: {events})"
    return ours[0]


def test_get_container_events_streams_through_proxy(node: Node) -> None:
    direct = api_pb2_grpc.RuntimeServiceStub(grpc.insecure_channel(node.containerd))
    meta = cri.PodSandboxMetadata(name="events", namespace="passthrough", uid="events")
    (node.dir / "events").mkdir(exist_ok=True)
    config = cri.PodSandboxConfig(metadata=meta, log_directory=str(node.dir / "events"))
    pod = direct.RunPodSandbox(cri.RunPodSandboxRequest(config=config)).pod_sandbox_id
    counter = iter(range(1000))

    def create() -> str:
        c = cri.ContainerConfig(metadata=cri.ContainerMetadata(name=f"e{next(counter)}"),
                                image=cri.ImageSpec(image=BUSYBOX), command=["true"])
        return str(direct.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=pod, config=c, sandbox_config=config)).container_id)

    try:
        kind, _ = _first_event(node.cri, create)
        assert kind == "CONTAINER_CREATED_EVENT"
    finally:
        direct.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod))
        direct.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod))
