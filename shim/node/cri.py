"""A small synchronous CRI client for node management (readiness and teardown)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc

from shim.api.cri.v1 import api_pb2, api_pb2_grpc


class CriClient:
    def __init__(self, socket: Path, timeout: float = 30.0) -> None:
        self.channel = grpc.insecure_channel(f"unix://{socket}")
        self.runtime = api_pb2_grpc.RuntimeServiceStub(self.channel)
        self.images = api_pb2_grpc.ImageServiceStub(self.channel)
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CriClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def version(self) -> api_pb2.VersionResponse:
        reply: api_pb2.VersionResponse = self.runtime.Version(api_pb2.VersionRequest(), timeout=2)
        return reply

    def wait_ready(self, timeout: float) -> api_pb2.VersionResponse:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.version()
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def sandbox_netns_paths(self) -> list[Path]:
        """Network namespace files of every pod, read from the verbose status."""
        paths = []
        for sandbox in self.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=self.timeout).items:
            status = self.runtime.PodSandboxStatus(
                api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sandbox.id, verbose=True), timeout=self.timeout)
            info = json.loads(status.info.get("info", "{}") or "{}")
            namespaces = info.get("runtimeSpec", {}).get("linux", {}).get("namespaces", [])
            paths += [Path(ns["path"]) for ns in namespaces if ns.get("type") == "network" and ns.get("path")]
        return paths

    def remove_all_pods(self) -> int:
        sandboxes = self.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=self.timeout).items
        for sandbox in sandboxes:
            self.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox.id), timeout=self.timeout)
            self.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox.id),
                                          timeout=self.timeout)
        return len(sandboxes)
