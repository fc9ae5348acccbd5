"""RuntimeService/RuntimeConfig: containerd's answer where it has one, ours where it has none.

containerd 2.x answers the call itself and its answer is relayed unchanged. containerd 1.7
answers UNIMPLEMENTED ("method RuntimeConfig not implemented") and 1.6 does not know the method;
the kubelet 1.38 refuses such a runtime. For those, the proxy reads containerd's CRI config from
its verbose Status and answers with the cgroup driver containerd really uses (shim.cgroup_driver).
Any other error of containerd's is relayed as it is.
"""

from __future__ import annotations

import logging

from google.protobuf.message import DecodeError

from shim import cgroup_driver
from shim.api.cri.v1 import api_pb2 as cri
from shim.containerd import Containerd
from shim.errors import Code, InvalidArgument, Upstream
from shim.proxy.dispatch import Call, Handler

METHOD = "/runtime.v1.RuntimeService/RuntimeConfig"
STATUS_METHOD = "/runtime.v1.RuntimeService/Status"
_DRIVERS = {"systemd": cri.CgroupDriver.SYSTEMD, "cgroupfs": cri.CgroupDriver.CGROUPFS}

log = logging.getLogger(__name__)


def handler(containerd: Containerd) -> Handler:
    async def runtime_config(call: Call) -> bytes:
        try:
            cri.RuntimeConfigRequest.FromString(call.request)
        except DecodeError as exc:
            raise InvalidArgument(f"grpc: error unmarshalling request: {exc}") from None
        try:
            return await containerd.forward(METHOD, call.request, call.metadata, call.timeout)
        except Upstream as exc:
            if exc.code != Code.UNIMPLEMENTED:
                raise
            log.debug("containerd does not implement RuntimeConfig (%s); answering it", exc.message)
        return await _answer(containerd, call)

    return runtime_config


async def _answer(containerd: Containerd, call: Call) -> bytes:
    request = cri.StatusRequest(verbose=True).SerializeToString()
    status = cri.StatusResponse.FromString(
        await containerd.forward(STATUS_METHOD, request, call.metadata, call.timeout))
    decision = cgroup_driver.decide(status.info.get("config"))
    log.info("RuntimeConfig answered for containerd: cgroup driver %s (from %s)",
             decision.driver, "the host" if decision.source == "host" else f"runtime handler {decision.source!r}")
    linux = cri.LinuxRuntimeConfiguration(cgroup_driver=_DRIVERS[decision.driver])
    return bytes(cri.RuntimeConfigResponse(linux=linux).SerializeToString())
