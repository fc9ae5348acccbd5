"""One CRI scenario, run against any endpoint, reduced to comparable facts.

Ids, timestamps, pids, IPs, ports and the run's own name suffix differ between
two runs by nature; `normalise` replaces them so that everything else (codes,
messages, states, fields) must be identical direct and through the proxy.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from shim.api.cri.v1 import api_pb2 as cri
from shim.api.cri.v1 import api_pb2_grpc

BUSYBOX = "localhost/criu-shim/busybox:1"
UNKNOWN_ID = "0123456789abcdef" * 4
_RUNTIME = "/runtime.v1.RuntimeService/"


def _rpc(stub: Any, method: str, request: Any) -> dict[str, Any]:
    """Call and reduce to {"ok": json} or {"code", "details"}."""
    try:
        reply = getattr(stub, method)(request, timeout=60)
    except grpc.RpcError as exc:
        return {"method": method, "code": exc.code().name, "details": exc.details()}
    # Scalars at their zero value are printed too: proto3 JSON leaves them out, so a volatile field that is
    # still 0 on one run (containerd 2.x fills writableLayer.timestamp on its first background collection)
    # would otherwise make the two runs differ in shape rather than in value.
    return {"method": method, "ok": json_format.MessageToDict(reply, always_print_fields_with_no_presence=True)}


class Scenario:
    def __init__(self, endpoint: str, label: str, log_dir: str) -> None:
        self.channel = grpc.insecure_channel(endpoint)
        self.runtime = api_pb2_grpc.RuntimeServiceStub(self.channel)
        self.images = api_pb2_grpc.ImageServiceStub(self.channel)
        self.label = label
        self.log_dir = log_dir
        self.results: list[dict[str, Any]] = []
        self.ids: list[str] = []

    def call(self, stub: Any, method: str, request: Any) -> dict[str, Any]:
        result = _rpc(stub, method, request)
        self.results.append(result)
        return result

    def sandbox_config(self) -> cri.PodSandboxConfig:
        Path(f"{self.log_dir}/{self.label}").mkdir(parents=True, exist_ok=True)  # the kubelet's job
        meta = cri.PodSandboxMetadata(name=f"pt-{self.label}", namespace="passthrough", uid=f"uid-{self.label}")
        return cri.PodSandboxConfig(metadata=meta, hostname="pt", log_directory=f"{self.log_dir}/{self.label}",
                                    labels={"app": "pt"}, annotations={"note": "passthrough"})

    def run(self) -> list[dict[str, Any]]:
        r, i = self.runtime, self.images
        self.call(r, "Version", cri.VersionRequest())
        self.call(r, "Status", cri.StatusRequest())
        config = self.sandbox_config()
        pod = self.call(r, "RunPodSandbox", cri.RunPodSandboxRequest(config=config))["ok"]["podSandboxId"]
        self.ids.append(pod)
        self.call(r, "PodSandboxStatus", cri.PodSandboxStatusRequest(pod_sandbox_id=pod))
        ctr = self._container(pod, config)
        self._container_calls(pod, ctr)
        self._image_calls(i)
        self._error_calls(r, i, pod, config)
        self.call(r, "StopContainer", cri.StopContainerRequest(container_id=ctr, timeout=1))
        self.call(r, "ContainerStatus", cri.ContainerStatusRequest(container_id=ctr))
        self.call(r, "RemoveContainer", cri.RemoveContainerRequest(container_id=ctr))
        self.call(r, "StopPodSandbox", cri.StopPodSandboxRequest(pod_sandbox_id=pod))
        self.call(r, "RemovePodSandbox", cri.RemovePodSandboxRequest(pod_sandbox_id=pod))
        self.call(r, "PodSandboxStatus", cri.PodSandboxStatusRequest(pod_sandbox_id=pod))
        self.channel.close()
        return self.results

    def _container(self, pod: str, config: cri.PodSandboxConfig) -> str:
        c = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="main"), image=cri.ImageSpec(image=BUSYBOX),
                                command=["sh", "-c", "echo started; exec sleep 3600"], log_path="main.log",
                                labels={"tier": "x"}, envs=[cri.KeyValue(key="A", value="1")])
        created = self.call(self.runtime, "CreateContainer",
                            cri.CreateContainerRequest(pod_sandbox_id=pod, config=c, sandbox_config=config))
        ctr = str(created["ok"]["containerId"])
        self.ids.append(ctr)
        self.call(self.runtime, "StartContainer", cri.StartContainerRequest(container_id=ctr))
        return ctr

    def _container_calls(self, pod: str, ctr: str) -> None:
        r = self.runtime
        self.call(r, "ContainerStatus", cri.ContainerStatusRequest(container_id=ctr))
        self.call(r, "ExecSync", cri.ExecSyncRequest(container_id=ctr, cmd=["sh", "-c", "echo out; echo err >&2"],
                                                     timeout=10))
        self.call(r, "ExecSync", cri.ExecSyncRequest(container_id=ctr, cmd=["sh", "-c", "exit 3"], timeout=10))
        for flt in (cri.ContainerFilter(id=ctr), cri.ContainerFilter(pod_sandbox_id=pod),
                    cri.ContainerFilter(state=cri.ContainerStateValue(state=cri.CONTAINER_RUNNING),
                                        label_selector={"tier": "x"}),
                    cri.ContainerFilter(label_selector={"tier": "nope"})):
            self.call(r, "ListContainers", cri.ListContainersRequest(filter=flt))
        self.call(r, "ListPodSandbox", cri.ListPodSandboxRequest(filter=cri.PodSandboxFilter(id=pod)))
        self.call(r, "ContainerStats", cri.ContainerStatsRequest(container_id=ctr))
        self.call(r, "UpdateContainerResources", cri.UpdateContainerResourcesRequest(
            container_id=ctr, linux=cri.LinuxContainerResources(cpu_shares=512)))
        self.call(r, "ReopenContainerLog", cri.ReopenContainerLogRequest(container_id=ctr))
        self.call(r, "Exec", cri.ExecRequest(container_id=ctr, cmd=["true"], stdout=True))
        self.call(r, "Attach", cri.AttachRequest(container_id=ctr, stdout=True))
        self.call(r, "PortForward", cri.PortForwardRequest(pod_sandbox_id=pod, port=[80]))

    def _image_calls(self, i: Any) -> None:
        self.call(i, "ImageStatus", cri.ImageStatusRequest(image=cri.ImageSpec(image=BUSYBOX)))
        self.call(i, "ImageStatus", cri.ImageStatusRequest(image=cri.ImageSpec(image="localhost/none:0")))
        self.call(i, "RemoveImage", cri.RemoveImageRequest(image=cri.ImageSpec(image="localhost/none:0")))
        self.call(i, "ImageFsInfo", cri.ImageFsInfoRequest())

    def _error_calls(self, r: Any, i: Any, pod: str, config: cri.PodSandboxConfig) -> None:
        self.call(r, "ContainerStatus", cri.ContainerStatusRequest(container_id=UNKNOWN_ID))
        self.call(r, "StartContainer", cri.StartContainerRequest(container_id=UNKNOWN_ID))
        self.call(r, "PodSandboxStatus", cri.PodSandboxStatusRequest(pod_sandbox_id=UNKNOWN_ID))
        self.call(r, "ExecSync", cri.ExecSyncRequest(container_id=UNKNOWN_ID, cmd=["true"]))
        self.call(r, "RunPodSandbox", cri.RunPodSandboxRequest(config=cri.PodSandboxConfig()))
        bad = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="bad"),
                                  image=cri.ImageSpec(image="localhost/none:0"))
        self.call(r, "CreateContainer", cri.CreateContainerRequest(pod_sandbox_id=pod, config=bad,
                                                                    sandbox_config=config))
        for method in ("ContainerStatus", "CreateContainer", "CheckpointContainer"):
            raw = self.channel.unary_unary(_RUNTIME + method)
            try:
                raw(b"\xff\xff\xff\xff", timeout=10)
                self.results.append({"method": "garbage", "ok": "accepted"})
            except grpc.RpcError as exc:
                self.results.append({"method": f"garbage {method}", "code": exc.code().name,
                                     "details": exc.details()})
        unknown = self.channel.unary_unary(_RUNTIME + "NoSuchMethod")
        try:
            unknown(b"", timeout=10)
        except grpc.RpcError as exc:
            self.results.append({"method": "unknown", "code": exc.code().name, "details": exc.details()})


_PATTERNS = [
    (re.compile(r"\b[0-9a-f]{64}\b"), "<ID>"),
    (re.compile(r"\b\d{4}-\d\d-\d\dT[\d:.]+(Z|[+-]\d\d:\d\d)\b"), "<TIME>"),
    (re.compile(r"\b\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}(:\d+)?\b"), "<ADDR>"),
    (re.compile(r"/(exec|attach|portforward)/[A-Za-z0-9_-]+"), r"/\1/<TOKEN>"),
]
_VOLATILE_KEYS = {"createdAt", "startedAt", "finishedAt", "timestamp", "usageBytes", "usageCoreNanoSeconds",
                  "workingSetBytes", "availableBytes", "rssBytes", "pageFaults", "majorPageFaults", "inodesUsed",
                  "value", "usedBytes", "pid"}


def normalise(value: Any, labels: tuple[str, ...], ids: list[str]) -> Any:
    if isinstance(value, dict):
        return {k: ("<V>" if k in _VOLATILE_KEYS else normalise(v, labels, ids)) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise(v, labels, ids) for v in value]
    if isinstance(value, str):
        for known in ids:
            value = value.replace(known, "<ID>")
        for label in labels:
            value = value.replace(label, "<RUN>")
        for pattern, repl in _PATTERNS:
            value = pattern.sub(repl, value)
    return value


def new_label() -> str:
    return uuid.uuid4().hex[:8]
