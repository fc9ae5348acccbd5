"""Latency the proxy adds: the same CRI calls, direct to containerd and through criu-shim.

Both paths are measured in the same run, interleaved call by call so that
machine noise hits them alike. Prints p50/p99 of each and what the proxy adds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from collections.abc import Callable

import grpc

from shim.api.cri.v1 import api_pb2 as cri
from shim.api.cri.v1 import api_pb2_grpc

BUSYBOX = "localhost/criu-shim/busybox:1"


def _stub(endpoint: str) -> api_pb2_grpc.RuntimeServiceStub:
    return api_pb2_grpc.RuntimeServiceStub(grpc.insecure_channel(endpoint))


def _populate(stub: api_pb2_grpc.RuntimeServiceStub, count: int) -> tuple[str, list[str]]:
    meta = cri.PodSandboxMetadata(name=f"bench-{uuid.uuid4().hex[:6]}", namespace="bench", uid=uuid.uuid4().hex)
    config = cri.PodSandboxConfig(metadata=meta, log_directory="/tmp/criu-shim-bench-logs")
    pod = stub.RunPodSandbox(cri.RunPodSandboxRequest(config=config)).pod_sandbox_id
    ids = []
    for i in range(count):
        ctr = cri.ContainerConfig(metadata=cri.ContainerMetadata(name=f"c{i}"), image=cri.ImageSpec(image=BUSYBOX),
                                  command=["sleep", "3600"], log_path=f"c{i}.log")
        ids.append(stub.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=pod, config=ctr, sandbox_config=config)).container_id)
    return pod, ids


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _measure(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--containerd", required=True, help="containerd CRI endpoint (unix://...)")
    parser.add_argument("--proxy", required=True, help="criu-shim CRI endpoint (unix://...)")
    parser.add_argument("--rounds", type=int, default=1000, help="calls per path per run")
    parser.add_argument("--runs", type=int, default=5, help="runs; the median of their percentiles is shown")
    parser.add_argument("--containers", type=int, default=50)
    parser.add_argument("--also", action="append", default=[], metavar="NAME=unix://...",
                        help="another proxy to measure in the same run (e.g. metrics=... with [metrics] on)")
    args = parser.parse_args()
    direct, proxied = _stub(args.containerd), _stub(args.proxy)
    others = {name: _stub(endpoint) for name, _, endpoint in (a.partition("=") for a in args.also)}
    pod, ids = _populate(direct, args.containers)
    try:
        target = ids[len(ids) // 2]
        work = {
            "Version": lambda s: s.Version(cri.VersionRequest()),
            f"ListContainers({args.containers})": lambda s: s.ListContainers(cri.ListContainersRequest()),
            "ContainerStatus": lambda s: s.ContainerStatus(cri.ContainerStatusRequest(container_id=target)),
        }
        calls: dict[str, Callable[[], object]] = {}
        for name, fn in work.items():
            for label, stub in (("direct", direct), ("proxy", proxied), *others.items()):
                calls[f"{name}|{label}"] = (lambda f, s: lambda: f(s))(fn, stub)
        _measure(calls, 100)  # warm-up: connections, caches
        runs = [_measure(calls, args.rounds) for _ in range(args.runs)]
        _report(work, runs, list(others))
    finally:
        direct.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod))
        direct.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod))
    return 0


def _report(work: dict[str, object], runs: list[dict[str, list[float]]], others: list[str]) -> None:
    def med(key: str, q: float) -> float:
        return statistics.median(_percentile(run[key], q) for run in runs)

    print(f"{'call':<22} {'direct p50':>10} {'proxy p50':>10} {'added p50':>10} "
          f"{'direct p99':>10} {'proxy p99':>10} {'added p99':>10} {'ratio p50':>9}")
    for name in work:
        d50, p50 = med(f"{name}|direct", 0.5), med(f"{name}|proxy", 0.5)
        d99, p99 = med(f"{name}|direct", 0.99), med(f"{name}|proxy", 0.99)
        print(f"{name:<22} {d50:>8.3f}ms {p50:>8.3f}ms {p50 - d50:>+8.3f}ms "
              f"{d99:>8.3f}ms {p99:>8.3f}ms {p99 - d99:>+8.3f}ms {p50 / d50:>8.2f}x")
    for other in others:
        for name in work:
            p50, o50 = med(f"{name}|proxy", 0.5), med(f"{name}|{other}", 0.5)
            p99, o99 = med(f"{name}|proxy", 0.99), med(f"{name}|{other}", 0.99)
            print(f"{name:<22} {other} vs proxy: p50 {o50:.3f}ms ({o50 - p50:+.3f}ms), "
                  f"p99 {o99:.3f}ms ({o99 - p99:+.3f}ms)")
    rounds = len(next(iter(runs[0].values())))
    print(f"(median over {len(runs)} runs of {rounds} interleaved calls per path; "
          "goal: added <= 0.3 ms at p50 and <= 1 ms at p99)")


if __name__ == "__main__":
    sys.exit(main())
