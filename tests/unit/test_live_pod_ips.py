"""Containerd.live_pod_ips asks every ready pod's status at once; a failure surfaces as the domain error it is."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from shim.api.cri.v1 import api_pb2 as cri
from shim.containerd import Containerd
from shim.errors import NotFound


class Runtime:
    """Stands in for the CRI RuntimeService stub: pods p0..pN, each status answered after a pause."""

    def __init__(self, pods: int, missing: str | None = None) -> None:
        self.pods, self.missing = pods, missing
        self.asking = self.most = 0

    async def ListPodSandbox(self, request: cri.ListPodSandboxRequest) -> cri.ListPodSandboxResponse:  # noqa: N802
        return cri.ListPodSandboxResponse(items=[
            cri.PodSandbox(id=f"p{i}", metadata=cri.PodSandboxMetadata(name=f"web-{i}", namespace="shop"))
            for i in range(self.pods)])

    async def PodSandboxStatus(self, request: cri.PodSandboxStatusRequest) -> cri.PodSandboxStatusResponse:  # noqa: N802
        self.asking += 1
        self.most = max(self.most, self.asking)
        await asyncio.sleep(0.01)
        self.asking -= 1
        if request.pod_sandbox_id == self.missing:
            raise NotFound(f"pod {request.pod_sandbox_id} is gone")  # as _call would translate it
        n = int(request.pod_sandbox_id[1:])
        return cri.PodSandboxStatusResponse(status=cri.PodSandboxStatus(
            id=request.pod_sandbox_id, network=cri.PodSandboxNetworkStatus(
                ip=f"10.0.0.{n}", additional_ips=[cri.PodIP(ip=f"fd00::{n}")])))


def owners(runtime: Runtime, tmp_path: Path) -> dict[str, str]:
    async def ask() -> dict[str, str]:
        containerd = Containerd(tmp_path / "none.sock")
        containerd._cri = runtime
        try:
            return await containerd.live_pod_ips()
        finally:
            await containerd.close()
    return asyncio.run(ask())


def test_every_ready_pods_addresses_asked_at_once(tmp_path: Path) -> None:
    runtime = Runtime(20)
    found = owners(runtime, tmp_path)
    assert found["10.0.0.7"] == found["fd00::7"] == "shop/web-7" and len(found) == 40
    assert runtime.most == 20  # one round trip for all, not twenty after one another


def test_a_pod_gone_meanwhile_is_the_error_itself(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="pod p3 is gone"):
        owners(Runtime(5, missing="p3"), tmp_path)
